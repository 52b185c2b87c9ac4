r"""Gradient tracking and exact diffusion: decentralized methods whose fixed points are the global
minimiser, and DRT's layer-wise weights inside both.

Plain diffusion (ATC, CTA, DSGD) with a constant step size settles at a fixed point that is
biased away from the minimiser of ``sum_k f_k`` when the agents' local optima differ. The two
corrections here remove that bias for smooth problems. Notation: ``A_i = [a_lk]`` is the step's
combination matrix (columns sum to one, ``x_k <- sum_l a_lk x_l``), ``g_i = grad f_k(x_i)`` the
gradients at the parameters, and ``update(.)`` one step of the local optax optimizer
(``-mu d`` for SGD with learning rate mu applied to a direction d).

Gradient tracking (the family of Nedić, Olshevsky & Shi 2017, DIGing, arXiv 1607.03218, and Di
Lorenzo & Scutari 2016, NEXT, arXiv 1602.00591). Each step takes the tracker in
``z_i = v_{i-1} + g_i - g_{i-1}`` and combines it, ``v_i = A_i z_i`` (agent k's part
``sum_l a_lk z_l``; v_{-1} = g_{-1} = 0);
the local optimizer follows a direction d_i, and the parameters are combined as in ATC::

    psi_i   = x_i + update(d_i)
    x_{i+1} = sum_l a_lk psi_i

``form="atc"`` (default): d_i = v_i, the tracker combined first (the adapt-then-combine form of
Xu, Zhu, Soh & Xie 2015, "Augmented distributed gradient methods", CDC). ``form="dsgt"``:
d_i = z_i, the tracker before its combine (Pu & Nedić 2021, "Distributed stochastic gradient
tracking methods", arXiv 1805.11454: x_{i+1} = A(x_i - mu y_i), y_{i+1} = A y_i + g_{i+1} - g_i),
so both vectors are combined after the local step, in one round. Both forms keep the same
tracker sequence and, with doubly stochastic A_i (any sequence), the network average of v_i and
of z_i equals that of g_i at every step: at a fixed point with consensus the average gradient is
zero. Measured on this project's float64 least-squares test (ring, K = 8, SGD 0.1): the ATC form
diverges once the self-weights drop to 0.1 (matrices with eigenvalues near -1), the DSGT form
still converges at 0.05 -- the reason DRT gradient tracking, whose floor allows such weights,
uses the DSGT form. Two vectors exchanged per step.

Exact diffusion (Yuan, Ying, Zhao & Sayed 2019, IEEE TSP, arXiv 1702.05122)::

    psi_{i+1} = x_i + update(g_i)                 (adapt)
    phi_{i+1} = psi_{i+1} + x_i - psi_i           (correct; psi_0 = x_0)
    x_{i+1}   = sum_l abar_lk phi_{i+1},   Abar = (I + A) / 2   (combine)

It needs symmetric doubly stochastic A (the paper's assumption; Abar's eigenvalues are then in
[0, 1]); one exchange per step. The paper's convergence proof is for a fixed A: on a
time-varying graph (``random_matching``) the fixed points are still the right ones (see
:mod:`drt_jax.drt`), but convergence is not covered by its theory (it did converge there in every
run of this project's least-squares test).

Local optimizers. Gradient tracking's fixed point is the minimiser of ``sum_k f_k`` for any
optimizer whose steady update on a constant direction d vanishes only at d = 0 (SGD, momentum,
Adam; weight decay moves it to the regularised sum's minimiser), because at the fixed point every
agent follows the same tracked direction. Exact diffusion keeps ``sum_k x_k = sum_k psi_k``, so
its fixed point has ``sum_k update_k = 0``: the minimiser for SGD and momentum, but not for an
adaptive optimizer, whose per-agent preconditioners weigh the agents' gradients differently.

``drt_gradient_tracking`` and ``drt_exact_diffusion`` replace A_i by DRT's per-layer matrices
A_i^(p) of the ``drt_symmetric`` variant, which are doubly stochastic on symmetric base weights.
Why that variant, which weights each combine uses and what is known versus derived here: the
section "DRT inside gradient tracking and exact diffusion" of :mod:`drt_jax.drt`.

States keep the extra vectors at least in float32 (the tracker and the previous gradients of a
bfloat16 model), because the tracking property rests on sums cancelling.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drt_jax import combine as combine_lib
from drt_jax import drt as drt_lib
from drt_jax.algorithms import base
from drt_jax.types import Mixing, PyTree


class TrackingState(NamedTuple):
  """State of gradient tracking."""

  opt_state: Any
  count: jax.Array  # int32 scalar: steps taken
  v: PyTree  # the tracker v_{i-1} after its combine, stacked like the parameters
  prev_grads: PyTree  # g_{i-1}, the gradients the tracker last took in


class ExactDiffusionState(NamedTuple):
  """State of exact diffusion."""

  opt_state: Any
  count: jax.Array
  psi: PyTree  # psi_i, the last adapted point (psi_0 = x_0)


class DRTTrackingState(NamedTuple):
  """State of DRT gradient tracking: :class:`~drt_jax.algorithms.base.DRTState`'s fields and the
  tracker's."""

  opt_state: Any
  count: jax.Array
  strength: jax.Array  # rho, traced: sweeping it does not recompile
  init_sq_norms: dict  # layer -> n_0^(p)^2
  layer_w: dict  # layer -> [K, D] weights of the last step (both of its combines)
  v: PyTree
  prev_grads: PyTree


