"""Training K agents as one compiled step, and the Python entry point ``train_and_evaluate``.

One train step, jitted once with the state donated:

  1. every agent draws its batch from its own index list (:func:`drt_jax.data.sample_indices`);
  2. per-agent loss and gradients at ``grad_point`` (the params, or CTA's combined point), run
     over the agent axis by the configured back-end (:mod:`drt_jax.backends`);
  3. the algorithm's step: local optimizer update and combination (:mod:`drt_jax.algorithms`);
  4. BatchNorm statistics combined too when ``config.combine_batch_stats``;
  5. per-agent finiteness of the new parameters and statistics, a ``[K]`` bool in the metrics.

With ``config.faults`` probabilities above 0, a seeded fault pattern (agent drop-out, link
failures, stragglers; :mod:`drt_jax.faults`) masks the step's combination weights and local steps;
with all of them 0 the program holds no fault code at all.

The topology and the data are arguments of the compiled step, so new weights, a time-varying
schedule or another dataset of the same shapes never recompile; learning rate and DRT strength
live in the state, so sweeping them does not recompile either (compiled steps are cached per
static configuration within a process).

``train_and_evaluate`` checks the metrics for NaN/Inf whenever it pulls them from the device (at
evaluations, log lines and checkpoints) and stops with a one-line ``FloatingPointError`` naming the
first bad step and its agents; with ``config.checkpoint_every`` it saves and resumes the whole
state (:mod:`drt_jax.checkpoint`).
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from drt_jax import algorithms, backends, datasets, distributed, faults, models, partition
from drt_jax import checkpoint as checkpoint_lib
from drt_jax import combine as combine_lib
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import drt as drt_lib
from drt_jax import metrics as metrics_lib
from drt_jax import topology as topology_lib
from drt_jax.types import PyTree


class TrainState(NamedTuple):
  """Everything that changes in training; all leaves but ``step`` and ``key`` are [K, ...]."""

  params: PyTree
  model_state: PyTree  # non-trained collections (BatchNorm statistics), {} if none
  alg_state: Any
  step: jax.Array  # int32 scalar
  key: jax.Array  # typed PRNG key for batch sampling


class DeviceData(NamedTuple):
  """The training examples on device, and the agents' padded index lists into them.

  With the ``shard`` back-end each device holds only the examples of its own agents: ``images``
  and ``labels`` stack one block of M rows per device (split over the agents mesh) and ``idx``
  holds positions within the agent's device block. Otherwise they hold the whole training split
  once (M = N) and ``idx`` its example indices. Build it with :func:`device_data` for the
  back-end of the step that reads it: the two layouts have the same shapes on one device.
  """

  images: jax.Array  # [n_blocks * M, ...] as stored (uint8 or float)
  labels: jax.Array  # int32[n_blocks * M]
  idx: jax.Array  # int32[K, Nmax]
  counts: jax.Array  # int32[K]
  mean: jax.Array  # per-channel normalisation
  std: jax.Array


class EvalSet(NamedTuple):
  images: jax.Array  # [num_batches, batch, ...]
  labels: jax.Array  # int32[num_batches, batch]
  mask: jax.Array  # bool[num_batches, batch]


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The local optimizer with its hyperparameters in its state (sweeps do not recompile)."""

  def build(learning_rate, weight_decay, momentum):
    if name == "adam":
      return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    if name == "adamw":
      return optax.adamw(learning_rate, weight_decay=weight_decay)
    trace = () if name == "sgd" else (optax.trace(momentum, nesterov=name == "nesterov"),)
    return optax.chain(optax.add_decayed_weights(weight_decay), *trace,
                       optax.scale_by_learning_rate(learning_rate))

  if name not in config_lib.OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of: "
                     f"{', '.join(config_lib.OPTIMIZERS)}")
  return optax.inject_hyperparams(build)(learning_rate=learning_rate, weight_decay=weight_decay,
                                         momentum=momentum)


def make_algorithm(c: ml_collections.ConfigDict) -> algorithms.Algorithm:
  opt = make_optimizer(c.optimizer, c.learning_rate, c.momentum, c.weight_decay)
  kw = {"comm_every": c.comm_every}
  if algorithms.uses_drt(c.algorithm):
    kw.update(strength=c.drt.strength, floor=c.drt.floor, eps=c.drt.eps,
              granularity=c.drt.granularity, reference=c.drt.reference)
  return algorithms.make(c.algorithm, opt, **kw)


def make_topology(c: ml_collections.ConfigDict) -> topology_lib.Topology:
  if c.algorithm == "local":
    return topology_lib.identity(c.num_agents)
  options = dict(c.topology_options)
  if c.lazy:
    options["lazy"] = c.lazy
  if c.self_weight:
    options["self_weight"] = c.self_weight
  return topology_lib.make(c.topology, c.num_agents, weights=c.topology_weights, seed=c.seed,
                           **options)


def make_model(c: ml_collections.ConfigDict, data: data_lib.Data) -> models.Model:
  """``config.model`` for the data's input shape and classes, computing in ``config.precision``
  (parameters stay float32 whatever the precision)."""
  options = dict(c.model_options)
  if c.precision != "float32":
    options.setdefault("dtype", jnp.dtype(c.precision))
  if c.model in models.CONV_MODELS:
    options["conv"] = conv_formulation(c)
  return models.make(c.model, data.classes, input_shape=data.train_images.shape[1:], **options)


