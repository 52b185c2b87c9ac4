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


def _keep_largest(x, score, k: int):
  """x with all but the k entries of largest ``score`` zeroed, ties to the lower index.

  A stable sort rather than ``lax.top_k``: XLA partitions a sort over a sharded agent axis,
  but gathers every agent's copy onto every device for a TopK (on CPU at least).
  """
  idx = jnp.argsort(-score, stable=True)[:k]
  return jnp.zeros_like(x).at[idx].set(x[idx])


def top_k(x, k: int):
  """x with all but its k largest-magnitude entries zeroed (x: a vector)."""
  return _keep_largest(x, jnp.abs(x), k)


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