class DRTExactDiffusionState(NamedTuple):
  """State of DRT exact diffusion: :class:`~drt_jax.algorithms.base.DRTState`'s fields and psi."""

  opt_state: Any
  count: jax.Array
  strength: jax.Array
  init_sq_norms: dict
  layer_w: dict  # layer -> [K, D] DRT matrices A^(p) of the last step (combined with their
  # lazy half (I + A^(p)) / 2; statistics and metrics use A^(p) itself)
  psi: PyTree


# --------------------------------------------------------------------------------------------
# Pieces.


def _acc_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _acc_zeros(params):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, _acc_dtype(x)), params)


def _held(grads, prev_grads, active):
  """g_i, except a straggler's: it has no new gradient, so it keeps g_{i-1} (g_i - g_{i-1} = 0)."""
  g = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, prev_grads)
  return base.select(active, g, prev_grads)


def _innovate(v, g, prev_grads):
  """v_{i-1} + g_i - g_{i-1}: the tracker before its combine."""
  return jax.tree.map(lambda v, g, gp: v + (g - gp), v, g, prev_grads)


def _as_grads(v, grads):
  """The tracked direction in the gradients' dtype, so the optimizer state keeps its dtypes."""
  return jax.tree.map(lambda v, g: v.astype(g.dtype), v, grads)


def _correct(psi, params, prev_psi):
  """phi = psi_{i+1} + x_i - psi_i, in at least float32 (the correction is a small difference)."""
  def one(s, x, sp):
    dtype = _acc_dtype(x)
    return s.astype(dtype) + (x.astype(dtype) - sp.astype(dtype))
  return jax.tree.map(one, psi, params, prev_psi)


def _cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def stochastic_weights(w, dtype):
  """Neighbour-list weights in ``dtype`` with each self-weight recomputed as one minus the rest.

  A topology's float32 weights sum to one only to float32 precision, and both corrections here
  integrate that error step after step (the sums they keep drift): exact diffusion's average
  would drift linearly in a float64 run. Off-diagonal weights are kept as they are, so symmetric
  weights stay symmetric and the matrix is doubly stochastic to the rounding of ``dtype``.
  """
  w = w.astype(dtype)
  return w.at[:, 0].set(1.0 - jnp.sum(w[:, 1:], axis=1))


def lazy_weights(w):
  """Abar = (I + A) / 2 on neighbour-list weights ``[..., K, D]`` (slot 0 is the self-weight)."""
  return 0.5 * w.at[..., 0].add(1.0)


def _exact_mixing(topology, step, params) -> Mixing:
  m = combine_lib.as_mixing(topology, step)
  return m._replace(nbr_w=stochastic_weights(m.nbr_w, _weights_dtype(params)))


