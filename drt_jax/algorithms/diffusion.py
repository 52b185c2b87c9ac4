"""The diffusion family: ATC, CTA, DSGD, local training and DRT diffusion (see
:mod:`drt_jax.algorithms` for the recursions).

ATC, CTA and DSGD take ``aggregation`` (with ``clip_radius`` and ``trim``): the combine step
``sum_l c_lk x_l`` is then one of the robust rules of :mod:`drt_jax.robust` (clipped gossip,
coordinate-wise trimmed mean or median over the neighbourhood), for the parameters and for the
statistics of ``combine_stats`` alike. The default, ``mean``, is the weighted combine.

ATC, CTA and DSGD also take ``self_weights``, a static self-weight s_p per layer (the matched
control of DRT diffusion: each layer mixes as much as DRT's layer did on average, but with a fixed
pattern). Layer p is combined with the base weights rescaled around s_p (:func:`static_weights`):
a_kk^(p) = s_p and a_lk^(p) = c_lk (1 - s_p) / (1 - c_kk) for the neighbours, at every step from
that step's weights, so time-varying graphs and simulated faults carry over.

DRT diffusion takes two ablations: ``layerwise=False`` (one matrix for the whole model, the
parameter-weighted mean of the per-layer DRT matrices) and ``freeze_after=N`` (the weights of step
N, counted from one, kept from then on: DRT's pattern without its time variation).
"""

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drt_jax import combine as combine_lib
from drt_jax import drt as drt_lib
from drt_jax import robust
from drt_jax.algorithms import base
from drt_jax.topology import Topology
from drt_jax.types import Mixing


def static_weights(mixing: Mixing, s: float) -> jax.Array:
  """The step's base weights with every agent's self-weight set to ``s``: ``[K, D]``.

  Slot 0 becomes ``s``; each neighbour's weight c_lk is scaled by ``(1 - s) / sum_{l != k} c_lk``
  (that sum is 1 - c_kk where the columns sum to one; taking it from the neighbours' weights keeps
  each column's sum at one to float32 rounding). An agent without a neighbour at this step (no
  positive off-diagonal weight) keeps its weights. As :meth:`drt_jax.topology.Topology.
  with_self_weight` does on the host, but inside the step, per layer.
  """
  c = mixing.nbr_w
  off = c[:, 1:]
  mass = jnp.sum(off, axis=1)
  has = mass > 0
  scale = jnp.where(has, (1.0 - s) / jnp.where(has, mass, 1.0), 1.0)
  self_w = jnp.where(has, jnp.asarray(s, c.dtype), c[:, 0])
  return jnp.concatenate([self_w[:, None], off * scale[:, None].astype(c.dtype)], axis=1)


def _check_self_weights(self_weights, kind: str, aggregation: str) -> dict | None:
  """``self_weights`` as a dict layer -> float, or None; one-line refusals of bad values."""
  if self_weights is None:
    return None
  if hasattr(self_weights, "to_dict"):  # an ml_collections ConfigDict
    self_weights = self_weights.to_dict()
  if not isinstance(self_weights, Mapping) or not self_weights:
    raise ValueError(f"{kind} self_weights={self_weights!r} is not a mapping of layer names to "
                     "self-weights; pass one entry per layer, e.g. {'Conv_0': 0.4, "
                     "'Dense_0': 0.2}, or None")
  for p, s in self_weights.items():
    if not isinstance(p, str):
      raise ValueError(f"{kind} self_weights key {p!r} is not a layer name; use the names of "
                       "combine.layer_names(params, 'module'), e.g. 'Conv_0'")
    if (not isinstance(s, numbers.Real) or isinstance(s, bool) or not np.isfinite(s)
        or not 0.0 < s <= 1.0):
      raise ValueError(f"{kind} self_weights[{p!r}]={s!r} is not accepted; expected a "
                       "self-weight in (0, 1], e.g. 0.3")
  if aggregation != "mean":
    raise ValueError(f"{kind} self_weights works with aggregation='mean' only, not "
                     f"{aggregation!r}: drop one of the two options")
  return {p: float(s) for p, s in self_weights.items()}


