r"""Deep relative trust (DRT) and the layer-wise combination weights of DRT diffusion.

Deep relative trust (Bernstein et al. 2020, arXiv 2002.03432) bounds how far two networks of one
architecture are apart in *function* space from their parameters alone:

    DRT(w_l -> w_k) = prod_p (1 + d_lk^(p)) - 1,    d_lk^(p) = ||w_k^(p) - w_l^(p)|| / ||w_l^(p)||

over the layers p. DRT diffusion (Li, Fainman, Vlaski, arXiv 2501.03162) turns a penalty on it into
layer-wise, time-varying combination weights. The paper's full text was not available when this
was written; the weights below are this project's derivation (penalise the squared DRT between
neighbours, take one gradient step on the penalty after the local step). After the local step
psi, with base weights c_lk and guarded norms,

    beta_lk^(p) = prod_{q != p} (1 + (d_lk^(q))^2) / ||psi_l^(p)||^2
    a_lk^(p)    = gamma^(p) c_lk beta_lk^(p)        (l != k),   a_kk^(p) = 1 - sum_{l != k} a_lk^(p)

with gamma^(p) = rho * n_0^(p)^2 (n_0: the layer's norm at initialisation, or the agents' current
mean norm with ``reference="current"``), and the floor delta: a column whose off-diagonal mass s_k
exceeds 1 - delta is scaled by (1 - delta) / s_k. Everything is computed in log space (log1p,
logsumexp), so agents initialised independently, whose DRT overflows float32, still get finite
weights (they saturate at the floor).

Variants:
  * ``drt`` -- as above.
  * ``drt_symmetric`` -- d_lk^(q) = ||psi_k^(q) - psi_l^(q)|| / sqrt(||psi_k^(q)|| ||psi_l^(q)||)
    and beta's denominator ||psi_k^(p)|| ||psi_l^(p)||, so beta_lk = beta_kl; the floor is applied
    per edge with min(f_k, f_l), f_k = min(1, (1 - delta) / s_k). With symmetric base weights every
    per-layer matrix is symmetric, hence doubly stochastic: each layer's network average is kept.
  * ``drt_normalized`` -- a_kk = max(c_kk, delta) and the remaining mass 1 - a_kk shared among the
    neighbours in proportion to c_lk beta_lk^(p); rho plays no role.

Every per-layer matrix is non-negative, supported on the graph, has columns summing to one and
self-weights >= delta (``drt``, ``drt_symmetric``; ``drt_normalized`` keeps max(c_kk, delta)).

DRT inside gradient tracking and exact diffusion
------------------------------------------------
:mod:`drt_jax.algorithms.tracking` combines with A_i^(p) = [a_lk^(p)] at step i inside gradient
tracking (Nedić, Olshevsky & Shi 2017, arXiv 1607.03218; Pu & Nedić 2021, arXiv 1805.11454) and
exact diffusion (Yuan, Ying, Zhao & Sayed 2019, arXiv 1702.05122). Those methods, and the
properties of their plain forms quoted below, are the papers'; what follows about per-layer,
state-dependent matrices is this project's derivation (checked by ``tests/tracking_test.py`` on
least squares, not proven in general).

*Why the symmetric variant.* Both methods rest on a conserved network sum, so each combine must
keep sums: sum_k a_lk^(p) = 1 for every sender l (rows), besides the columns. In ``drt`` beta_lk
divides by the neighbour's norm ||psi_l||^2, so a_lk != a_kl and the rows do not sum to one;
``drt_normalized`` normalises each column on its own, no better. In ``drt_symmetric`` d, beta and
gamma^(p) are symmetric in (k, l), so with symmetric base weights (c_lk = c_kl) the raw weights
are too; the floor scales the edge {k, l} by min(f_k, f_l), the same both ways, and the
self-weight 1 - sum_l a_lk closes each column. A symmetric matrix with unit columns has unit rows:
every per-layer matrix is doubly stochastic. The base weights must be symmetric (a Topology's
``symmetric``), which the algorithms require at ``init``.

*Gradient tracking* (DSGT form): z_i = v_{i-1} + g_i - g_{i-1}, psi_i = x_i + update(z_i), then
A_i^(p) from psi_i, x_{i+1}^(p) = sum_l a_lk^(p) psi_l^(p) and v_i^(p) = sum_l a_lk^(p) z_l^(p).
Invariant: by induction from v_{-1} = g_{-1} = 0, sum_k v_i = sum_k z_i = sum_k g_i, layer by
layer, for any sequence of doubly stochastic matrices. Fixed point: with the matrices at a limit
A*^(p) (self-weights >= delta > 0 and, for rho > 0, positive weights on the edges of a connected
graph, or of a connected union over a time-varying graph's period), z = A* z forces z = 1 zbar,
zbar the average gradient; every agent then takes the same
steady update u(zbar), and summing x = A*(x + 1 u(zbar)) over agents gives u(zbar) = 0, so zbar =
0 for SGD, momentum or Adam: consensus at a zero of the average gradient, the global minimiser
of a convex sum. The ATC form (combine the tracker before the local step) would need this
step's weights before psi exists: it could only use the last step's weights, on the last step's
neighbour lists. Built and measured first, that choice diverged on ``random_matching`` in three
of four settings where the DSGT form converges (float64 least squares, K = 8, SGD 0.1); plain
ATC tracking also diverges on the ring once the self-weights fall to 0.1, and DRT's floor allows
0.05. With the per-layer weights forced to the base weights the DSGT form is exactly
``gradient_tracking(form="dsgt")``.

*Exact diffusion*: Abar_i^(p) = (I + A_i^(p)) / 2 with A_i^(p) computed on phi_{i+1}, the vector
combined. Invariant: sum_k x_i = sum_k psi_i for every layer and step (true at i = 0, and
sum x_{i+1} = sum phi_{i+1} = sum psi_{i+1} + sum x_i - sum psi_i), which needs only unit rows of
each Abar_i: the correction x_i - psi_i stays summable to zero with any sequence of doubly
stochastic matrices, so the network average moves exactly by the average local update. Fixed
points: phi* = x* and x* = Abar* x* give consensus (primitive Abar*), and the invariant gives
sum_k update_k(x*) = 0: the global minimiser for SGD (and momentum). Conversely every such
consensus point, with psi* = x* + update(x*), is fixed under *any* doubly stochastic matrix:
time-varying graphs and per-layer weights do not move the fixed points. What does not carry
over is the convergence proof, which uses one fixed Abar (its eigenvectors, and a dual variable
in the range of I - Abar). Near a fixed point the weights' own variation drops out of the
linearisation: a perturbation dA of a column-stochastic matrix has zero column sums, so
dA x* = 0 on a consensus x*; the linearisation is exact diffusion with the frozen matrices
Abar*^(p), symmetric with spectrum in [delta, 1] and eigenvalue one only on consensus, layer by
layer. We expect the static analysis to give local linear convergence for small step sizes; we
have not checked it line by line for layer-wise matrices, and convergence from afar is only
observed (tests: ring; also converged on ``random_matching`` in every setting measured). The
same linearisation holds for gradient tracking (z* and psi* are at consensus there).

*Spectra.* A symmetric column-stochastic matrix with self-weights >= delta has its spectrum in
[2 delta - 1, 1] (Gershgorin). Exact diffusion's Abar maps that to [delta, 1]; gradient tracking
combines with A^(p) itself, so with a small floor its matrices can come close to a swap (an
eigenvalue near -1). floor >= 1/2 keeps every per-layer matrix positive semidefinite, a safe
choice for ``drt_gradient_tracking`` at large step sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import combine as combine_lib
from drt_jax.topology import Topology, to_dense
from drt_jax.types import Mixing, PyTree

VARIANTS = ("drt", "drt_symmetric", "drt_normalized")
REFERENCES = ("init", "current")


def _real(x) -> bool:
  """A finite real number or array of them (bools refused: True is not a strength)."""
  try:
    a = np.asarray(x)
  except (TypeError, ValueError):
    return False
  return (a.dtype.kind in "iuf" and a.size > 0 and bool(np.all(np.isfinite(a)))
          and not isinstance(x, bool))


_UNCHECKED = object()


def check_options(variant: str, floor: float, eps: float, strength=_UNCHECKED, reference="init",
                  granularity: str = "module"):
  """Raises ValueError naming the first option outside its accepted range (the one place these
  are checked: ``config.validate`` asks here too)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DRT variant {variant!r}; expected one of: {', '.join(VARIANTS)}")
  if not (_real(floor) and 0.0 <= floor < 1.0):
    raise ValueError(f"DRT floor={floor!r} is outside [0, 1); the self-weight floor delta must be "
                     "in [0, 1), e.g. 0.05")
  if not (_real(eps) and eps > 0.0):
    raise ValueError(f"DRT eps={eps!r} must be a finite number > 0 (the relative norm guard, e.g. "
                     "1e-6)")
  if strength is not _UNCHECKED and not (_real(strength) and np.all(np.asarray(strength) >= 0)):
    raise ValueError(f"DRT strength={strength!r} must be a finite number >= 0")
  combine_lib.layer_names({}, granularity)
  if reference not in REFERENCES:
    raise ValueError(f"unknown DRT reference {reference!r}; expected one of: "
                     f"{', '.join(REFERENCES)}")