def _graph_metrics(params, state, topology):
  m = base.last_mixing(topology, state)
  return {"self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **base.graph_metrics(params, m)}


def _drt_metrics(granularity, eps):
  def metrics(params, state, topology):
    sizes = combine_lib.layer_sizes(params, combine_lib.layer_names(params, granularity))
    return {**drt_lib.self_weight_metrics(state.layer_w, sizes),
            **base.graph_metrics(params, base.last_mixing(topology, state), granularity, eps)}

  return metrics


def _stats_combine(stats, mixing: Mixing, layer_w: dict):
  """Statistics mixed with their BatchNorm layer's weights (identity for a leaf of no layer)."""
  names = combine_lib.layer_names(stats, "module")
  eye = jnp.zeros_like(mixing.nbr_w).at[:, 0].set(1.0)
  leaves, treedef = jax.tree.flatten(stats)
  per_leaf = base.stats_weights(names, layer_w, eye)
  out = [combine_lib.combine(x, mixing._replace(nbr_w=w)) for x, w in zip(leaves, per_leaf)]
  return jax.tree.unflatten(treedef, out)


def _weights_dtype(params):
  return jnp.result_type(jnp.float32, *[x.dtype for x in jax.tree.leaves(params)])


# A layer-weights function: (psi, mixing, names, state, nbrs) -> dict layer -> [K, D] weights on
# ``mixing``'s lists, summing to one per agent and symmetric (doubly stochastic) per layer.
LayerWeights = Callable[..., dict]


def drt_layer_weights(floor: float, eps: float, reference: str) -> LayerWeights:
  """DRT's ``drt_symmetric`` weights, computed as :func:`~drt_jax.algorithms.drt_diffusion`
  computes them (gamma^(p) = rho n^(p)^2 with the reference norm n)."""

  def weights(psi, mixing, names, state, nbrs):
    sq = drt_lib.calibrate(psi, names, eps) if reference == "current" else state.init_sq_norms
    gamma = {p: state.strength * v for p, v in sq.items()}
    layer_w, _ = drt_lib.weights(psi, mixing, names, gamma, variant="drt_symmetric",
                                 floor=floor, eps=eps, nbrs=nbrs)
    return layer_w

  return weights


def base_layer_weights(psi, mixing, names, state, nbrs):
  """The base weights for every layer: DRT switched off (tests compare with the plain methods)."""
  del state, nbrs
  w = stochastic_weights(mixing.nbr_w, _weights_dtype(psi))
  return {p: w for p in combine_lib.unique_layers(names)}


# --------------------------------------------------------------------------------------------
# Gradient tracking and exact diffusion.


FORMS = ("atc", "dsgt")


def gradient_tracking(local_optimizer: optax.GradientTransformation, *,
                      form: str = "atc") -> base.Algorithm:
  """Gradient tracking: the local optimizer follows a tracked estimate of the network's average
  gradient, ``v_i = sum_l a_lk (v_{i-1} + g_i - g_{i-1})``; then ATC's combine.

  Args:
    local_optimizer: optax transformation applied per agent to the tracked direction.
    form: ``atc`` (the direction is the combined tracker v_i) or ``dsgt`` (the direction is
      v_{i-1} + g_i - g_{i-1}, combined after the local step with the parameters).

  Needs doubly stochastic weights (time-varying ones too). Two vectors exchanged per step. A
  straggler (``active`` false) reuses its previous gradient and skips its local step but still
  combines both.
  """
  if form not in FORMS:
    raise ValueError(f"gradient_tracking form={form!r} is unknown; expected one of: "
                     f"{', '.join(FORMS)}")
  opt = local_optimizer

  def init(params, topology=None):
    base.require_weights(topology, "doubly", "gradient_tracking")
    return TrackingState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32),
                         _acc_zeros(params), _acc_zeros(params))

  def step(params, grads, state, topology, active=None):
    m = _exact_mixing(topology, state.count, params)
    g = _held(grads, state.prev_grads, active)
    z = _innovate(state.v, g, state.prev_grads)
    v = combine_lib.combine(z, m)
    d = v if form == "atc" else z
    psi, opt_state = base.local_update(opt, _as_grads(d, grads), state.opt_state, params, active)
    return combine_lib.combine(psi, m), TrackingState(opt_state, state.count + 1, v, g)

  def combine_stats(stats, state, topology):
    return combine_lib.combine(stats, base.last_mixing(topology, state))

  return base.Algorithm(init, step, None, combine_stats, _graph_metrics,
                        lambda nbytes: 2.0 * nbytes)