def conv_formulation(c: ml_collections.ConfigDict) -> str:
  """The convolution formulation ``c``'s model computes with: ``model_options.conv`` if set,
  else ``c.conv`` with ``'auto'`` resolved for the platform, the precision and the agents each
  device vmaps (:func:`drt_jax.backends.best_conv`)."""
  agents = backends.vmapped_agents(c.backend, c.num_agents, c.chunk_size or None)
  return c.model_options.get("conv") or backends.best_conv(c.conv, c.precision, agents)


# Steps dispatched ahead of the one the host waits for. Enough to keep an accelerator busy; and
# bounded, because XLA:CPU with several virtual devices deadlocks when hundreds of steps with
# collectives queue up (each device's threads wait in a later step's rendezvous while an earlier
# step still needs them).
MAX_STEPS_IN_FLIGHT = 4


def agents_finite(stacked_tree) -> jax.Array:
  """bool ``[K]``: whether every entry of agent k's slice of every leaf is finite.

  Computed as ``sum(x * 0) == 0``, which is exactly that (a finite entry gives ±0, an Inf or NaN
  gives NaN) and runs several times faster on XLA:CPU than a reduction of ``isfinite``.
  """
  leaves = jax.tree.leaves(stacked_tree)
  flags = [jnp.sum(x.reshape(x.shape[0], -1) * 0, axis=1) == 0 for x in leaves
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags)


def _normalise(x, mean, std):
  return (x.astype(jnp.float32) - mean) / std


def _stack(tree, k_count):
  return jax.tree.map(lambda x: jnp.tile(x[None], (k_count,) + (1,) * x.ndim), tree)


def draw_batch(key, step, d: DeviceData, batch_size: int, augmentation: str = "none",
               backend: str = "vmap"):
  """Every agent's training batch at ``step``, drawn on the device: ``(x [K, B, ...], y [K, B])``.

  Indices come from each agent's own list, without replacement within its local epochs
  (:func:`drt_jax.data.sample_indices`, keyed by the run's sampling key alone so that an epoch's
  order stays fixed across its steps); with the ``shard`` back-end each device reads its agents'
  examples from its own block of ``d`` (:func:`device_data`). Augmentation uses a key folded with
  the step; images are normalised last.
  """
  idx = data_lib.sample_indices(jax.random.fold_in(key, 0), step, d.idx, d.counts, batch_size)
  k_count = d.idx.shape[0]
  if backends.resolve(backend, k_count) == "shard":
    take = backends.per_agent(lambda images, labels, i: (images[i], labels[i]), backend, k_count,
                              blocks=(0, 1))
    x, y = take(d.images, d.labels, idx)
  else:
    x, y = d.images[idx], d.labels[idx]
  x = data_lib.augment(augmentation, jax.random.fold_in(jax.random.fold_in(key, 1), step), x)
  return _normalise(x, d.mean, d.std), y


# --------------------------------------------------------------------------------------------
# The compiled programs.


class Programs(NamedTuple):
  """The jitted train step and evaluation functions of one static configuration."""

  train_step: Any  # (state, topology, data) -> (state, metrics)
  evaluate: Any  # (params, model_state, EvalSet) -> per-agent sums
  param_metrics: Any  # (params, model_state, alg_state, topology) -> dict


