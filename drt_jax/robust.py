r"""Robust combination rules: clipped gossip, coordinate-wise trimmed mean and median.

The diffusion family (ATC, CTA, DSGD; option ``aggregation``) combines with one of these in place
of the weighted average ``x_k <- sum_l a_lk x_l``. Agent k's *neighbourhood* at a step is

    N_k = {k} u {l : a_lk > 0},

itself (slot 0 of the neighbour list) and the listed agents with positive weight: padding slots,
failed links and dropped agents (:mod:`drt_jax.faults`) carry weight 0 and are left out by
masking, so every step has the same shapes and time-varying graphs need nothing more. Copies are
fetched with :func:`drt_jax.combine.neighbour`, so a simulated Byzantine neighbour's copy is its
attack message. With ``x_l`` the copies (whole pytrees, one per agent):

================ =============================================================================
``mean``         ``x_k <- sum_l a_lk x_l`` (:func:`drt_jax.combine.combine`; the default, whose
                 program is the one without this module).
``clipped``      clipped gossip (He, Karimireddy & Jaggi 2022, arXiv 2202.01545):
                 ``x_k <- x_k + sum_{l != k} a_lk CLIP(x_l - x_k, tau)``,
                 ``CLIP(z, tau) = z min(1, tau / ||z||)``, ||.|| the Euclidean norm of the whole
                 model copy (all leaves together).
``trimmed_mean`` per coordinate i: drop the b largest and the b smallest of
                 ``{x_l[i] : l in N_k}`` and average the other ``|N_k| - 2b``, unweighted
                 (coordinate-wise trimmed mean, Yin, Chen, Ramchandran & Bartlett 2018, arXiv
                 1803.01498; used for decentralized learning by BRIDGE, Fang, Yang & Bajwa 2022,
                 arXiv 1908.08098).
``median``       per coordinate, the median of ``{x_l[i] : l in N_k}`` (the mean of the two
                 middle values when ``|N_k|`` is even): the trimmed mean with
                 ``b = floor((|N_k| - 1) / 2)``.
================ =============================================================================

What they guarantee (the arguments are short; this project's wording, not the papers' theorems):

* ``clipped``: whatever a neighbour l sends, it moves x_k by at most ``a_lk tau`` in one combine;
  the honest terms form a convex combination of honest copies (``x_k + sum a_lk t_l (x_l - x_k)``
  with ``t_l`` in [0, 1] and ``sum_{l != k} a_lk <= 1``). Without attackers and with tau at least
  every distance ``||x_l - x_k||`` it is the weighted mean exactly (columns summing to one), and
  with symmetric weights it keeps the network average exactly (CLIP is odd: the terms of k and l
  cancel). The price: honest agents farther apart than tau mix more slowly. He et al. choose tau
  per agent and step from the honest neighbours' spread and prove convergence to a neighbourhood
  of the optimum; here tau is a fixed option, ``clip_radius``.
* ``trimmed_mean``: when at most b members of N_k are Byzantine, every kept value lies between
  two honest values, so each coordinate of the new x_k lies within the range of the honest copies
  in N_k: combining alone cannot carry honest agents away. It needs ``|N_k| > 2b``, refused at
  ``init`` for the topology's own graph; where failed links or dropped agents shrink N_k during a
  run, b is lowered to ``floor((|N_k| - 1) / 2)`` (the median) for that agent and step.
  The weights a_lk only decide membership.
* ``median``: the same, for fewer than half of N_k Byzantine.

Trimmed mean and median are nonlinear and unweighted: they do **not** keep the network average,
even without attackers and with doubly stochastic weights, so the agents' consensus (and, with
gradients, the fixed point of the recursion) differs from the mean's. None of the rules makes
honest agents reach the honest optimum exactly: with heterogeneous data they end in a
neighbourhood of it whose size depends on the heterogeneity (and, for ``clipped``, on tau).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import combine as combine_lib
from drt_jax.topology import Topology
from drt_jax.types import Mixing, PyTree

AGGREGATIONS = ("mean", "clipped", "trimmed_mean", "median")


def check_options(aggregation: str, clip_radius: float, trim: int) -> None:
  """Raises ValueError in one line naming the first option outside its accepted values."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of: "
                     f"{', '.join(AGGREGATIONS)}")
  if (isinstance(clip_radius, bool) or not isinstance(clip_radius, (int, float, np.number))
      or not math.isfinite(clip_radius) or clip_radius <= 0):
    raise ValueError(f"clip_radius={clip_radius!r} must be a finite number > 0 (clipped gossip's "
                     "tau, e.g. 1.0)")
  if isinstance(trim, bool) or not isinstance(trim, (int, np.integer)) or trim < 0:
    raise ValueError(f"trim={trim!r} must be an integer >= 0 (the values dropped at each end, "
                     "e.g. 1)")