def exact_diffusion(local_optimizer: optax.GradientTransformation) -> base.Algorithm:
  """Exact diffusion: ATC's local step, a correction ``phi = psi_{i+1} + x_i - psi_i`` and a
  combine with ``Abar = (I + A) / 2``.

  Needs symmetric doubly stochastic weights; one exchange per step. Statistics are mixed with
  A itself (they are not part of the recursion), and ``self_weight_mean`` reports A's.
  """
  opt = local_optimizer

  def init(params, topology=None):
    base.require_weights(topology, "symmetric", "exact_diffusion")
    return ExactDiffusionState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32),
                               jax.tree.map(jnp.copy, params))  # own buffers: state is donated

  def step(params, grads, state, topology, active=None):
    m = _exact_mixing(topology, state.count, params)
    psi, opt_state = base.local_update(opt, grads, state.opt_state, params, active)
    phi = _correct(psi, params, state.psi)
    new = combine_lib.combine(phi, m._replace(nbr_w=lazy_weights(m.nbr_w)))
    return _cast_like(new, params), ExactDiffusionState(opt_state, state.count + 1, psi)

  def combine_stats(stats, state, topology):
    return combine_lib.combine(stats, base.last_mixing(topology, state))

  return base.Algorithm(init, step, None, combine_stats, _graph_metrics, lambda nbytes: nbytes)


# --------------------------------------------------------------------------------------------
# DRT inside both.


def _drt_init(params, topology, local_optimizer, strength, granularity, eps, name):
  base.require_weights(topology, "symmetric", name)
  names = combine_lib.layer_names(params, granularity)
  k_count = jax.tree.leaves(params)[0].shape[0]
  if topology is None:
    m = Mixing(jnp.arange(k_count, dtype=jnp.int32)[:, None], jnp.ones((k_count, 1)))
  else:
    m = combine_lib.as_mixing(topology, 0)
  return (jax.vmap(local_optimizer.init)(params), jnp.zeros((), jnp.int32),
          jnp.asarray(strength, jnp.float32), drt_lib.calibrate(params, names, eps), names, m)


def _drt_tracking(local_optimizer: optax.GradientTransformation, layer_weights: LayerWeights, *,
                  strength, eps, granularity) -> base.Algorithm:
  """DRT gradient tracking with any layer-weights function (:func:`drt_gradient_tracking`)."""
  opt = local_optimizer

  def init(params, topology=None):
    opt_state, count, rho, sq, names, m = _drt_init(params, topology, opt, strength, granularity,
                                                    eps, "drt_gradient_tracking")
    eye = jnp.zeros(m.nbr_idx.shape, _weights_dtype(params)).at[:, 0].set(1.0)
    return DRTTrackingState(opt_state, count, rho, sq,
                            {p: eye for p in combine_lib.unique_layers(names)},
                            _acc_zeros(params), _acc_zeros(params))

  def step(params, grads, state, topology, active=None):
    m = combine_lib.as_mixing(topology, state.count)
    names = combine_lib.layer_names(params, granularity)
    g = _held(grads, state.prev_grads, active)
    # The DSGT form: the local step follows the uncombined tracker, so this step's weights,
    # computed on its psi, serve both combines (the ATC form would need them before psi exists).
    z = _innovate(state.v, g, state.prev_grads)
    psi, opt_state = base.local_update(opt, _as_grads(z, grads), state.opt_state, params, active)
    nbrs = combine_lib.neighbours(psi, m)  # one exchange for the distances and the combine
    layer_w = layer_weights(psi, m, names, state, nbrs)
    new = combine_lib.combine_layers(psi, m, layer_w, names, nbrs)
    v = combine_lib.combine_layers(z, m, layer_w, names)
    dtype = _weights_dtype(params)
    layer_w = {p: w.astype(dtype) for p, w in layer_w.items()}
    return new, DRTTrackingState(opt_state, state.count + 1, state.strength, state.init_sq_norms,
                                 layer_w, v, g)

  def combine_stats(stats, state, topology):
    return _stats_combine(stats, base.last_mixing(topology, state), state.layer_w)

  return base.Algorithm(init, step, None, combine_stats, _drt_metrics(granularity, eps),
                        lambda nbytes: 2.0 * nbytes)