def build_programs(c: ml_collections.ConfigDict, model: models.Model,
                   alg: algorithms.Algorithm) -> Programs:
  """Jits the train step and the evaluation functions for config ``c``."""
  k_count, batch = c.num_agents, c.batch_size
  augmentation = data_lib.augmentation_for(c.augment, c.dataset)
  lift = functools.partial(backends.per_agent, backend=c.backend, num_agents=k_count,
                           chunk_size=c.chunk_size or None)

  def agent_loss(params, model_state, x, y):
    logits, new_state = model.apply({"params": params, **model_state}, x, True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, (acc, new_state)

  def agent_grads(params, model_state, x, y):
    (loss, (acc, new_state)), grads = jax.value_and_grad(agent_loss, has_aux=True)(
        params, model_state, x, y)
    return loss, acc, new_state, grads

  lifted_grads = lift(agent_grads)
  fault_spec = faults.spec_from_config(c)
  state_sh = state_shardings(c, model, alg)

  def placed(tree, shardings=None):
    """``tree`` where the next step and the host expect it (what jit's out_shardings would do):
    with the ``shard`` back-end, [K] leaves stay split with their agents, scalars replicated."""
    if state_sh is None:
      return tree
    if shardings is None:
      shardings = backends.shardings(tree, c.backend, k_count)
    return jax.lax.with_sharding_constraint(tree, shardings)

  def train_step(state: TrainState, topology, d: DeviceData):
    x, y = draw_batch(state.key, state.step, d, batch, augmentation, c.backend)
    fault_metrics, step_kw, f = {}, {}, None
    if fault_spec is not None:  # a Python branch: no fault code in a fault-free program
      base = combine_lib.as_mixing(topology, state.alg_state.count)
      f = faults.sample(faults.stream_key(fault_spec.seed), state.step, base, fault_spec)
      topology, step_kw = f.mixing, {"active": f.active}
      fault_metrics = faults.counts(f, base)
    point = state.params
    if alg.grad_point is not None:
      point = alg.grad_point(state.params, state.alg_state, topology)
    loss, acc, model_state, grads = lifted_grads(point, state.model_state, x, y)
    params, alg_state = alg.step(state.params, grads, state.alg_state, topology, **step_kw)
    if f is not None:  # agents without a local step keep their statistics too
      model_state = faults.select(f.active, model_state, state.model_state)
    if c.combine_batch_stats and jax.tree.leaves(model_state):
      model_state = alg.combine_stats(model_state, alg_state, topology)
    if f is not None:  # a dropped agent's column is the identity; this makes it exact
      params = faults.select(f.alive, params, state.params)
      model_state = faults.select(f.alive, model_state, state.model_state)
    new = TrainState(params, model_state, alg_state, state.step + 1, state.key)
    return placed(new, state_sh), placed({"loss": loss, "acc": acc,
                                          "finite": agents_finite((params, model_state)),
                                          **fault_metrics})

  def agent_logits(params, model_state, x):
    return model.apply({"params": params, **model_state}, x, False)[0]

  lifted_logits = lift(agent_logits, shared=(2,))

  def evaluate(params, model_state, ev: EvalSet, mean, std):
    mean_params = metrics_lib.centroid(params)
    mean_state = metrics_lib.centroid(model_state)

    def body(carry, batch):
      x, y, mask = batch
      x = _normalise(x, mean, std)
      logits = lifted_logits(params, model_state, x)  # [K, B, C]
      probs = jax.nn.softmax(logits)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[None])
      correct = jnp.argmax(logits, -1) == y[None]
      c_logits = agent_logits(mean_params, mean_state, x)
      sums = {
          "correct": jnp.sum(jnp.where(mask[None], correct, False), axis=1),
          "loss": jnp.sum(jnp.where(mask[None], loss, 0.0), axis=1),
          "centroid_correct": jnp.sum(jnp.where(mask, jnp.argmax(c_logits, -1) == y, False)),
          "disagreement": metrics_lib.output_disagreement(probs, mask),
      }
      return jax.tree.map(jnp.add, carry, sums), None

    zero = {"correct": jnp.zeros(k_count, jnp.int32), "loss": jnp.zeros(k_count),
            "centroid_correct": jnp.zeros((), jnp.int32), "disagreement": jnp.zeros(())}
    zero = jax.tree.map(lambda z: z.astype(jnp.float32), zero)
    sums, _ = jax.lax.scan(body, zero, (ev.images, ev.labels, ev.mask))
    return placed(sums)

  drt_names_granularity = c.drt.granularity

  def param_metrics(params, model_state, alg_state, topology):
    names = combine_lib.layer_names(params, "module")
    total, per_layer = metrics_lib.consensus_distance(params, names)
    out = {"consensus_distance": total,
           **{f"consensus/{p}": v for p, v in per_layer.items()}}
    if jax.tree.leaves(model_state):
      stats_names = combine_lib.layer_names(model_state, "module")
      out["stats_consensus_distance"] = metrics_lib.consensus_distance(model_state,
                                                                       stats_names)[0]
    if k_count > 1 and c.algorithm != "local":
      mix = combine_lib.as_mixing(topology, jnp.maximum(alg_state.count - 1, 0))
      d_names = combine_lib.layer_names(params, drt_names_granularity)
      gamma = {p: jnp.ones(()) for p in combine_lib.unique_layers(d_names)}
      _, log1p_drt = drt_lib.weights(params, mix, d_names, gamma, eps=c.drt.eps)
      edge = (jnp.arange(mix.nbr_w.shape[1]) > 0)[None, :] & (mix.nbr_w > 0)
      n_edges = jnp.maximum(jnp.sum(edge), 1)
      out["drt_log1p_mean"] = jnp.sum(jnp.where(edge, log1p_drt, 0.0)) / n_edges
      out["drt_mean"] = jnp.sum(jnp.where(edge, jnp.expm1(log1p_drt), 0.0)) / n_edges
      if isinstance(alg_state, algorithms.DRTState):
        selfw = {p: jnp.mean(w[:, 0]) for p, w in alg_state.layer_w.items()}
        out.update({f"self_weight/{p}": v for p, v in selfw.items()})
        out["self_weight_mean"] = sum(selfw.values()) / len(selfw)
      else:
        out["self_weight_mean"] = jnp.mean(mix.nbr_w[:, 0])
    return out

  if state_sh is None:  # one device: placement is JAX's default
    return Programs(jax.jit(train_step, donate_argnums=(0,)), jax.jit(evaluate),
                    jax.jit(param_metrics))
  # On the agents mesh the inputs must already be where the step computes: stacked leaves and
  # the devices' blocks of examples split over it, the graph and the normalisation whole on every
  # device (the outputs are placed).
  split, whole = backends.split(c.backend, k_count), backends.replicated(c.backend, k_count)
  data_sh = DeviceData(images=split, labels=split, idx=split, counts=split, mean=whole, std=whole)
  step = jax.jit(train_step, donate_argnums=(0,), in_shardings=(state_sh, whole, data_sh))
  return Programs(step, jax.jit(evaluate), jax.jit(param_metrics))


