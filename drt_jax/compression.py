r"""Compression operators Q for communication-compressed gossip (CHOCO-SGD).

A compressor acts on **one agent's** pytree (leaves without the agent axis) and a PRNG key, and
returns a tree of the same shapes and dtypes; :func:`compress_stacked` vmaps it over the agent axis
of a stacked tree with one key per agent. Every leaf is compressed on its own, flattened to a
vector ``x`` of ``n`` entries:

============ =================================================================================
``none``     Q(x) = x
``top_k``    keeps the k = max(1, ceil(ratio n)) entries of largest magnitude (ties: the first
             ones), zeros the rest
``random_k`` keeps k entries drawn uniformly without replacement, zeros the rest (not rescaled)
``quantize`` Q(x) = ||x|| / (s tau) * sign(x_i) * floor(s |x_i| / ||x|| + u_i), u_i ~ U[0, 1),
             s = 2^bits - 1 levels, tau = 1 + min(n / s^2, sqrt(n) / s)
============ =================================================================================

``quantize`` is the stochastic quantiser of QSGD (Alistarh, Grubic, Li, Tomioka & Vojnovic 2017,
arXiv 1610.02132), unbiased before the division by tau: E[Q(x)] = x / tau. The division makes it a
contraction, E||Q(x) - x||^2 <= (1 - delta) ||x||^2 with delta = 1 / tau, which is how CHOCO uses
it (Koloskova, Stich & Jaggi 2019, arXiv 1902.00340, Section 5 and Appendix). top_k and random_k
are contractions with delta = k / n. :func:`delta` gives the smallest delta over a tree's leaves.

Keys: random_k and quantize draw from the key they are given, folded with the leaf's index; the
caller derives it from a seed and the step count (:func:`compress_stacked` folds in the agent's
index), so a run is reproducible and no Python randomness is involved.

Message sizes (:func:`message_bytes`, per leaf, summed; derived by this project, not the papers):
``none`` sends the values; ``top_k``/``random_k`` send k values in the leaf's dtype and k int32
indices; ``quantize`` sends one float32 norm and n (bits + 1) bits (sign and level), rounded up to
whole bytes.
"""

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.types import PyTree

COMPRESSORS = ("none", "top_k", "random_k", "quantize")
MAX_BITS = 16


class Compressor(NamedTuple):
  """One compressor's pure functions (see the module docstring); built by :func:`make`."""

  compress: Callable[[PyTree, jax.Array], PyTree]  # (one agent's tree, key) -> Q(tree)
  message_bytes: Callable[[PyTree], int]  # one agent's tree (arrays or ShapeDtypeStructs) -> bytes
  delta: Callable[[PyTree], float]  # the contraction parameter, smallest over the leaves
  name: str


def check_options(compressor, ratio, bits) -> None:
  """Raises a one-line ValueError naming a bad compressor, ratio or bits and what is accepted."""
  if compressor not in COMPRESSORS:
    raise ValueError(f"unknown compressor {compressor!r}; expected one of: "
                     f"{', '.join(COMPRESSORS)}")
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
    raise ValueError(f"ratio={ratio!r} must be a number in (0, 1] (the fraction of each leaf's "
                     "entries top_k and random_k keep)")
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits={bits!r} must be an integer in 1..{MAX_BITS} (quantize's bits per "
                     "level, sign not counted)")


def kept(n: int, ratio: float) -> int:
  """k = max(1, ceil(ratio n)), the rounding error of ``ratio * n`` ignored (0.3 * 10 is 3)."""
  return min(n, max(1, math.ceil(round(ratio * n, 6))))


def levels(bits: int) -> int:
  """s = 2^bits - 1, the number of nonzero quantisation levels."""
  return 2 ** bits - 1


def tau(n: int, bits: int) -> float:
  """QSGD's variance factor tau = 1 + min(n / s^2, sqrt(n) / s); CHOCO divides Q by it."""
  s = levels(bits)
  return 1.0 + min(n / s ** 2, math.sqrt(n) / s)


# --------------------------------------------------------------------------------------------
# The operators on one flat vector.