def _drt_exact(local_optimizer: optax.GradientTransformation, layer_weights: LayerWeights, *,
               strength, eps, granularity) -> base.Algorithm:
  """DRT exact diffusion with any layer-weights function (:func:`drt_exact_diffusion`)."""
  opt = local_optimizer

  def init(params, topology=None):
    opt_state, count, rho, sq, names, m = _drt_init(params, topology, opt, strength, granularity,
                                                    eps, "drt_exact_diffusion")
    eye = jnp.zeros(m.nbr_idx.shape, _weights_dtype(params)).at[:, 0].set(1.0)
    return DRTExactDiffusionState(opt_state, count, rho, sq,
                                  {p: eye for p in combine_lib.unique_layers(names)},
                                  jax.tree.map(jnp.copy, params))

  def step(params, grads, state, topology, active=None):
    m = combine_lib.as_mixing(topology, state.count)
    names = combine_lib.layer_names(params, granularity)
    psi, opt_state = base.local_update(opt, grads, state.opt_state, params, active)
    # The weights are computed on phi, the vector combined: one exchange serves both, and at the
    # fixed point phi is at consensus (psi is not: psi_k = x* + update_k), so DRT then sees none
    # of the agents' gradient disagreement.
    phi = _correct(psi, params, state.psi)
    nbrs = combine_lib.neighbours(phi, m)
    layer_w = layer_weights(phi, m, names, state, nbrs)
    abar = {p: lazy_weights(w) for p, w in layer_w.items()}
    new = _cast_like(combine_lib.combine_layers(phi, m, abar, names, nbrs), params)
    dtype = _weights_dtype(params)
    layer_w = {p: w.astype(dtype) for p, w in layer_w.items()}
    return new, DRTExactDiffusionState(opt_state, state.count + 1, state.strength,
                                       state.init_sq_norms, layer_w, psi)

  def combine_stats(stats, state, topology):
    return _stats_combine(stats, base.last_mixing(topology, state), state.layer_w)

  return base.Algorithm(init, step, None, combine_stats, _drt_metrics(granularity, eps),
                        lambda nbytes: nbytes)


def drt_gradient_tracking(local_optimizer: optax.GradientTransformation, *,
                          strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                          granularity: str = "module", reference: str = "init") -> base.Algorithm:
  """Gradient tracking whose combines use DRT's per-layer, per-step weights (``drt_symmetric``).

  In the DSGT form (:func:`gradient_tracking` with ``form="dsgt"``): the local step follows
  ``z_i = v_{i-1} + g_i - g_{i-1}``; the weights A_i^(p), computed on psi as
  :func:`~drt_jax.algorithms.drt_diffusion` does, then combine both the parameters and the
  tracker, ``v_i^(p) = sum_l a_lk^(p) z_i^(p)``. With the per-layer weights forced to the base
  weights it is ``gradient_tracking(form="dsgt")`` step for step, on any graph.

  Args:
    local_optimizer: optax transformation applied per agent to the tracked direction.
    strength: rho in gamma^(p) = rho n^(p)^2 (kept in the state: sweeping it does not recompile).
    floor: the self-weight floor delta in [0, 1).
    eps: relative norm guard.
    granularity: ``module`` (default) or ``leaf`` layers.
    reference: n^(p) is the layer's norm at initialisation (``init``) or the agents' current mean
      norm (``current``).

  Needs symmetric doubly stochastic base weights (time-varying ones too): only then are the
  per-layer matrices doubly stochastic, which the tracking property rests on.
  """
  drt_lib.check_options("drt_symmetric", floor, eps, strength, reference, granularity)
  return _drt_tracking(local_optimizer, drt_layer_weights(floor, eps, reference),
                       strength=strength, eps=eps, granularity=granularity)


def drt_exact_diffusion(local_optimizer: optax.GradientTransformation, *,
                        strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                        granularity: str = "module", reference: str = "init") -> base.Algorithm:
  """Exact diffusion with DRT's per-layer matrices: ``x_{i+1}^(p) = sum_l abar_lk^(p) phi^(p)``,
  ``Abar_i^(p) = (I + A_i^(p)) / 2``, A_i^(p) the ``drt_symmetric`` weights computed on phi.

  Its fixed points are consensus at the global minimiser (for SGD-like local optimizers) and near
  one it behaves as exact diffusion with the frozen matrices; convergence from afar is not
  proven (:mod:`drt_jax.drt`). Options as :func:`drt_gradient_tracking`; needs symmetric doubly
  stochastic base weights. ``layer_w`` keeps A_i^(p) (metrics, statistics), not its lazy half.
  """
  drt_lib.check_options("drt_symmetric", floor, eps, strength, reference, granularity)
  return _drt_exact(local_optimizer, drt_layer_weights(floor, eps, reference),
                    strength=strength, eps=eps, granularity=granularity)