def state_shardings(c, model: models.Model, alg: algorithms.Algorithm, topology=None):
  """Where each leaf of the train state lives (None without the ``shard`` back-end).

  Stacked leaves are split over the agents mesh, the step and the sampling key replicated; found
  from the state's shapes (``jax.eval_shape``), so nothing is computed.
  """
  if backends.resolve(c.backend, c.num_agents) != "shard":
    return None
  topology = make_topology(c) if topology is None else topology
  shapes = jax.eval_shape(functools.partial(_init_state, c, model, alg, topology))
  return backends.shardings(shapes, c.backend, c.num_agents)


_PROGRAM_CACHE: dict = {}


def _static_key(c: ml_collections.ConfigDict, model_obj) -> str:
  """The config fields that change the compiled programs (hyperparameters in the state do not)."""
  d = c.to_dict()
  for traced in ("learning_rate", "momentum", "weight_decay", "seed", "num_steps", "eval_every",
                 "log_every", "lazy", "self_weight", "topology", "topology_options",
                 "topology_weights", "same_init", "eval_examples", "train_eval_examples",
                 "data_dir", "download", "data_source", "validation_fraction", "partition",
                 "dirichlet_alpha", "classes_per_agent", "min_per_agent", "checkpoint_every",
                 "keep_checkpoints"):
    d.pop(traced, None)
  if faults.spec_from_config(c) is None:
    d.pop("faults")  # absent from the program
  d["drt"].pop("strength", None)
  d["augment"] = data_lib.augmentation_for(d["augment"], d.pop("dataset"))
  d["model_id"] = id(model_obj) if model_obj is not None else None
  return json.dumps(d, sort_keys=True, default=str)


def programs_for(c, model, alg, model_obj=None) -> Programs:
  """The compiled programs of ``c`` for ``model`` (a :class:`drt_jax.models.Model`), built once
  per process for each set of static fields, input shape and class count."""
  key = json.dumps([_static_key(c, model_obj), list(model.input_shape), model.num_classes])
  if key not in _PROGRAM_CACHE:
    _PROGRAM_CACHE[key] = build_programs(c, model, alg)
  return _PROGRAM_CACHE[key]


# --------------------------------------------------------------------------------------------
# Host side.