def guarded_sq_norms(stacked_tree: PyTree, names: list[str], eps: float) -> dict:
  """max(||v||, eps sqrt(size(v)))^2 per layer and agent: dict layer -> ``[K]``."""
  sq = combine_lib.layer_sq_norms(stacked_tree, names)
  sizes = combine_lib.layer_sizes(stacked_tree, names)
  return {p: jnp.maximum(v, eps * eps * sizes[p]) for p, v in sq.items()}


def calibrate(stacked_params: PyTree, names: list[str], eps: float = 1e-6) -> dict:
  """n_0^(p)^2: each layer's squared norm at initialisation, averaged over agents."""
  return {p: jnp.mean(v) for p, v in guarded_sq_norms(stacked_params, names, eps).items()}


def _edge_sq_dists(stacked_tree, names, mixing, nbrs=None) -> dict:
  """||psi_k^(p) - psi_l^(p)||^2 for l = nbr_idx[k, j]: dict layer -> ``[K, D]`` (slot 0 = 0).

  ``nbrs``: the leaves' neighbour copies (:func:`drt_jax.combine.neighbours`), so that the
  combination can reuse them; computed here when not given.
  """
  leaves = jax.tree.leaves(stacked_tree)
  nbrs = combine_lib.neighbours(stacked_tree, mixing) if nbrs is None else nbrs
  out = {}
  for name, leaf, copies in zip(names, leaves, nbrs, strict=True):
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    flat = lambda v, dtype=dtype: v.astype(dtype).reshape(v.shape[0], -1)  # noqa: E731
    x = flat(leaf)
    cols = [jnp.zeros(x.shape[0], x.dtype)]
    for y in copies:
      cols.append(jnp.sum(jnp.square(x - flat(y)), axis=1))
    sq = jnp.stack(cols, axis=1)
    out[name] = out[name] + sq if name in out else sq
  return out