def neighbourhood(mixing: Mixing) -> jax.Array:
  """bool ``[K, D]``: slot j of agent k is in N_k (slot 0, or a positive weight)."""
  return (jnp.arange(mixing.nbr_w.shape[1]) == 0)[None, :] | (mixing.nbr_w > 0)


def check_neighbourhoods(topology, trim: int, algorithm: str) -> None:
  """Raises ValueError in one line unless every neighbourhood of a concrete ``topology``, at
  every step of its period, has more than ``2 trim`` members (a traced one or a bare Mixing
  is taken as it is)."""
  if not isinstance(topology, Topology) or isinstance(topology.nbr_w, jax.core.Tracer):
    return
  size = 1 + np.sum(np.asarray(topology.nbr_w)[..., 1:] > 0, axis=-1)  # [T, K]
  t, k = np.unravel_index(np.argmin(size), size.shape)
  if size[t, k] <= 2 * trim:
    raise ValueError(f"{algorithm} with aggregation='trimmed_mean' and trim={trim} needs every "
                     f"neighbourhood (the agent and its neighbours) to have more than {2 * trim} "
                     f"members; agent {k} of the {topology.kind} topology has {size[t, k]} at "
                     f"step {t}: lower trim or pass a denser topology")


def clipped_gossip(stacked_tree: PyTree, mixing: Mixing, clip_radius) -> PyTree:
  """``x_k <- x_k + sum_{l != k} a_lk CLIP(x_l - x_k, tau)`` with one norm over all leaves."""
  leaves, treedef = jax.tree.flatten(stacked_tree)
  if not leaves:
    return stacked_tree
  dtypes = [jnp.promote_types(x.dtype, jnp.float32) for x in leaves]
  xs = [x.astype(d) for x, d in zip(leaves, dtypes)]
  nbrs = combine_lib.neighbours(stacked_tree, mixing)  # [leaf][slot - 1]
  out = list(xs)
  for j in range(1, mixing.nbr_w.shape[1]):
    diffs = [y[j - 1].astype(d) - x for y, x, d in zip(nbrs, xs, dtypes)]
    sq = sum(jnp.sum(jnp.square(z).reshape(z.shape[0], -1), axis=1) for z in diffs)
    # tau / 0 = inf and tau / inf = 0: no guard needed for equal copies or huge messages.
    coef = mixing.nbr_w[:, j] * jnp.minimum(1.0, clip_radius / jnp.sqrt(sq))
    out = [o + coef.astype(z.dtype).reshape((-1,) + (1,) * (z.ndim - 1)) * z
           for o, z in zip(out, diffs)]
  return jax.tree.unflatten(treedef, [o.astype(x.dtype) for o, x in zip(out, leaves)])


# Neighbourhoods up to this width (slots, D) are sorted by a sorting network of elementwise
# min/max; wider ones by XLA's sort. XLA:CPU's generic sort over an axis of a few elements made
# ATC's step 35-60x slower (mlp, K = 16, ring), while a network for D = 3 is 3 compare-exchanges
# (D = 8: 19, D = 16: 63), fused with the masks and the sum into one pass over the copies.
NETWORK_MAX_WIDTH = 16


def sorting_network(width: int) -> tuple[tuple[int, int], ...]:
  """Compare-exchange pairs ``(i, j)``, i < j, that sort ``width`` values ascending: Batcher's
  odd-even merge sort for the next power of two, less the pairs touching a position
  ``>= width`` (as if those held +inf, where a compare-exchange changes nothing)."""
  size = 1 << max(width - 1, 0).bit_length()
  pairs = []
  p = 1
  while p < size:
    k = p
    while k >= 1:
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return tuple((i, j) for i, j in pairs if j < width)