def _eval_set(images, labels, n: int, batch: int, seed: int) -> EvalSet:
  if n and n < len(labels):
    pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    images, labels = images[pick], labels[pick]
  batch = min(batch, len(labels))
  num_batches = -(-len(labels) // batch)
  pad = num_batches * batch - len(labels)
  mask = np.concatenate([np.ones(len(labels), bool), np.zeros(pad, bool)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  shape = (num_batches, batch)
  return EvalSet(images.reshape(shape + images.shape[1:]), labels.reshape(shape).astype(np.int32),
                 mask.reshape(shape))


def load_data(c: ml_collections.ConfigDict) -> data_lib.Data:
  """The dataset ``config.dataset`` names, in host memory (``synthetic`` or a tfds name)."""
  if c.dataset == "synthetic":
    return data_lib.synthetic(seed=c.seed)
  return datasets.load(c.dataset, data_dir=c.data_dir or None, download=c.download,
                       source=c.data_source)


class Prepared(NamedTuple):
  """The data of one run, on the host: what trains, who holds what, and the held-out split."""

  data: data_lib.Data  # training split without the validation examples
  parts: list  # one sorted index array into data.train_labels per agent
  validation: tuple | None  # (images, labels) or None


def prepare_data(c: ml_collections.ConfigDict, d: data_lib.Data) -> Prepared:
  """Holds out the validation split and partitions the rest across the agents (config fields
  ``validation_fraction``, ``partition``, ``dirichlet_alpha``, ``classes_per_agent``,
  ``min_per_agent``), unless ``d`` brings its own ``agent_indices``. Checks every agent can fill a
  batch. Raises ValueError with one line naming the problem.
  """
  validation = None
  if c.validation_fraction > 0:
    if d.agent_indices is not None:
      raise ValueError("config.validation_fraction > 0 but the data bring their own "
                       "agent_indices (into the full training split); hold out the validation "
                       "examples before partitioning, or set validation_fraction=0")
    d, validation = datasets.validation_split(d, c.validation_fraction, seed=c.seed)
  parts = d.agent_indices
  if parts is None:
    n = len(d.train_labels)
    if c.num_agents > n:
      raise ValueError(f"num_agents={c.num_agents} but {d.name} has only {n} training examples; "
                       "use fewer agents or more data")
    minimum = c.min_per_agent or max(partition.default_min_per_agent(n, c.num_agents),
                                     min(c.batch_size, n // c.num_agents))
    parts = partition.make(c.partition, d.train_labels, c.num_agents, seed=c.seed,
                           alpha=c.dirichlet_alpha, classes_per_agent=c.classes_per_agent,
                           min_per_agent=minimum)
  parts = [np.asarray(p) for p in parts]
  if len(parts) != c.num_agents:
    raise ValueError(f"data has index lists for {len(parts)} agents but config.num_agents="
                     f"{c.num_agents}; give one index array per agent")
  counts = np.array([len(p) for p in parts])
  data_lib.check_batch(counts, c.batch_size)
  return Prepared(d, parts, validation)


def device_data(d: data_lib.Data, parts, backend: str = "vmap") -> DeviceData:
  """The training examples on the device with the agents' padded index lists (:class:`DeviceData`).

  With the ``shard`` back-end each device holds only the union of its agents' examples, padded to
  the largest device's count, and each process builds only its own devices' blocks and agents'
  lists; the normalisation (of the whole split, so results do not depend on the devices) is
  replicated. Otherwise the whole split is on the device once.
  """
  k_count, n_examples = len(parts), len(d.train_labels)
  width, counts = data_lib.padded_width(parts, n_examples)
  groups = backends.agent_blocks(backend, k_count)
  if len(groups) == 1:
    held = [np.arange(n_examples)]
  else:
    held = [np.unique(np.concatenate([np.asarray(p) for p in parts[a:b]])) for a, b in groups]
  m = max(len(h) for h in held)
  per = groups[0][1] - groups[0][0]
  labels = np.asarray(d.train_labels, np.int32)

  def rows(start, stop):
    local = [np.searchsorted(held[start // per], p) for p in parts[start:stop]]
    return data_lib.pad_partition(local, m, width=width)[0]

  def block(array):
    def one(j):
      if len(groups) == 1:
        return array
      pad = np.zeros((m - len(held[j]), *array.shape[1:]), array.dtype)
      return np.concatenate([array[held[j]], pad])

    return backends.device_blocks(one, (m, *array.shape[1:]), backend, k_count)

  mean, std = data_lib.normalisation(d.train_images)
  stats = backends.place(dict(mean=mean, std=std), backend, k_count, stacked=False)
  return DeviceData(images=block(d.train_images), labels=block(labels),
                    idx=backends.from_agent_rows(rows, (k_count, width), backend, k_count),
                    counts=backends.from_agent_rows(lambda a, b: counts[a:b], (k_count,),
                                                    backend, k_count),
                    **stats)


def _data_digest(prepared: Prepared) -> str:
  """Names the training data, its shapes and a hash of its images, labels and agents' lists."""
  d = prepared.data
  h = hashlib.sha256()
  for a in (d.train_images, d.test_images, d.train_labels, d.test_labels, *prepared.parts):
    h.update(np.ascontiguousarray(a).tobytes())
  return f"{d.name} {d.train_images.shape} {d.test_images.shape} {h.hexdigest()}"


def device_bytes(tree) -> int:
  """Bytes that the arrays of ``tree`` occupy on this process's devices (every replica counted)."""
  return sum(bytes_per_device(tree).values())


def bytes_per_device(tree) -> dict:
  """Bytes that the arrays of ``tree`` occupy on each of this process's devices."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def init_state(c, model: models.Model, alg: algorithms.Algorithm, topology) -> TrainState:
  """Stacked variables (one shared initialisation unless ``same_init`` is off) and states.

  Built by one jitted program whose outputs land where the step wants them: with the ``shard``
  back-end every stacked leaf is created split over the agents mesh (its shape found with
  ``jax.eval_shape``), so the K copies are never materialised whole on one device, and over
  several processes each process computes only its own agents.
  """
  build = functools.partial(_init_state, c, model, alg, topology)
  return jax.jit(build, out_shardings=state_shardings(c, model, alg, topology))()


def _init_state(c, model, alg, topology) -> TrainState:
  root = jax.random.key(c.seed)
  k_init, k_sample = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  if c.same_init:
    variables = _stack(model.init(k_init), c.num_agents)
  else:
    variables = jax.vmap(model.init)(jax.random.split(k_init, c.num_agents))
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(params, model_state, alg.init(params, topology), jnp.zeros((), jnp.int32),
                    k_sample)


def check_workdir(workdir, c: ml_collections.ConfigDict, overwrite: bool = False) -> bool:
  """Refuses a workdir that holds a run of a different config, unless ``overwrite``.

  A workdir with the same config (a rerun) is accepted: it resumes from its latest checkpoint if
  it has one (:mod:`drt_jax.checkpoint`), else its files are replaced. Returns whether the workdir
  holds a run of the same config (False with ``overwrite``, which starts afresh).
  """
  path = os.path.join(workdir, "config.json") if workdir else None
  if overwrite or not path or not os.path.exists(path):
    return False
  with open(path) as f:
    try:
      old = json.load(f)
    except json.JSONDecodeError:
      old = {}
  new = json.loads(c.to_json())
  if old != new:
    flat_old, flat_new = _flatten(old), _flatten(new)
    field = next(k for k in sorted(set(flat_old) | set(flat_new))
                 if flat_old.get(k, "<absent>") != flat_new.get(k, "<absent>"))
    was, now = flat_old.get(field, "<absent>"), flat_new.get(field, "<absent>")
    raise ValueError(f"workdir {workdir} holds a run of a different config ({field}: {was!r} "
                     f"there, {now!r} now); use another workdir or overwrite (overwrite=True, "
                     "--overwrite)")
  return True


def check_writable(workdir) -> None:
  """Raises ValueError (one line) if ``workdir`` cannot be created or written; creates nothing."""
  if not workdir:
    return
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"workdir {workdir} cannot be created: {probe} is a file; choose another "
                     "workdir")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir} is not writable ({probe} denies writing); choose "
                     "another workdir")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def read_metrics(workdir, up_to: int | None = None) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` in step order, one per step (the first kept).

  Rows after ``up_to`` and a torn last line (a run killed while writing) are left out.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  rows, seen = [], set()
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      step = row.get("step") if isinstance(row, dict) else None
      if not isinstance(step, int) or step in seen or (up_to is not None and step > up_to):
        continue
      seen.add(step)
      rows.append(row)
  return sorted(rows, key=lambda r: r["step"])


class _Writer:
  """metrics.jsonl and config.json in the workdir (nothing is written without one).

  ``rows`` (a resumed run's rows up to its checkpoint) replace the file's contents, atomically.
  """

  def __init__(self, workdir, c, prepared: Prepared | None = None, rows: list | None = None):
    self.path = None
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json(indent=2, sort_keys=True))
      if prepared is not None:
        partition.save(prepared.parts, os.path.join(workdir, "partition.npz"))
        hist = partition.label_histogram(prepared.parts, prepared.data.train_labels,
                                         prepared.data.classes)
        partition.plot_histogram(hist, os.path.join(workdir, "partition.png"),
                                 f"{prepared.data.name}: {c.partition} partition over "
                                 f"K={c.num_agents} agents")
      self.path = os.path.join(workdir, "metrics.jsonl")
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows or ())
      os.replace(tmp, self.path)

  def write(self, row):
    if self.path:
      clean = {k: (v if not isinstance(v, float) or np.isfinite(v) else None)
               for k, v in row.items()}
      with open(self.path, "a") as f:
        f.write(json.dumps(clean) + "\n")


def _megabytes(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def check_finite(step_metrics: list[dict], first_step: int) -> None:
  """Raises FloatingPointError at the first step whose loss or parameters are not finite.

  ``step_metrics`` are the host copies of consecutive steps' metrics, the first of step
  ``first_step``; the message is one line naming the step and the agents.
  """
  for i, m in enumerate(step_metrics):
    bad_loss = np.flatnonzero(~np.isfinite(np.asarray(m["loss"])))
    bad_params = np.flatnonzero(~np.asarray(m["finite"], bool))
    if bad_loss.size or bad_params.size:
      what = []
      if bad_loss.size:
        what.append(f"training loss on agents {bad_loss.tolist()}")
      if bad_params.size:
        what.append(f"parameters on agents {bad_params.tolist()}")
      raise FloatingPointError(f"non-finite {' and '.join(what)} at step {first_step + i}; "
                               "lower learning_rate or check the data")


_HOST_METRICS = ("loss", "acc", "dropped_agents", "failed_links", "stragglers")


def _buffer_to_json(buf: dict) -> dict:
  return {k: {"dtype": str(np.asarray(v[0]).dtype), "values": [np.asarray(x).tolist() for x in v]}
          for k, v in buf.items() if v}


def _buffer_from_json(record: dict) -> dict:
  return {k: [np.asarray(x, v["dtype"]) for x in v["values"]] for k, v in record.items()}


def train_and_evaluate(config=None, workdir: str | None = None, data=None, *,
                       model: models.Model | None = None, overwrite: bool = False) -> list[dict]:
  """Trains K agents and returns the history: one dict of metrics per evaluation.

  Args:
    config: a ConfigDict or dict overriding :func:`drt_jax.config.default_config`.
    workdir: if given, ``config.json`` and ``metrics.jsonl`` are written there, and checkpoints
      into ``checkpoints/`` every ``config.checkpoint_every`` steps. A workdir holding a checkpoint
      of the same config resumes from its latest checkpoint (the history then includes the rows
      written before it); see :mod:`drt_jax.checkpoint`.
    data: in-memory data (:class:`drt_jax.data.Data` or a mapping with its fields: train/test
      images and labels and, optionally, ``agent_indices``, one index array per agent). Without it
      ``config.dataset`` is loaded.
    model: a :class:`drt_jax.models.Model` (e.g. ``models.from_flax(module, shape, classes)``)
      instead of ``config.model``.
    overwrite: replace a run of a different config in ``workdir`` (otherwise refused); starts
      afresh and deletes the old checkpoints.

  Raises:
    FloatingPointError: a training loss or an agent's parameters became NaN or Inf (one line
      naming the first such step and the agents); no checkpoint of that state is written.

  Example::

    history = train_and_evaluate({"algorithm": "drt", "num_agents": 8, "num_steps": 100})
    history[-1]["test_acc_mean"]
  """
  c = config_lib.resolve(config)
  distributed.check_agreement({"config": config_lib.shared_json(c)},
                              "start every process with the same config and overrides")

  def check_on_main():  # process 0 reads and writes the workdir; the others learn its answer
    check_writable(workdir)
    return check_workdir(workdir, c, overwrite)

  same_run = distributed.on_main(check_on_main)
  d = data_lib.as_data(data) if data is not None else load_data(c)
  prepared = prepare_data(c, d)
  d = prepared.data
  digest = None  # hashed only where processes compare it or checkpoints carry it
  if jax.process_count() > 1:
    digest = _data_digest(prepared)
    distributed.check_agreement({"data": digest},
                                "give every process the same dataset (and agent_indices)")
  backends.check(c.backend, c.num_agents, c.chunk_size or None)
  topo = make_topology(c)
  net = model if model is not None else make_model(c, d)
  alg = make_algorithm(c)
  progs = programs_for(c, net, alg, model)

  dev = device_data(d, prepared.parts, c.backend)  # each process builds its agents' lists
  counts = np.array([len(p) for p in prepared.parts])
  eval_sets = {"test": _eval_set(d.test_images, d.test_labels, c.eval_examples,
                                 c.eval_batch_size, c.seed),
               "train": _eval_set(d.train_images, d.train_labels, c.train_eval_examples,
                                  c.eval_batch_size, c.seed + 1)}
  if prepared.validation is not None:
    eval_sets["val"] = _eval_set(*prepared.validation, c.eval_examples, c.eval_batch_size,
                                 c.seed + 2)
  sizes = {k: int(np.sum(np.asarray(v.mask))) for k, v in eval_sets.items()}

  state = init_state(c, net, alg, topo)  # created with the step's shardings
  bad = np.flatnonzero(~backends.to_host(agents_finite(state.params)))
  if bad.size:
    raise ValueError(f"the initial parameters are not finite on agents {bad.tolist()}; check "
                     "the model's initialisers")
  place = functools.partial(backends.place, backend=c.backend, num_agents=c.num_agents,
                            stacked=False)
  topo = dataclasses.replace(topo, **place({"nbr_idx": topo.nbr_idx, "nbr_w": topo.nbr_w}))
  eval_sets = place(eval_sets)
  shared = (state.params, state.model_state) if c.combine_batch_stats else state.params
  bytes_sent = metrics_lib.bytes_per_agent_step(topo, metrics_lib.tree_bytes(shared),
                                                c.comm_every, c.algorithm != "local")

  def resume_on_main():
    step = checkpoint_lib.latest_step(workdir) if same_run else None
    if workdir and step is None:
      checkpoint_lib.delete(workdir)  # a fresh start keeps no checkpoint of another run
    return step

  resume_step = distributed.on_main(resume_on_main)
  ckpt = None
  if workdir and (c.checkpoint_every or resume_step is not None):
    ckpt = checkpoint_lib.Checkpoints(workdir, c.keep_checkpoints)
    digest = digest or _data_digest(prepared)
  rows, host = [], {}
  if resume_step is not None:
    state, host = ckpt.restore(state, resume_step)
    if int(state.step) != resume_step:
      raise ValueError(f"checkpoint {resume_step} in {ckpt.path} holds step {int(state.step)}; "
                       "remove the checkpoints folder or use overwrite")
    if host.get("data", digest) != digest:  # same config, other data: not the same run
      raise ValueError(f"checkpoint {resume_step} in {ckpt.path} was trained on other data "
                       f"({host['data'][:60]}...; now {digest[:60]}...); pass that data, or "
                       "overwrite=True (--overwrite) to start afresh")
    rows = read_metrics(workdir, up_to=resume_step)
    logging.info("workdir %s: resuming from the checkpoint of step %d (%d metric rows kept)",
                 workdir, resume_step, len(rows))
  elif same_run:
    logging.warning("workdir %s holds a run of the same config without a checkpoint; replacing "
                    "it", workdir)
  # Process 0 alone writes config, partition and metrics (it rewrites metrics.jsonl with the
  # same rows the others have read, atomically, so no process reads a half-written file).
  writer = _Writer(workdir if distributed.is_main() else None, c, prepared, rows)
  logging.info("data %s: %d training examples over %d agents (%s partition, %d-%d each), "
               "%s on device", d.name, len(d.train_labels), c.num_agents, c.partition,
               counts.min(), counts.max(), _megabytes(device_bytes(dev)))
  resolved = backends.resolve(c.backend, c.num_agents)
  used = backends.mesh_size(c.num_agents) if resolved == "shard" else 1
  logging.info("devices: %s; backend %s -> %s on %d of them", jax.devices(), c.backend, resolved,
               used)
  if hint := backends.host_memory_hint():
    logging.info(hint)
  if c.model in models.CONV_MODELS:  # 'auto' depends on the platform and the agents per device
    logging.info("convolutions: conv %s -> %s", c.conv, conv_formulation(c))
  mine = backends.local_agents(dev.idx)
  span = f"{mine[0]}-{mine[-1]}" if mine == list(range(mine[0], mine[-1] + 1)) else str(mine)
  logging.info("process %d of %d holds agents %s (their examples and index lists) on %d devices",
               jax.process_index(), jax.process_count(), span,
               len({s.device for s in dev.idx.addressable_shards}))
  logging.info("topology %s (slem %.4f); algorithm %s; K=%d", topo, topo.slem(), c.algorithm,
               c.num_agents)

  first = resume_step or 0
  history = list(rows)
  # Per-step metrics since the last evaluation: pulled from the device at evaluations, log lines
  # and checkpoints (never every step), checked for NaN/Inf, then kept on the host.
  buf = _buffer_from_json(host.get("metrics", {}))
  pending, pending_from = [], first + 1
  last_time = time.perf_counter()  # the first rate counts this process's steps and time alone
  start = last_time - float(host.get("wall_time", 0.0))  # wall_time runs on across a resume
  last_step = first

  def pull():
    nonlocal pending, pending_from
    # One gather per metric for all pending steps ([K] metrics stay split with their agents).
    stacked = backends.to_host(jax.tree.map(lambda *steps: jnp.stack(steps), *pending))
    got = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(pending))]
    check_finite(got, pending_from)
    for m in got:
      for k in _HOST_METRICS:
        if k in m:
          buf.setdefault(k, []).append(np.asarray(m[k]))
    pending_from += len(pending)
    pending = []

  def mean_of(name):
    return float(np.mean(buf[name])) if buf.get(name) else None

  def evaluate(step):
    nonlocal last_time, last_step, buf
    sums = {name: backends.to_host(progs.evaluate(state.params, state.model_state, ev, dev.mean,
                                                  dev.std)) for name, ev in eval_sets.items()}
    pm = backends.to_host(progs.param_metrics(state.params, state.model_state, state.alg_state,
                                              topo))
    test, n_test = sums["test"], sizes["test"]
    test_acc = test["correct"] / n_test
    train_acc = sums["train"]["correct"] / sizes["train"]
    now = time.perf_counter()
    row = {
        "step": step,
        "epoch": step * c.batch_size / float(np.mean(counts)),
        "train_loss": mean_of("loss"),
        "train_batch_acc": mean_of("acc"),
        "test_acc_mean": float(np.mean(test_acc)),
        "test_acc_min": float(np.min(test_acc)),
        "test_acc_max": float(np.max(test_acc)),
        "test_acc_per_agent": [round(float(a), 6) for a in test_acc],
        "test_loss_mean": float(np.mean(test["loss"]) / n_test),
        "centroid_test_acc": float(test["centroid_correct"] / n_test),
        "train_acc_mean": float(np.mean(train_acc)),
        "gen_gap": float(np.mean(train_acc) - np.mean(test_acc)),
        "output_disagreement": float(test["disagreement"] / n_test),
        **({"val_acc_mean": float(np.mean(sums["val"]["correct"]) / sizes["val"]),
            "val_loss_mean": float(np.mean(sums["val"]["loss"]) / sizes["val"]),
            "centroid_val_acc": float(sums["val"]["centroid_correct"] / sizes["val"])}
           if "val" in sums else {}),
        **({k: mean_of(k) for k in ("dropped_agents", "failed_links", "stragglers")}
           if faults.spec_from_config(c) is not None else {}),
        "bytes_per_agent_step": bytes_sent,
        "steps_per_sec": (step - last_step) / max(now - last_time, 1e-9),
        "wall_time": now - start,
        **{k: float(v) for k, v in pm.items()},
    }
    last_time, last_step, buf = now, step, {}
    history.append(row)
    writer.write(row)
    eta = f"{(c.num_steps - step) / max(row['steps_per_sec'], 1e-9):.0f}s" if step else "-"
    logging.info("step %d/%d | test acc %.4f (centroid %.4f) | gap %.4f | consensus %.3g | "
                 "disagreement %.3g | %.1f steps/s, ETA %s", step, c.num_steps,
                 row["test_acc_mean"], row["centroid_test_acc"], row["gen_gap"],
                 row["consensus_distance"], row["output_disagreement"], row["steps_per_sec"],
                 eta)

  def is_eval(step):
    return step in (0, c.num_steps) or bool(c.eval_every and step % c.eval_every == 0)

  # Step 0, or a checkpoint whose row did not reach the disk. Process 0's metrics decide: an
  # evaluation is collective, and another host may not see the same metrics file.
  evaluate_first = distributed.on_main(
      lambda: is_eval(first) and not any(r["step"] == first for r in history))
  try:
    if evaluate_first:
      evaluate(first)
    for step in range(first + 1, c.num_steps + 1):
      state, m = progs.train_step(state, topo, dev)
      pending.append(m)
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
      logs = bool(c.log_every and step % c.log_every == 0)
      saves = ckpt is not None and bool(c.checkpoint_every) and (
          step % c.checkpoint_every == 0 or step == c.num_steps)
      if logs or saves or is_eval(step):
        pull()
      if logs:
        logging.info("step %d/%d | train loss %.4f", step, c.num_steps,
                     float(np.mean(buf["loss"][-1])))
      if is_eval(step):
        evaluate(step)
      if saves:  # after the row of this step, so a checkpoint never runs ahead of the metrics
        ckpt.save(step, state, {"step": step, "metrics": _buffer_to_json(buf),
                                "wall_time": time.perf_counter() - start, "data": digest})
  finally:
    if ckpt is not None:
      ckpt.close()
  return history
