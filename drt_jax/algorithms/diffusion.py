"""The diffusion family: ATC, CTA, DSGD, local training and DRT diffusion (see
:mod:`drt_jax.algorithms` for the recursions).

ATC, CTA and DSGD take ``aggregation`` (with ``clip_radius`` and ``trim``): the combine step
``sum_l c_lk x_l`` is then one of the robust rules of :mod:`drt_jax.robust` (clipped gossip,
coordinate-wise trimmed mean or median over the neighbourhood), for the parameters and for the
statistics of ``combine_stats`` alike. The default, ``mean``, is the weighted combine.
"""

import jax
import jax.numpy as jnp
import optax

from drt_jax import combine as combine_lib
from drt_jax import drt as drt_lib
from drt_jax import robust
from drt_jax.algorithms import base


def _diffusion(kind: str, opt: optax.GradientTransformation, comm_every: int,
               aggregation: str = "mean", clip_radius: float = 1.0,
               trim: int = 1) -> base.Algorithm:
  base.check_comm_every(comm_every)
  aggregate = robust.aggregator(aggregation, clip_radius=clip_radius, trim=trim)

  def init(params, topology=None):
    if kind != "local":  # every combining agent's weights must sum to one
      base.require_weights(topology, "columns", kind)
    if aggregation == "trimmed_mean":
      robust.check_neighbourhoods(topology, trim, kind)
    return base.DiffusionState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32))

  def mix(tree, state, topology):
    m = combine_lib.as_mixing(topology, state.count)
    return base.maybe(base.communicates(state.count, comm_every), comm_every,
                      lambda: aggregate(tree, m), lambda: tree)

  def grad_point(params, state, topology):
    return mix(params, state, topology)

  def step(params, grads, state, topology, active=None):
    if kind == "atc":
      psi, opt_state = base.local_update(opt, grads, state.opt_state, params, active)
      new = mix(psi, state, topology)
    elif kind == "cta":
      phi = mix(params, state, topology)
      new, opt_state = base.local_update(opt, grads, state.opt_state, phi, active)
    elif kind == "dsgd":
      updates, opt_state = jax.vmap(opt.update)(grads, state.opt_state, params)
      mixed = mix(params, state, topology)
      new = base.select(active, optax.apply_updates(mixed, updates), mixed)
      opt_state = base.select(active, opt_state, state.opt_state)
    else:  # local
      new, opt_state = base.local_update(opt, grads, state.opt_state, params, active)
    return new, base.DiffusionState(opt_state, state.count + 1)

  def combine_stats(stats, state, topology):
    if kind == "local":
      return stats
    prev = base.DiffusionState(state.opt_state, state.count - 1)  # the step that just ran
    return mix(stats, prev, topology)

  def metrics(params, state, topology):
    m = base.last_mixing(topology, state)
    return {"self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **base.graph_metrics(params, m)}

  if kind == "local":
    return base.Algorithm(init, step, None, combine_stats, None, lambda nbytes: 0.0)
  return base.Algorithm(init, step, grad_point if kind == "cta" else None, combine_stats,
                        metrics, base.every(comm_every))


def diffusion_atc(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
                  aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1):
  """Adapt-then-combine diffusion: a local step, then ``w_k <- sum_l c_lk psi_l``.

  Args:
    local_optimizer: optax transformation applied per agent.
    comm_every: combine every H-th step.
    aggregation: the combine rule, one of :data:`drt_jax.robust.AGGREGATIONS`: ``mean`` (the
      weighted combine above), ``clipped``, ``trimmed_mean`` or ``median``.
    clip_radius: tau of ``clipped`` gossip, a finite number > 0.
    trim: b of ``trimmed_mean``, an integer >= 0; every neighbourhood of the topology needs more
      than 2b members (refused at ``init``).
  """
  return _diffusion("atc", local_optimizer, comm_every, aggregation, clip_radius, trim)


def diffusion_cta(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
                  aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1):
  """Combine-then-adapt diffusion; gradients are taken at the combined point (``grad_point``).
  Options as :func:`diffusion_atc`'s."""
  return _diffusion("cta", local_optimizer, comm_every, aggregation, clip_radius, trim)


def dsgd(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
         aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1):
  """Decentralized SGD: ``w_k <- sum_l c_lk w_l + update(g_k(w_k))``. Options as
  :func:`diffusion_atc`'s."""
  return _diffusion("dsgd", local_optimizer, comm_every, aggregation, clip_radius, trim)


def local(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Local training: every agent runs the optimizer alone (``C = I``)."""
  return _diffusion("local", local_optimizer, comm_every)


def drt_diffusion(local_optimizer: optax.GradientTransformation, *, variant: str = "drt",
                  strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                  granularity: str = "module", reference: str = "init",
                  comm_every: int = 1) -> base.Algorithm:
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
  base.check_comm_every(comm_every)

  def init(params, topology=None):
    base.require_weights(topology, "columns", variant)
    names = combine_lib.layer_names(params, granularity)
    k_count = jax.tree.leaves(params)[0].shape[0]
    width = 1 if topology is None else combine_lib.as_mixing(topology).nbr_idx.shape[1]
    layer_w = {p: jnp.zeros((k_count, width), jnp.float32).at[:, 0].set(1.0)
               for p in combine_lib.unique_layers(names)}
    return base.DRTState(jax.vmap(local_optimizer.init)(params), jnp.zeros((), jnp.int32),
                    jnp.asarray(strength, jnp.float32), drt_lib.calibrate(params, names, eps),
                    layer_w)

  def gamma(state, psi, names):
    if reference == "current":
      sq = drt_lib.calibrate(psi, names, eps)
    else:
      sq = state.init_sq_norms
    return {p: state.strength * v for p, v in sq.items()}

  def step(params, grads, state, topology, active=None):
    psi, opt_state = base.local_update(local_optimizer, grads, state.opt_state, params, active)
    names = combine_lib.layer_names(psi, granularity)
    m = combine_lib.as_mixing(topology, state.count)

    def communicate():
      nbrs = combine_lib.neighbours(psi, m)  # one exchange for the distances and the combine
      layer_w, _ = drt_lib.weights(psi, m, names, gamma(state, psi, names), variant=variant,
                                   floor=floor, eps=eps, nbrs=nbrs)
      return combine_lib.combine_layers(psi, m, layer_w, names, nbrs), layer_w

    def stay():  # keeps the last weights for metrics; combine_stats knows nothing was mixed
      return psi, state.layer_w

    new, layer_w = base.maybe(base.communicates(state.count, comm_every), comm_every,
                              communicate, stay)
    return new, base.DRTState(opt_state, state.count + 1, state.strength,
                              state.init_sq_norms, layer_w)

  def combine_stats(stats, state, topology):
    prev = state.count - 1  # the step that just ran
    m = combine_lib.as_mixing(topology, prev)
    names = combine_lib.layer_names(stats, "module")
    eye = jnp.zeros_like(m.nbr_w).at[:, 0].set(1.0)
    per_leaf = base.stats_weights(names, state.layer_w, eye)
    leaves, treedef = jax.tree.flatten(stats)

    def mix():
      out = [combine_lib.combine(x, m._replace(nbr_w=w)) for x, w in zip(leaves, per_leaf)]
      return jax.tree.unflatten(treedef, out)

    return base.maybe(base.communicates(prev, comm_every), comm_every, mix, lambda: stats)

  def metrics(params, state, topology):
    selfw = {p: jnp.mean(w[:, 0]) for p, w in state.layer_w.items()}
    return {**{f"self_weight/{p}": v for p, v in selfw.items()},
            "self_weight_mean": sum(selfw.values()) / len(selfw),
            **base.graph_metrics(params, base.last_mixing(topology, state), granularity, eps)}

  return base.Algorithm(init, step, None, combine_stats, metrics, base.every(comm_every))