def _ranked_network(vals: list[jax.Array]) -> list[jax.Array]:
  """``vals`` (one array per slot) sorted elementwise, ascending, by :func:`sorting_network`."""
  vals = list(vals)
  for i, j in sorting_network(len(vals)):
    vals[i], vals[j] = jnp.minimum(vals[i], vals[j]), jnp.maximum(vals[i], vals[j])
  return vals


def _trimmed(stacked_tree: PyTree, mixing: Mixing, trim: int | None) -> PyTree:
  """Per coordinate, the mean of N_k's values without the b_k smallest and b_k largest, with
  ``b_k = min(trim, floor((|N_k| - 1) / 2))`` (``trim`` None: the median's).

  The D copies are ranked per coordinate (a sorting network of elementwise min/max up to
  :data:`NETWORK_MAX_WIDTH` slots, ``jnp.sort`` beyond) with non-members set to +inf, so that
  they rank last and never among the kept ranks ``b_k .. |N_k| - b_k - 1``, which are summed
  under per-agent masks: everything is elementwise along the agent axis (no exchange beyond
  fetching the copies). A member's NaN ranks after every member's number, as in ``np.sort``:
  dropped among the b_k largest, or the result is NaN.
  """
  member = neighbourhood(mixing).T  # [D, K]
  width = member.shape[0]
  n = jnp.sum(member, axis=0)  # [K], >= 1
  b = (n - 1) // 2 if trim is None else jnp.minimum(trim, (n - 1) // 2)
  pos = jnp.arange(width)[:, None]
  keep = (pos >= b) & (pos < n - b)  # [D, K]: the kept ranks
  count = (n - 2 * b).astype(jnp.float32)
  nbrs = combine_lib.neighbours(stacked_tree, mixing)

  def leaf(x, copies):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    expand = (slice(None),) + (None,) * (x.ndim - 1)  # [K] -> [K, 1, ...]
    vals = [y.astype(dtype) for y in (x, *copies)]  # D of [K, ...]
    nan = [jnp.isnan(v) & member[j][expand] for j, v in enumerate(vals)]
    nan_count = sum(z.astype(jnp.int32) for z in nan)
    # Non-members and NaNs as +inf (min/max would spread a NaN); the NaNs are put back below.
    vals = [jnp.where(member[j][expand] & ~nan[j], v, jnp.inf) for j, v in enumerate(vals)]
    if width <= NETWORK_MAX_WIDTH:
      ranked = _ranked_network(vals)
    else:
      ranked = list(jnp.sort(jnp.stack(vals), axis=0))
    total = jnp.where(keep[0][expand], ranked[0], 0.0)
    for j in range(1, width):
      total = total + jnp.where(keep[j][expand], ranked[j], 0.0)
    out = total / count.astype(dtype)[expand]
    # The NaNs rank last among the members: one is kept where there are more than b_k of them.
    out = jnp.where(nan_count > b[expand], jnp.nan, out)
    return out.astype(x.dtype)

  leaves, treedef = jax.tree.flatten(stacked_tree)
  return jax.tree.unflatten(treedef, [leaf(x, c) for x, c in zip(leaves, nbrs, strict=True)])


def trimmed_mean(stacked_tree: PyTree, mixing: Mixing, trim: int) -> PyTree:
  """Coordinate-wise trimmed mean over each neighbourhood, ``trim`` dropped at each end."""
  return _trimmed(stacked_tree, mixing, trim)


def median(stacked_tree: PyTree, mixing: Mixing) -> PyTree:
  """Coordinate-wise median over each neighbourhood."""
  return _trimmed(stacked_tree, mixing, None)


def aggregator(aggregation: str = "mean", *, clip_radius: float = 1.0,
               trim: int = 1) -> Callable[[PyTree, Mixing], PyTree]:
  """The rule ``aggregation`` as a function ``(stacked_tree, mixing) -> stacked_tree``."""
  check_options(aggregation, clip_radius, trim)
  if aggregation == "clipped":
    return lambda tree, m: clipped_gossip(tree, m, float(clip_radius))
  if aggregation == "trimmed_mean":
    return lambda tree, m: trimmed_mean(tree, m, int(trim))
  if aggregation == "median":
    return median
  return combine_lib.combine