def _check_layers(self_weights: dict, params, kind: str) -> None:
  """Every layer of the model has a self-weight, and every self-weight a layer."""
  layers = combine_lib.unique_layers(combine_lib.layer_names(params, "module"))
  unknown = [p for p in self_weights if p not in layers]
  if unknown:
    raise ValueError(f"{kind} self_weights names {', '.join(map(repr, unknown))}, not a layer "
                     f"of the model; its layers are: {', '.join(layers)}")
  missing = [p for p in layers if p not in self_weights]
  if missing:
    raise ValueError(f"{kind} self_weights has no self-weight for layer "
                     f"{', '.join(map(repr, missing))}; give one for every layer of the model: "
                     f"{', '.join(layers)}")


def _layer_combine(tree, mixing: Mixing, layer_w: dict):
  """Every leaf combined with its layer's weights (a statistics leaf with its BatchNorm layer's,
  :func:`~drt_jax.algorithms.base.stats_weights`), a leaf of no layer with the base weights."""
  names = combine_lib.layer_names(tree, "module")
  per_leaf = base.stats_weights(names, layer_w, mixing.nbr_w)
  leaves, treedef = jax.tree.flatten(tree)
  out = [combine_lib.combine(x, mixing._replace(nbr_w=w)) for x, w in zip(leaves, per_leaf)]
  return jax.tree.unflatten(treedef, out)