def _leave_one_out(logs):
  """sum_{q != p} logs[q] without the cancellation of (total - own): logs ``[P, ...]``."""
  p_count = logs.shape[0]
  return jnp.tensordot(1.0 - jnp.eye(p_count, dtype=logs.dtype), logs, axes=1)


def _reverse_edge_weights(off, log_a, log_s, c, nbr_idx, neighbour, floor):
  """a_lk f_l for every listed edge l -> k, read from agent l's own column where it lists k.

  Where the base weights agree both ways (c_kl = c_lk), beta's symmetry gives a_kl = a_lk, so
  agent l's normalised weight for k is a_lk f_l; taking it from there makes min(a_lk f_k, a_lk f_l)
  bitwise symmetric. Other edges (no reverse on a directed graph, or uniform weights on an
  irregular graph) compute a_lk f_l directly.
  """
  k_count = nbr_idx.shape[0]
  back = (nbr_idx[nbr_idx] == jnp.arange(k_count)[:, None, None]) & neighbour[nbr_idx]  # [K,D,D]
  rev = jnp.argmax(back, axis=-1)  # slot of k in l's list
  mirrored = jnp.any(back, axis=-1) & (c[nbr_idx, rev] == c)  # [K, D]
  from_l = off[:, nbr_idx, rev]  # [P, K, D]
  log_f_l = jnp.minimum(0.0, jnp.log1p(-floor) - log_s)[:, nbr_idx]
  direct = jnp.where(neighbour, jnp.exp(log_a + log_f_l), 0.0)
  return jnp.where(mirrored[None], from_l, direct)


