r"""Decentralized learning algorithms as optax-shaped factories.

Each factory takes a local optimizer (any ``optax.GradientTransformation``, applied per agent with
its state kept local) and returns an :class:`Algorithm` of pure functions over stacked trees:

* ``init(params, topology=None) -> state``: pass the topology where the state is used under jit,
  so that its shapes (DRT keeps the last ``[K, D]`` weights per layer) are fixed from the start
* ``step(params, grads, state, topology, active=None) -> (params, state)``: one iteration for all
  K agents, with ``grads`` evaluated at ``grad_point(params, state, topology)`` (identity unless an
  algorithm says otherwise, as CTA does); the trainer honours the hook. ``active`` (bool ``[K]``,
  default all) names the agents that take their local step: the others keep their parameters and
  optimizer state through the adapt part and only combine (stragglers and dropped agents of
  :mod:`drt_jax.faults`).
* ``combine_stats(stats, state, topology) -> stats``: combines non-trained per-agent state
  (BatchNorm statistics) with the matrices the last step used; the trainer calls it when
  statistics are shared.
* ``metrics(params, state, topology) -> dict``: the algorithm's own diagnostics of the last step
  (scalars: self-weights, DRT statistics), evaluated by the trainer with the other metrics.
* ``message_bytes(nbytes) -> float``: the bytes an agent sends each out-neighbour per step on
  average, given the bytes of one agent's shared variables (``comm_every`` and compression
  included; 0 for an algorithm that never communicates).

Only ``init`` and ``step`` are required: the trainer takes any object with those two (a user's
own NamedTuple, say) and treats a missing ``grad_point``, ``metrics`` or ``message_bytes`` as
"gradients at the parameters", "no diagnostics" and "the parameters every step".

Recursions (``-mu g`` stands for one step of the local optimizer, ``c_lk`` the topology's weights,
columns summing to one; see :mod:`drt_jax.types`):

=================== ==========================================================================
``atc``             psi_k = w_k - mu g_k(w_k);            w_k <- sum_l c_lk psi_l
``cta``             phi_k = sum_l c_lk w_l;               w_k <- phi_k - mu g_k(phi_k)
``dsgd``            w_k <- sum_l c_lk w_l - mu g_k(w_k)   (Lian et al. 2017, arXiv 1705.09056)
``local``           w_k <- w_k - mu g_k(w_k)              (no communication)
``drt*``            psi_k as in ATC; w_k^(p) <- sum_l a_lk^(p) psi_l^(p) with per-layer,
                    per-step weights from :mod:`drt_jax.drt`
=================== ==========================================================================

With ``comm_every=H`` agents combine only on steps 0, H, 2H, ... and take local steps in between.
A time-varying topology is indexed by the step count kept in the state, so the compiled step
never changes.
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drt_jax import combine as combine_lib
from drt_jax import drt as drt_lib
from drt_jax.types import PyTree


class Algorithm(NamedTuple):
  """Pure functions of one decentralized algorithm (see the module docstring)."""

  init: Callable[..., Any]
  step: Callable[..., tuple[PyTree, Any]]
  grad_point: Callable[..., PyTree] | None = None
  combine_stats: Callable[..., PyTree] | None = None
  metrics: Callable[..., dict] | None = None
  message_bytes: Callable[[int], float] | None = None


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def local_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                    weight_decay: float = 0.0) -> optax.GradientTransformation:
  """A named local optimizer (one of :data:`OPTIMIZERS`) with its hyperparameters in its state
  (``optax.inject_hyperparams``), so that runs with other values share one compiled step.

  Any other optax transformation (a schedule, ``optax.chain``, clipping) can be passed to an
  algorithm's factory or to ``train_and_evaluate(optimizer=...)`` directly.
  """

  def build(learning_rate, weight_decay, momentum):
    if name == "adam":
      return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    if name == "adamw":
      return optax.adamw(learning_rate, weight_decay=weight_decay)
    trace = () if name == "sgd" else (optax.trace(momentum, nesterov=name == "nesterov"),)
    return optax.chain(optax.add_decayed_weights(weight_decay), *trace,
                       optax.scale_by_learning_rate(learning_rate))

  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
  return optax.inject_hyperparams(build)(learning_rate=learning_rate, weight_decay=weight_decay,
                                         momentum=momentum)


class DiffusionState(NamedTuple):
  """State of ATC, CTA, DSGD and local training."""

  opt_state: Any  # stacked local optimizer state
  count: jax.Array  # int32 scalar: steps taken


class DRTState(NamedTuple):
  """State of DRT diffusion."""

  opt_state: Any
  count: jax.Array
  strength: jax.Array  # rho, a traced scalar so that sweeping it does not recompile
  init_sq_norms: dict  # layer -> n_0^(p)^2
  layer_w: dict  # layer -> [K, D] weights of the last combine (for statistics and metrics)


def _select(active, new, old):
  """Per agent, ``new`` where ``active[k]`` else ``old``; ``new`` itself when ``active`` is None."""
  if active is None:
    return new

  def one(n, o):
    return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(one, new, old)


def _local_update(opt: optax.GradientTransformation, grads, opt_state, params, active=None):
  updates, new_opt_state = jax.vmap(opt.update)(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  return _select(active, new, params), _select(active, new_opt_state, opt_state)


def _communicates(count, comm_every: int):
  return count % comm_every == 0


def _maybe(pred, comm_every: int, true_fn: Callable, false_fn: Callable):
  """``true_fn()`` on communication steps; no branch at all when every step communicates."""
  if comm_every == 1:
    return true_fn()
  return jax.lax.cond(pred, true_fn, false_fn)


def check_comm_every(comm_every) -> None:
  """Raises ValueError unless ``comm_every`` is an integer >= 1."""
  if not isinstance(comm_every, int) or isinstance(comm_every, bool) or comm_every < 1:
    raise ValueError(f"comm_every={comm_every!r} must be an integer >= 1 (combine every H-th step)")


def _last_mixing(topology, state):
  """The weights the step that just ran used (the graph's, before any per-layer change)."""
  return combine_lib.as_mixing(topology, jnp.maximum(state.count - 1, 0))


def _graph_metrics(params, mixing, granularity="module", eps=1e-6) -> dict:
  """Mean DRT over the graph's edges (:func:`drt_jax.drt.edge_statistics`)."""
  names = combine_lib.layer_names(params, granularity)
  return drt_lib.edge_statistics(params, mixing, names, eps)


def _every(comm_every: int):
  def message_bytes(nbytes):
    return nbytes / comm_every

  return message_bytes


def _base(kind: str, opt: optax.GradientTransformation, comm_every: int) -> Algorithm:
  check_comm_every(comm_every)

  def init(params, topology=None):
    del topology  # only DRT's state depends on the graph's shape
    return DiffusionState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32))

  def mix(tree, state, topology):
    m = combine_lib.as_mixing(topology, state.count)
    return _maybe(_communicates(state.count, comm_every), comm_every,
                  lambda: combine_lib.combine(tree, m), lambda: tree)

  def grad_point(params, state, topology):
    return mix(params, state, topology)

  def step(params, grads, state, topology, active=None):
    if kind == "atc":
      psi, opt_state = _local_update(opt, grads, state.opt_state, params, active)
      new = mix(psi, state, topology)
    elif kind == "cta":
      phi = mix(params, state, topology)
      new, opt_state = _local_update(opt, grads, state.opt_state, phi, active)
    elif kind == "dsgd":
      updates, opt_state = jax.vmap(opt.update)(grads, state.opt_state, params)
      mixed = mix(params, state, topology)
      new = _select(active, optax.apply_updates(mixed, updates), mixed)
      opt_state = _select(active, opt_state, state.opt_state)
    else:  # local
      new, opt_state = _local_update(opt, grads, state.opt_state, params, active)
    return new, DiffusionState(opt_state, state.count + 1)

  def combine_stats(stats, state, topology):
    if kind == "local":
      return stats
    prev = DiffusionState(state.opt_state, state.count - 1)  # the step that just ran
    return mix(stats, prev, topology)

  def metrics(params, state, topology):
    m = _last_mixing(topology, state)
    return {"self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **_graph_metrics(params, m)}

  if kind == "local":
    return Algorithm(init, step, None, combine_stats, None, lambda nbytes: 0.0)
  return Algorithm(init, step, grad_point if kind == "cta" else None, combine_stats, metrics,
                   _every(comm_every))


def diffusion_atc(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Adapt-then-combine diffusion: a local step, then ``w_k <- sum_l c_lk psi_l``."""
  return _base("atc", local_optimizer, comm_every)


def diffusion_cta(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Combine-then-adapt diffusion; gradients are taken at the combined point (``grad_point``)."""
  return _base("cta", local_optimizer, comm_every)


def dsgd(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Decentralized SGD: ``w_k <- sum_l c_lk w_l + update(g_k(w_k))``."""
  return _base("dsgd", local_optimizer, comm_every)


def local(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Local training: every agent runs the optimizer alone (``C = I``)."""
  return _base("local", local_optimizer, comm_every)


def _stats_weights(stats_names, layer_w: dict, fallback):
  """The weights of each statistics leaf: its BatchNorm layer's, else ``fallback``.

  A statistics leaf ``batch_stats/Block_0/BatchNorm_0/mean`` belongs to module
  ``batch_stats/Block_0/BatchNorm_0``; leading collection names are dropped until the module
  matches a parameter layer (``Block_0/BatchNorm_0``, or its leaves with leaf granularity).
  """
  out = []
  for name in stats_names:
    parts = name.split("/")
    match = None
    for i in range(len(parts)):
      module = "/".join(parts[i:])
      match = layer_w.get(module)
      if match is None:
        match = next((w for p, w in layer_w.items() if p.startswith(module + "/")), None)
      if match is not None:
        break
    out.append(fallback if match is None else match)
  return out


def drt_diffusion(local_optimizer: optax.GradientTransformation, *, variant: str = "drt",
                  strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                  granularity: str = "module", reference: str = "init",
                  comm_every: int = 1) -> Algorithm:
  """DRT diffusion: ATC's local step, then a per-layer, per-step combination (:mod:`drt_jax.drt`).

  Args:
    local_optimizer: optax transformation applied per agent.
    variant: ``drt``, ``drt_symmetric`` or ``drt_normalized``.
    strength: rho in gamma^(p) = rho n^(p)^2 (kept in the state: sweeping it does not recompile).
    floor: the self-weight floor delta in [0, 1).
    eps: relative norm guard.
    granularity: ``module`` (default) or ``leaf`` layers.
    reference: n^(p) is the layer's norm at initialisation (``init``) or the agents' current mean
      norm (``current``), so that the strength does not fade as the weights grow.
    comm_every: combine every H-th step.
  """
  drt_lib.check_options(variant, floor, eps, strength, reference, granularity)
  check_comm_every(comm_every)

  def init(params, topology=None):
    names = combine_lib.layer_names(params, granularity)
    k_count = jax.tree.leaves(params)[0].shape[0]
    width = 1 if topology is None else combine_lib.as_mixing(topology).nbr_idx.shape[1]
    layer_w = {p: jnp.zeros((k_count, width), jnp.float32).at[:, 0].set(1.0)
               for p in combine_lib.unique_layers(names)}
    return DRTState(jax.vmap(local_optimizer.init)(params), jnp.zeros((), jnp.int32),
                    jnp.asarray(strength, jnp.float32), drt_lib.calibrate(params, names, eps),
                    layer_w)

  def gamma(state, psi, names):
    if reference == "current":
      sq = drt_lib.calibrate(psi, names, eps)
    else:
      sq = state.init_sq_norms
    return {p: state.strength * v for p, v in sq.items()}

  def step(params, grads, state, topology, active=None):
    psi, opt_state = _local_update(local_optimizer, grads, state.opt_state, params, active)
    names = combine_lib.layer_names(psi, granularity)
    m = combine_lib.as_mixing(topology, state.count)

    def communicate():
      nbrs = combine_lib.neighbours(psi, m)  # one exchange for the distances and the combine
      layer_w, _ = drt_lib.weights(psi, m, names, gamma(state, psi, names), variant=variant,
                                   floor=floor, eps=eps, nbrs=nbrs)
      return combine_lib.combine_layers(psi, m, layer_w, names, nbrs), layer_w

    def stay():  # keeps the last weights for metrics; combine_stats knows nothing was mixed
      return psi, state.layer_w

    new, layer_w = _maybe(_communicates(state.count, comm_every), comm_every, communicate, stay)
    return new, DRTState(opt_state, state.count + 1, state.strength, state.init_sq_norms,
                         layer_w)

  def combine_stats(stats, state, topology):
    prev = state.count - 1  # the step that just ran
    m = combine_lib.as_mixing(topology, prev)
    names = combine_lib.layer_names(stats, "module")
    eye = jnp.zeros_like(m.nbr_w).at[:, 0].set(1.0)
    per_leaf = _stats_weights(names, state.layer_w, eye)
    leaves, treedef = jax.tree.flatten(stats)

    def mix():
      out = [combine_lib.combine(x, m._replace(nbr_w=w)) for x, w in zip(leaves, per_leaf)]
      return jax.tree.unflatten(treedef, out)

    return _maybe(_communicates(prev, comm_every), comm_every, mix, lambda: stats)

  def metrics(params, state, topology):
    selfw = {p: jnp.mean(w[:, 0]) for p, w in state.layer_w.items()}
    return {**{f"self_weight/{p}": v for p, v in selfw.items()},
            "self_weight_mean": sum(selfw.values()) / len(selfw),
            **_graph_metrics(params, _last_mixing(topology, state), granularity, eps)}

  return Algorithm(init, step, None, combine_stats, metrics, _every(comm_every))


def _drt_variant(variant):
  def factory(local_optimizer, **kw):
    return drt_diffusion(local_optimizer, variant=variant, **kw)

  factory.__doc__ = f"DRT diffusion, variant ``{variant}`` (see :func:`drt_diffusion`)."
  return factory


ALGORITHMS = {
    "atc": diffusion_atc,
    "cta": diffusion_cta,
    "dsgd": dsgd,
    "local": local,
    "drt": _drt_variant("drt"),
    "drt_symmetric": _drt_variant("drt_symmetric"),
    "drt_normalized": _drt_variant("drt_normalized"),
}
NAMES = tuple(ALGORITHMS)


def make(name: str, local_optimizer: optax.GradientTransformation, **kw) -> Algorithm:
  """The algorithm ``name`` (one of :data:`NAMES`) around ``local_optimizer``.

  Example::

    alg = algorithms.make("drt", optax.sgd(0.1), strength=1.0)
    state = alg.init(params)                      # params: stacked, leading axis K
    params, state = alg.step(params, grads, state, topology.make("ring", K))
  """
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; expected one of: {', '.join(NAMES)}")
  if not (callable(getattr(local_optimizer, "init", None))
          and callable(getattr(local_optimizer, "update", None))):
    raise ValueError(f"local_optimizer={local_optimizer!r} is not an optax "
                     "GradientTransformation; pass one, e.g. optax.sgd(0.1)")
  unknown = sorted(set(kw) - set(options(name)))
  if unknown:
    raise ValueError(f"algorithm {name!r} takes no option {unknown[0]!r}; its options: "
                     f"{', '.join(options(name))}")
  return ALGORITHMS[name](local_optimizer, **kw)


def options(name: str) -> tuple[str, ...]:
  """The keyword options :func:`make` passes to algorithm ``name``."""
  fn = drt_diffusion if uses_drt(name) else ALGORITHMS[name]
  return tuple(n for n in inspect.signature(fn).parameters
               if n not in ("local_optimizer", "variant"))


def uses_drt(name: str) -> bool:
  return name.startswith("drt")