def _acc(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_CHUNK = 32  # entries per partial count, at most 127 (int8)
_WAYS = 8  # a selection round splits the candidate thresholds into this many parts


def _counts(mask):
  """[m] counts of the True entries of the [n, m] ``mask`` over its first axis (n a multiple of
  _CHUNK).

  Counted in int8 over chunks first: XLA:CPU fuses the mask into these short sums and runs them
  several times faster than one long int32 sum, which it splits and materialises the mask for.
  """
  chunks = jnp.sum(mask.reshape(-1, _CHUNK, mask.shape[-1]), axis=1, dtype=jnp.int8)
  return jnp.sum(chunks, axis=0, dtype=jnp.int32)


def _rounds(span: int) -> int:
  """Rounds of :func:`_largest_passing` that narrow ``span + 1`` candidates down to one."""
  rounds = 0
  while span > 0:
    span //= _WAYS
    rounds += 1
  return rounds


def _largest_passing(count_ge, k, lo, hi, c_lo, c_hi, loop):
  """The largest t in [lo, hi] with count_ge(t) >= k, count_ge non-increasing, given
  c_lo = count_ge(lo) >= k > c_hi = count_ge(hi + 1); returns (t, count_ge(t), count_ge(t + 1)).

  Each round counts at _WAYS - 1 thresholds in one pass over the data and keeps the part that
  holds t: a third of a bisection's passes, whose memory traffic dominates their cost.
  ``count_ge`` maps [m] thresholds to [m] counts; ``loop`` is an int (that many rounds) or None
  (rounds until lo == hi: batched over agents, until it holds for all of them).
  """
  m = _WAYS - 1

  def body(state):
    lo, hi, c_lo, c_hi = state
    span = hi - lo  # thresholds lo + ceil(i span / _WAYS) for i = 1..m, ascending, no overflow
    q, r = span // _WAYS, span % _WAYS
    i = jnp.arange(1, _WAYS, dtype=lo.dtype)
    mids = lo + i * q + (i * r + m) // _WAYS
    c = count_ge(mids)
    ok = c >= k  # true then false along the thresholds
    return (jnp.max(jnp.where(ok, mids, lo)), jnp.min(jnp.where(ok, hi, mids - 1)),
            jnp.min(jnp.where(ok, c, c_lo)), jnp.max(jnp.where(ok, c_hi, c)))

  state = (lo, hi, c_lo, c_hi)
  if loop is None:
    state = jax.lax.while_loop(lambda s: s[0] < s[1], body, state)
  else:
    state = jax.lax.fori_loop(0, loop, lambda _, s: body(s), state)
  lo, _, c_lo, c_hi = state
  return lo, c_lo, c_hi


def _order_bits(score):
  """|score| (float32 at least: float16 and bfloat16 are widened exactly) viewed as a signed
  integer of its width with the sign bit cleared: non-negative, and ordered as the magnitudes
  are (+0 lowest, then the subnormals, normals, inf, and NaN above all)."""
  score = _acc(score)
  itype = jnp.int64 if score.dtype == jnp.float64 else jnp.int32
  return jax.lax.bitcast_convert_type(score, itype) & jnp.iinfo(itype).max


def _keep_largest(x, score, k: int):
  """x with all but the k entries of largest ``|score|`` zeroed, ties to the lower index: the
  entries a stable descending sort of ``|score|`` puts first (NaN above inf).

  Neither a sort nor ``lax.top_k``, which XLA partitions badly over a sharded agent axis (a
  TopK gathers every agent's copy onto every device) and both run slowly on CPU. Instead the
  k-th largest magnitude t, found exactly on the bits of |score| (for non-negative floats their
  integer view is order-preserving) by a multiway bisection; then the entries above t and, of
  those equal to t, the first ones, cut at an index found the same way (skipped, for all agents
  once batched, unless some agent has more ties at t than it can keep). Only elementwise ops
  and sums along the vector, so it batches and partitions over agents.
  """
  n = x.size
  padded = -(-n // _CHUNK) * _CHUNK
  # padding is -1, never counted; materialised once, as XLA would otherwise fuse a costly
  # score (random bits) into every use
  bits = jax.lax.optimization_barrier(
      jnp.pad(_order_bits(score), (0, padded - n), constant_values=-1))
  top = jnp.iinfo(bits.dtype).max
  zero, count0 = jnp.zeros((), bits.dtype), jnp.int32(0)
  t, c_ge, c_gt = _largest_passing(lambda mids: _counts(bits[:, None] >= mids), k, zero,
                                   jnp.array(top, bits.dtype), jnp.int32(n), count0,
                                   _rounds(top))
  # keep the tied entries up to index p, the (c_ge - k + 1)-th largest index among them
  idx = jnp.arange(padded, dtype=jnp.int32)
  tied = bits == t
  surplus = c_ge > k
  p, _, _ = _largest_passing(lambda mids: _counts(tied[:, None] & (idx[:, None] >= mids)),
                             c_ge - k + 1, jnp.where(surplus, 0, n).astype(jnp.int32),
                             jnp.where(surplus, n - 1, n).astype(jnp.int32), c_ge - c_gt, count0,
                             None)
  keep = ((bits > t) | (tied & (idx <= p)))[:n]
  return jnp.where(keep, x, jnp.zeros_like(x))


def top_k(x, k: int):
  """x with all but its k largest-magnitude entries zeroed (x: a vector)."""
  return _keep_largest(x, x, k)


def random_k(x, k: int, key):
  """x with all but k entries, drawn uniformly without replacement, zeroed (x: a vector)."""
  # the k largest of n iid uniforms are a uniformly random k-subset
  return _keep_largest(x, jax.random.uniform(key, x.shape), k)


def quantize(x, bits: int, key):
  """QSGD's stochastic quantisation of the vector x, divided by tau (module docstring)."""
  s = levels(bits)
  x = _acc(x)
  norm = jnp.linalg.norm(x)
  safe = jnp.where(norm > 0, norm, 1.0)
  u = jax.random.uniform(key, x.shape, x.dtype)
  # s |x_i| / ||x|| <= s exactly; the clamp only catches a rounding overshoot to s + 1
  level = jnp.minimum(jnp.floor(s * jnp.abs(x) / safe + u), s)
  return jnp.sign(x) * level * (norm / (s * tau(x.size, bits)))


# --------------------------------------------------------------------------------------------
# Trees.


def _sizes(tree: PyTree) -> list[tuple[int, int]]:
  """(entries, bytes per entry) of each leaf of one agent's tree."""
  return [(int(np.prod(x.shape)), np.dtype(x.dtype).itemsize) for x in jax.tree.leaves(tree)]


def message_bytes(tree: PyTree, compressor: str = "none", *, ratio: float = 0.1,
                  bits: int = 4) -> int:
  """Exact bytes one agent sends per message: ``tree`` is one agent's tree (no agent axis) of
  arrays or ``jax.ShapeDtypeStruct`` s; the counts per leaf are in the module docstring."""
  check_options(compressor, ratio, bits)
  total = 0
  for n, itemsize in _sizes(tree):
    if compressor == "none":
      total += n * itemsize
    elif compressor in ("top_k", "random_k"):
      total += kept(n, ratio) * (itemsize + 4)  # values and int32 indices
    else:
      total += 4 + math.ceil(n * (bits + 1) / 8)  # float32 norm, then sign and level bits
  return total


def delta(tree: PyTree, compressor: str = "none", *, ratio: float = 0.1, bits: int = 4) -> float:
  """The contraction parameter delta of ``compressor`` on one agent's ``tree``: the smallest over
  the leaves of 1 (none), k / n (top_k, random_k) or 1 / tau (quantize)."""
  check_options(compressor, ratio, bits)
  if compressor == "none":
    return 1.0
  if compressor == "quantize":
    return min((1.0 / tau(n, bits) for n, _ in _sizes(tree)), default=1.0)
  return min((kept(n, ratio) / n for n, _ in _sizes(tree) if n), default=1.0)


def make(compressor: str = "top_k", *, ratio: float = 0.1, bits: int = 4) -> Compressor:
  """The compressor ``compressor`` (one of :data:`COMPRESSORS`); options are checked here.

  Example::

    q = compression.make("top_k", ratio=0.25)
    q.compress({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, jax.random.key(0))  # {'w': [0, -3, 0, 0]}
  """
  check_options(compressor, ratio, bits)

  def leaf(x, key):
    flat = x.reshape(-1)
    if flat.size == 0:
      return x
    if compressor == "top_k":
      out = top_k(flat, kept(flat.size, ratio))
    elif compressor == "random_k":
      out = random_k(flat, kept(flat.size, ratio), key)
    else:
      out = quantize(flat, bits, key)
    return out.reshape(x.shape).astype(x.dtype)

  def compress(tree, key):
    if compressor == "none":
      return tree
    leaves, treedef = jax.tree.flatten(tree)
    out = [leaf(x, jax.random.fold_in(key, i)) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)

  opts = {"ratio": ratio, "bits": bits}
  return Compressor(compress, lambda tree: message_bytes(tree, compressor, **opts),
                    lambda tree: delta(tree, compressor, **opts), compressor)


def compress_stacked(comp: Compressor, stacked_tree: PyTree, key) -> PyTree:
  """Q applied to every agent's copy of a stacked tree (leaves ``[K, ...]``), agent k with the
  key ``fold_in(key, k)``: pass the step's key, e.g. ``fold_in(key(seed), step)``."""
  k_count = jax.tree.leaves(stacked_tree)[0].shape[0]
  keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(k_count))
  return jax.vmap(comp.compress)(stacked_tree, keys)