def weights(psi: PyTree, mixing: Mixing, names: list[str], gamma: dict, *, variant: str = "drt",
            floor: float = 0.05, eps: float = 1e-6, nbrs: list | None = None):
  """Per-layer combination weights of DRT diffusion on the neighbour list of ``mixing``.

  Args:
    psi: stacked parameters after the local step (leading axis K).
    mixing: base weights c_lk as a padded neighbour list (slot 0 = self).
    names: the layer of each leaf of ``psi`` (:func:`drt_jax.combine.layer_names`).
    gamma: dict layer -> per-layer strength gamma^(p) (a scalar; unused by ``drt_normalized``).
    variant: one of :data:`VARIANTS`.
    floor: the self-weight floor delta in [0, 1).
    eps: relative norm guard.
    nbrs: the leaves' neighbour copies (:func:`drt_jax.combine.neighbours`) when the caller
      combines with them too; computed here otherwise.

  Returns:
    ``(layer_w, log1p_drt)``: dict layer -> ``[K, D]`` weights a_lk^(p) on the neighbour list
    (slot 0 = a_kk^(p)), and ``log(1 + DRT(psi_l -> psi_k))`` per listed edge ``[K, D]``
    (0 on the self slot and on padding).
  """
  nbr_idx, c = mixing.nbr_idx, mixing.nbr_w
  layers = combine_lib.unique_layers(names)
  sq_norm = guarded_sq_norms(psi, names, eps)
  log_n = jnp.stack([0.5 * jnp.log(sq_norm[p]) for p in layers])  # [P, K]
  log_n_l = log_n[:, nbr_idx]  # [P, K, D]: the neighbour's norm
  log_n_k = log_n[:, :, None]
  dist = _edge_sq_dists(psi, names, mixing, nbrs)
  log_dist = 0.5 * jnp.log(jnp.stack([dist[p] for p in layers]))  # -inf where equal
  neighbour = (jnp.arange(c.shape[1]) > 0)[None, :] & (c > 0)  # [K, D]

  log_d_ref = log_dist - log_n_l  # d_lk with the neighbour as reference, as DRT defines it
  log1p_drt = jnp.where(neighbour, jnp.sum(jax.nn.softplus(log_d_ref), axis=0), 0.0)

  if variant == "drt_symmetric":
    log_d = log_dist - 0.5 * (log_n_k + log_n_l)
    log_denom = log_n_k + log_n_l
  else:
    log_d = log_d_ref
    log_denom = 2.0 * log_n_l
  # softplus(x) = log(1 + e^x) without overflow: log1p(exp(x)) is inf once x > 88 (d > 1e19 in
  # float32), where the weights must saturate at the floor instead.
  log_beta = _leave_one_out(jax.nn.softplus(2.0 * log_d)) - log_denom  # [P, K, D]
  log_c = jnp.where(neighbour, jnp.log(jnp.where(neighbour, c, 1.0)), -jnp.inf)

  if variant == "drt_normalized":
    self_w = jnp.where(jnp.any(neighbour, axis=1), jnp.maximum(c[:, 0], floor), 1.0)  # [K]
    share = jax.nn.softmax(jnp.where(neighbour, log_c + log_beta, -jnp.inf), axis=-1,
                           where=neighbour)
    off = jnp.where(neighbour, share, 0.0) * (1.0 - self_w)[None, :, None]
  else:
    log_gamma = jnp.log(jnp.stack([jnp.asarray(gamma[p], jnp.float32) for p in layers]))
    log_a = log_gamma[:, None, None] + log_c + log_beta  # [P, K, D], -inf off the graph
    log_s = jax.nn.logsumexp(log_a, axis=-1, where=neighbour)  # [P, K]
    # a_lk f_k = softmax_k(a)_l * min(s_k, 1 - delta): normalising before scaling keeps the
    # floor exact even when log a is in the hundreds (float32 would lose it in log a - log s).
    mass = jnp.exp(jnp.minimum(log_s, jnp.log1p(-floor)))
    share = jax.nn.softmax(log_a, axis=-1, where=neighbour)
    # No mass at all (strength 0) leaves softmax at 0/0: no mixing, the column keeps its own psi.
    off = jnp.where(neighbour & (log_s > -jnp.inf)[:, :, None], share * mass[:, :, None], 0.0)
    if variant == "drt_symmetric":
      off = jnp.minimum(off, _reverse_edge_weights(off, log_a, log_s, c, nbr_idx, neighbour,
                                                   floor))
  self_w = 1.0 - jnp.sum(off, axis=-1)  # [P, K]
  a = off.at[:, :, 0].set(self_w)
  return {p: a[i] for i, p in enumerate(layers)}, log1p_drt