def _diffusion(kind: str, opt: optax.GradientTransformation, comm_every: int,
               aggregation: str = "mean", clip_radius: float = 1.0,
               trim: int = 1, self_weights=None) -> base.Algorithm:
  base.check_comm_every(comm_every)
  aggregate = robust.aggregator(aggregation, clip_radius=clip_radius, trim=trim)
  fixed = _check_self_weights(self_weights, kind, aggregation)

  def layer_weights(m):
    return {p: static_weights(m, s) for p, s in fixed.items()}

  def init(params, topology=None):
    if kind != "local":  # every combining agent's weights must sum to one
      base.require_weights(topology, "columns", kind)
    if aggregation == "trimmed_mean":
      robust.check_neighbourhoods(topology, trim, kind)
    if fixed is not None:
      _check_layers(fixed, params, kind)
    return base.DiffusionState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32))

  def combined(tree, m):
    if fixed is None:
      return aggregate(tree, m)
    return _layer_combine(tree, m, layer_weights(m))

  def mix(tree, state, topology):
    m = combine_lib.as_mixing(topology, state.count)
    return base.maybe(base.communicates(state.count, comm_every), comm_every,
                      lambda: combined(tree, m), lambda: tree)

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
    if fixed is None:  # one matrix for every layer: its mean self-weight is the weighted mean
      return {"self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **base.graph_metrics(params, m)}
    names = combine_lib.layer_names(params, "module")
    weights = layer_weights(m)
    layer_w = {p: weights[p] for p in combine_lib.unique_layers(names)}
    return {**drt_lib.self_weight_metrics(layer_w, combine_lib.layer_sizes(params, names)),
            **base.graph_metrics(params, m)}

  if kind == "local":
    return base.Algorithm(init, step, None, combine_stats, None, lambda nbytes: 0.0)
  return base.Algorithm(init, step, grad_point if kind == "cta" else None, combine_stats,
                        metrics, base.every(comm_every))


def diffusion_atc(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
                  aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1,
                  self_weights: Mapping[str, float] | None = None):
  """Adapt-then-combine diffusion: a local step, then ``w_k <- sum_l c_lk psi_l``.

  Args:
    local_optimizer: optax transformation applied per agent.
    comm_every: combine every H-th step.
    aggregation: the combine rule, one of :data:`drt_jax.robust.AGGREGATIONS`: ``mean`` (the
      weighted combine above), ``clipped``, ``trimmed_mean`` or ``median``.
    clip_radius: tau of ``clipped`` gossip, a finite number > 0.
    trim: b of ``trimmed_mean``, an integer >= 0; every neighbourhood of the topology needs more
      than 2b members (refused at ``init``).
    self_weights: None (the base weights for every layer), or layer name -> a static self-weight
      s_p in (0, 1] for *every* layer of the model, named as ``combine.layer_names(params,
      "module")`` names them (``"Conv_0"``, ``"BatchNorm_1"``, ``"Dense_0"``; refused at
      ``init`` otherwise). Layer p is combined with :func:`static_weights` ``(mixing, s_p)``,
      BatchNorm statistics (``combine_stats``) with their layer's. Metrics then report
      ``self_weight/<layer>``, the parameter-weighted ``self_weight_mean`` and the plain
      ``self_weight_layer_mean``. With ``aggregation='mean'`` only. The values are constants of
      the compiled step.
  """
  return _diffusion("atc", local_optimizer, comm_every, aggregation, clip_radius, trim,
                    self_weights)


def diffusion_cta(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
                  aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1,
                  self_weights: Mapping[str, float] | None = None):
  """Combine-then-adapt diffusion; gradients are taken at the combined point (``grad_point``).
  Options as :func:`diffusion_atc`'s."""
  return _diffusion("cta", local_optimizer, comm_every, aggregation, clip_radius, trim,
                    self_weights)


def dsgd(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1,
         aggregation: str = "mean", clip_radius: float = 1.0, trim: int = 1,
         self_weights: Mapping[str, float] | None = None):
  """Decentralized SGD: ``w_k <- sum_l c_lk w_l + update(g_k(w_k))``. Options as
  :func:`diffusion_atc`'s."""
  return _diffusion("dsgd", local_optimizer, comm_every, aggregation, clip_radius, trim,
                    self_weights)


def local(local_optimizer: optax.GradientTransformation, *, comm_every: int = 1):
  """Local training: every agent runs the optimizer alone (``C = I``)."""
  return _diffusion("local", local_optimizer, comm_every)


def _on_links(layer_w: dict, mixing: Mixing) -> dict:
  """Weights kept from an earlier step, on this step's links: a listed neighbour whose base weight
  is now zero (a failed link, a dropped agent: :mod:`drt_jax.faults`) gets none, and its weight
  moves onto the self-weight. Weights computed on ``mixing`` itself come back unchanged."""
  cut = (jnp.arange(mixing.nbr_w.shape[1]) > 0)[None, :] & (mixing.nbr_w <= 0)

  def one(w):
    lost = jnp.sum(jnp.where(cut, w, 0.0), axis=1)
    return jnp.where(cut, 0.0, w).at[:, 0].add(lost)

  return {p: one(w) for p, w in layer_w.items()}


def _check_freeze_topology(topology, freeze_after: int, variant: str) -> None:
  """Frozen weights live on one step's neighbour lists: refuse a graph whose lists change."""
  if not freeze_after or not isinstance(topology, Topology) or topology.period == 1:
    return
  idx = topology.nbr_idx
  if isinstance(idx, jax.core.Tracer):
    return
  idx = np.asarray(idx)
  if np.any(idx != idx[:1]):
    raise ValueError(f"{variant} freeze_after={freeze_after} keeps one step's weights, on that "
                     f"step's neighbour lists, but the {topology.kind} topology changes its lists "
                     f"every step (period {topology.period}): use a static topology or "
                     "freeze_after=0")


def drt_diffusion(local_optimizer: optax.GradientTransformation, *, variant: str = "drt",
                  strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                  granularity: str = "module", reference: str = "init",
                  layerwise: bool = True, freeze_after: int = 0,
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
    layerwise: True (default): a matrix per layer. False (ablation): one matrix for the whole
      model, the mean of the per-layer matrices weighted by the layers' numbers of parameters (a
      convex combination of column-stochastic matrices on one support: still column-stochastic,
      self-weights >= floor); every layer, and every layer's metric, then has the same weights.
    freeze_after: 0 (default): the weights are recomputed at every combine. N > 0 (ablation):
      from the step with ``state.count >= N`` on (after N steps) the weights are no longer
      computed; every later combine uses those of the last combine before, ``state.layer_w``
      (which then stays unchanged): DRT's pattern without its time variation. A link that has
      no base weight at a later step (simulated faults) gives its frozen weight to the
      self-weight. Needs a graph whose neighbour lists do not change (refused at ``init``), and
      the topology passed to ``init``.
    comm_every: combine every H-th step.
  """
  drt_lib.check_options(variant, floor, eps, strength, reference, granularity)
  base.check_comm_every(comm_every)
  if not isinstance(layerwise, (bool, np.bool_)):
    raise ValueError(f"{variant} layerwise={layerwise!r} is not accepted; expected True (a matrix "
                     "per layer) or False (one matrix for the whole model)")
  if (not isinstance(freeze_after, numbers.Integral) or isinstance(freeze_after, (bool, np.bool_))
      or freeze_after < 0):
    raise ValueError(f"{variant} freeze_after={freeze_after!r} is not accepted; expected an "
                     "integer >= 0 (the step count from which the weights stay fixed; 0 = never)")
  layerwise, freeze_after = bool(layerwise), int(freeze_after)

  def init(params, topology=None):
    base.require_weights(topology, "columns", variant)
    _check_freeze_topology(topology, freeze_after, variant)
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

  def fresh(psi, m, names, state, nbrs):
    layer_w, _ = drt_lib.weights(psi, m, names, gamma(state, psi, names), variant=variant,
                                 floor=floor, eps=eps, nbrs=nbrs)
    if not layerwise:
      shared = drt_lib.parameter_weighted(layer_w, combine_lib.layer_sizes(psi, names))
      layer_w = {p: shared for p in layer_w}
    return layer_w

  def step(params, grads, state, topology, active=None):
    psi, opt_state = base.local_update(local_optimizer, grads, state.opt_state, params, active)
    names = combine_lib.layer_names(psi, granularity)
    m = combine_lib.as_mixing(topology, state.count)

    def communicate():
      nbrs = combine_lib.neighbours(psi, m)  # one exchange for the distances and the combine
      if not freeze_after:
        layer_w = fresh(psi, m, names, state, nbrs)
        return combine_lib.combine_layers(psi, m, layer_w, names, nbrs), layer_w
      for p, w in state.layer_w.items():
        if w.shape != m.nbr_idx.shape:
          raise ValueError(f"{variant} freeze_after={freeze_after}: the state's weights of layer "
                           f"{p!r} have shape {w.shape}, the graph's lists {m.nbr_idx.shape}; "
                           "pass the topology to init(params, topology)")

      def computed():
        return {p: w.astype(state.layer_w[p].dtype)
                for p, w in fresh(psi, m, names, state, nbrs).items()}

      # After the warm-up the DRT computation is skipped (under vmap both branches run).
      layer_w = jax.lax.cond(state.count >= freeze_after, lambda: state.layer_w, computed)
      return combine_lib.combine_layers(psi, m, _on_links(layer_w, m), names, nbrs), layer_w

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
    layer_w = _on_links(state.layer_w, m) if freeze_after else state.layer_w
    per_leaf = base.stats_weights(names, layer_w, eye)
    leaves, treedef = jax.tree.flatten(stats)

    def mix():
      out = [combine_lib.combine(x, m._replace(nbr_w=w)) for x, w in zip(leaves, per_leaf)]
      return jax.tree.unflatten(treedef, out)

    return base.maybe(base.communicates(prev, comm_every), comm_every, mix, lambda: stats)

  def metrics(params, state, topology):
    sizes = combine_lib.layer_sizes(params, combine_lib.layer_names(params, granularity))
    return {**drt_lib.self_weight_metrics(state.layer_w, sizes),
            **base.graph_metrics(params, base.last_mixing(topology, state), granularity, eps)}

  return base.Algorithm(init, step, None, combine_stats, metrics, base.every(comm_every))
