"""Config fields to objects, in one place: the binaries and ``train_and_evaluate`` share it.

The library itself takes objects -- an optax transformation, a :class:`drt_jax.topology.Topology`,
an algorithm with ``init``/``step``, a :class:`drt_jax.models.Model` -- and a config names them by
strings. :func:`objects` builds the ones a caller did not give from the config; :func:`record`
writes into the config what was used, so that a workdir's ``config.json`` says it (a name, or
``custom`` with a short description in ``config.custom``).
"""

import json
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections
import optax

from drt_jax import algorithms, backends, faults, models
from drt_jax import data as data_lib
from drt_jax import step as step_lib
from drt_jax import topology as topology_lib

# The config fields an object given to train_and_evaluate stands in for.
OBJECT_FIELDS = ("model", "optimizer", "topology", "algorithm")


def optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``config.optimizer`` with its hyperparameters in its state (sweeps do not recompile)."""
  return algorithms.local_optimizer(c.optimizer, c.learning_rate, c.momentum, c.weight_decay,
                                    c.schedule, c.num_steps)


def algorithm(c: ml_collections.ConfigDict,
              local_optimizer: optax.GradientTransformation | None = None):
  """``config.algorithm`` around ``local_optimizer`` (default: :func:`optimizer` of ``c``)."""
  opt = optimizer(c) if local_optimizer is None else local_optimizer
  return algorithms.make(c.algorithm, opt, **algorithm_options(c))


# The algorithm options that have config fields of their own (the rest: config.algorithm_options).
DRT_FIELDS = ("strength", "floor", "eps", "granularity", "reference")


def algorithm_options(c: ml_collections.ConfigDict) -> dict:
  """The keyword options ``config.algorithm`` is built with: ``comm_every`` and the ``drt`` fields
  where the algorithm takes them, and ``config.algorithm_options``."""
  accepted = algorithms.options(c.algorithm)
  kw = {}
  if "comm_every" in accepted:
    kw["comm_every"] = c.comm_every
  kw.update({f: c.drt[f] for f in DRT_FIELDS if f in accepted})
  kw.update(c.algorithm_options.to_dict())
  return kw


def topology(c: ml_collections.ConfigDict) -> topology_lib.Topology:
  """``config.topology`` with its weights and options (the identity for ``local`` training)."""
  if c.algorithm == "local":
    return topology_lib.identity(c.num_agents)
  options = dict(c.topology_options)
  if c.lazy:
    options["lazy"] = c.lazy
  if c.self_weight:
    options["self_weight"] = c.self_weight
  return topology_lib.make(c.topology, c.num_agents, weights=c.topology_weights, seed=c.seed,
                           **options)


def model(c: ml_collections.ConfigDict, data: data_lib.Data) -> models.Model:
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


def step_spec(c: ml_collections.ConfigDict) -> step_lib.StepSpec:
  """The fields of ``c`` that shape the compiled step (:class:`drt_jax.step.StepSpec`)."""
  return step_lib.StepSpec(
      num_agents=c.num_agents, batch_size=c.batch_size,
      augmentation=data_lib.augmentation_for(c.augment, c.dataset), backend=c.backend,
      chunk_size=c.chunk_size or None, faults=faults.spec_from_config(c),
      combine_batch_stats=c.combine_batch_stats)


def describe(obj: Any) -> str:
  """A short, stable description of an object given in place of a config field."""
  if isinstance(obj, topology_lib.Topology):
    return repr(obj)
  if isinstance(obj, models.Model):
    name = obj.name or "Model"
    return f"{name}(input_shape={tuple(obj.input_shape)}, num_classes={obj.num_classes})"
  fn = getattr(obj, "init", None)
  where = getattr(fn, "__module__", "") or ""
  what = (getattr(fn, "__qualname__", "") or "").split(".<locals>")[0]
  package = where.split(".")[0]
  return f"{type(obj).__name__} ({package + ' ' if package else ''}{what or '?'})"


def check_objects(c: ml_collections.ConfigDict, **given) -> None:
  """Refuses objects that cannot stand in for their config fields, in one line each."""
  net, opt, topo, alg = (given.get(f) for f in OBJECT_FIELDS)
  if opt is not None and not (callable(getattr(opt, "init", None))
                              and callable(getattr(opt, "update", None))):
    raise ValueError(f"optimizer={opt!r} is not an optax GradientTransformation; pass one, e.g. "
                     "optax.sgd(0.1)")
  if alg is not None:
    if not (callable(getattr(alg, "init", None)) and callable(getattr(alg, "step", None))):
      raise ValueError(f"algorithm={type(alg).__name__} has no init and step functions; pass "
                       "one from drt_jax.algorithms.make or an object with init(params) and "
                       "step(params, grads, state, topology)")
    if opt is not None:
      raise ValueError("both an algorithm and an optimizer were given; an algorithm brings its "
                       "local optimizer (algorithms.make(name, optimizer)): pass one of them")
  if topo is not None:
    if not isinstance(topo, topology_lib.Topology):
      raise ValueError(f"topology={type(topo).__name__} is not a drt_jax.topology.Topology; "
                       "build one with topology.make or topology.from_matrices")
    if topo.num_agents != c.num_agents:
      raise ValueError(f"the topology has {topo.num_agents} agents but config.num_agents="
                       f"{c.num_agents}; make them equal")
  if net is not None and not isinstance(net, models.Model):
    raise ValueError(f"model={type(net).__name__} is not a drt_jax.models.Model; wrap a flax "
                     "module with models.from_flax(module, input_shape, num_classes)")


def record(c: ml_collections.ConfigDict, **given) -> ml_collections.ConfigDict:
  """``c`` with each field an object was given for set to ``'custom'`` and the object described
  in ``c.custom.<field>``; ``given`` maps :data:`OBJECT_FIELDS` to objects (None: not given)."""
  check_objects(c, **given)
  used = {f: obj for f, obj in given.items() if obj is not None}
  if not used:
    return c
  c = ml_collections.ConfigDict(c.to_dict())
  for field, obj in used.items():
    c[field] = "custom"
    c.custom[field] = describe(obj)
  return c


# objects() takes its objects by these names.
_build_model, _build_algorithm, _build_topology = model, algorithm, topology


class Objects(NamedTuple):
  """What a run trains with, and the keys its compiled programs are cached under."""

  model: models.Model
  topology: topology_lib.Topology
  algorithm: Any
  model_key: Hashable
  algorithm_key: Hashable


def objects(c: ml_collections.ConfigDict, data: data_lib.Data, *, model=None, optimizer=None,
            topology=None, algorithm=None) -> Objects:
  """The run's objects: those given, the others built from ``c`` (the config before
  :func:`record`). An object built from the config is keyed by the fields that shape its
  programs, so that a sweep's rebuilt objects share them; a given one by itself."""
  check_objects(c, model=model, optimizer=optimizer, topology=topology, algorithm=algorithm)
  if model is None:
    model = _build_model(c, data)
    model_key = ("config", c.model, json.dumps(c.model_options.to_dict(), sort_keys=True,
                                               default=str),
                 c.precision, conv_formulation(c), model.input_shape, model.num_classes)
  else:
    model_key = model
  if algorithm is None:
    # DRT's strength lives in the state (a traced scalar): sweeping it shares the programs.
    shaping = {k: v for k, v in algorithm_options(c).items() if k != "strength"}
    algorithm_key = ("config", c.algorithm, json.dumps(shaping, sort_keys=True, default=str),
                     c.optimizer if optimizer is None else optimizer)
    algorithm = _build_algorithm(c, optimizer)
  else:
    algorithm_key = algorithm
  if topology is None:
    topology = _build_topology(c)
  return Objects(model, topology, algorithm, model_key, algorithm_key)


def programs(c: ml_collections.ConfigDict, model: models.Model, alg) -> step_lib.Programs:
  """Freshly jitted programs of config ``c`` for ``model`` and ``alg`` (not cached)."""
  return step_lib.build_programs(step_spec(c), model, alg)


def init_state(c: ml_collections.ConfigDict, model: models.Model, alg,
               topology) -> step_lib.TrainState:
  """The initial train state of config ``c`` (its seed and ``same_init``)."""
  return step_lib.init_state(step_spec(c), model, alg, topology, seed=c.seed,
                             same_init=c.same_init)