def weights_dense(psi: PyTree, a_base: np.ndarray, names: list[str], gamma: dict, *,
                  variant: str = "drt", floor: float = 0.05, eps: float = 1e-6) -> dict:
  """Reference implementation of :func:`weights` on dense K x K matrices, in numpy float64."""
  leaves = [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(psi)]
  layers = combine_lib.unique_layers(names)
  k_count = a_base.shape[0]
  cat = {p: np.concatenate([x for x, n in zip(leaves, names) if n == p], axis=1) for p in layers}
  norm = {p: np.maximum(np.linalg.norm(v, axis=1), eps * np.sqrt(v.shape[1]))
          for p, v in cat.items()}
  # dist[p][l, k] = ||psi_k - psi_l||
  dist = {p: np.linalg.norm(v[None, :, :] - v[:, None, :], axis=-1) for p, v in cat.items()}
  nbr = (a_base > 0) & ~np.eye(k_count, dtype=bool)
  out = {}
  for p in layers:
    beta = np.ones((k_count, k_count))
    for q in layers:
      if q == p:
        continue
      if variant == "drt_symmetric":
        d = dist[q] / np.sqrt(norm[q][:, None] * norm[q][None, :])
      else:
        d = dist[q] / norm[q][:, None]  # reference l = row
      beta = beta * (1.0 + d ** 2)
    if variant == "drt_symmetric":
      beta = beta / (norm[p][:, None] * norm[p][None, :])
    else:
      beta = beta / norm[p][:, None] ** 2
    a = np.zeros((k_count, k_count))
    if variant == "drt_normalized":
      for k in range(k_count):
        ls = np.flatnonzero(nbr[:, k])
        if not ls.size:
          a[k, k] = 1.0
          continue
        a[k, k] = max(a_base[k, k], floor)
        mass = a_base[ls, k] * beta[ls, k]
        a[ls, k] = (1.0 - a[k, k]) * mass / mass.sum()
    else:
      off = np.where(nbr, float(gamma[p]) * a_base * beta, 0.0)
      f = np.minimum(1.0, (1.0 - floor) / np.maximum(off.sum(axis=0), 1e-300))
      if variant == "drt_symmetric":
        off = off * np.minimum(f[:, None], f[None, :])
      else:
        off = off * f[None, :]
      a = off + np.diag(1.0 - off.sum(axis=0))
    out[p] = a
  return out


def layer_matrices(stacked_params: PyTree, topology: Topology | Mixing, *, variant: str = "drt",
                   strength: float = 1.0, floor: float = 0.05, eps: float = 1e-6,
                   granularity: str = "module", calibration: PyTree | None = None,
                   step: int = 0, method: str = "sparse") -> dict:
  """The per-layer combination matrices DRT diffusion would use on ``stacked_params``.

  Args:
    stacked_params: psi, the stacked parameters to combine (leading axis K).
    topology: base weights c_lk.
    variant, floor, eps: as in :func:`weights`.
    strength: rho; gamma^(p) = rho n_0^(p)^2.
    granularity: ``module`` or ``leaf`` layers (:func:`drt_jax.combine.layer_names`).
    calibration: stacked parameters that define n_0 (default: ``stacked_params`` themselves).
    step: the step of a time-varying topology.
    method: ``sparse`` (the implementation used in training) or ``dense`` (the float64 reference).

  Returns:
    dict layer name -> numpy ``[K, K]`` with ``A[l, k] = a_lk^(p)`` (columns sum to one).

  Example::

    mats = drt.layer_matrices(params, topology.make("ring", 8))
    {name: m.diagonal().mean() for name, m in mats.items()}   # mean self-weight per layer
  """
  check_options(variant, floor, eps, strength)
  names = combine_lib.layer_names(stacked_params, granularity)
  ref = stacked_params if calibration is None else calibration
  gamma = {p: strength * v for p, v in calibrate(ref, names, eps).items()}
  mix = combine_lib.as_mixing(topology, step)
  if method == "dense":
    a_base = to_dense(np.asarray(mix.nbr_idx), np.asarray(mix.nbr_w))
    return weights_dense(stacked_params, a_base, names, gamma, variant=variant, floor=floor,
                         eps=eps)
  if method != "sparse":
    raise ValueError(f"unknown method {method!r}; expected 'sparse' or 'dense'")
  layer_w, _ = weights(stacked_params, mix, names, gamma, variant=variant, floor=floor, eps=eps)
  idx = np.asarray(mix.nbr_idx)
  return {p: to_dense(idx, np.asarray(w, np.float64)) for p, w in layer_w.items()}


def parameter_weighted(values: dict, sizes: dict):
  """sum_p n_p values[p] / sum_p n_p over the layers of ``values``, n_p = ``sizes[p]`` (a layer's
  number of scalars per agent); the values may be arrays of one shape (weights ``[K, D]``)."""
  total = float(sum(sizes[p] for p in values))
  return sum((sizes[p] / total) * v for p, v in values.items())


def self_weight_metrics(layer_w: dict, sizes: dict) -> dict:
  """The self-weight diagnostics of per-layer weights ``layer_w`` (layer -> ``[K, D]``, slot 0 =
  self), shared by every algorithm with per-layer weights:

  * ``self_weight/<layer>``: the mean over agents of the layer's self-weight;
  * ``self_weight_mean``: their mean over layers weighted by ``sizes`` (the layers' numbers of
    scalars per agent, :func:`drt_jax.combine.layer_sizes`), the share of the *parameters* an agent
    keeps: in a CNN whose dense kernel holds 99 % of the parameters a plain mean over layers
    would let the small layers decide the figure;
  * ``self_weight_layer_mean``: the plain mean over layers.
  """
  selfw = {p: jnp.mean(w[:, 0]) for p, w in layer_w.items()}
  return {**{f"self_weight/{p}": v for p, v in selfw.items()},
          "self_weight_mean": parameter_weighted(selfw, sizes),
          "self_weight_layer_mean": sum(selfw.values()) / len(selfw)}


def edge_statistics(stacked_params: PyTree, mixing: Mixing, names: list[str],
                    eps: float = 1e-6) -> dict:
  """Mean deep relative trust between listed neighbours, a diagnostic of any algorithm's state.

  Returns ``drt_log1p_mean`` (mean over the graph's edges l -> k, l != k, of
  ``log(1 + DRT(w_l -> w_k))``, which stays finite) and ``drt_mean`` (the mean DRT itself).
  """
  gamma = {p: jnp.ones(()) for p in combine_lib.unique_layers(names)}
  _, log1p_drt = weights(stacked_params, mixing, names, gamma, eps=eps)
  edge = (jnp.arange(mixing.nbr_w.shape[1]) > 0)[None, :] & (mixing.nbr_w > 0)
  n_edges = jnp.maximum(jnp.sum(edge), 1)
  return {"drt_log1p_mean": jnp.sum(jnp.where(edge, log1p_drt, 0.0)) / n_edges,
          "drt_mean": jnp.sum(jnp.where(edge, jnp.expm1(log1p_drt), 0.0)) / n_edges}
