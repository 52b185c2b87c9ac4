"""The combine step ``x_k <- sum_l a_lk x_l`` over stacked pytrees.

Every leaf of a stacked tree has a leading agent axis K (see :mod:`drt_jax.types`). The sparse path
gathers each agent's D listed neighbours slot by slot, O(edges x params) work and no K x K matrix;
the dense path is the reference ``einsum('lk,l...->k...', A, x)``. Both accumulate in float32 (or
the leaf's dtype if wider) and return the leaf's dtype.

Per-layer combination (DRT diffusion) uses one weight array ``[K, D]`` per *layer*, a group of
leaves named by :func:`layer_names`.

Every neighbour's copy is fetched by :func:`neighbour` (or :func:`neighbours`), and that is where
simulated Byzantine agents (``Mixing.attack``, :mod:`drt_jax.faults`) put their attack messages
in place of their rows, so every algorithm built on these functions meets them unawares.
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import faults
from drt_jax.topology import Topology
from drt_jax.types import Mixing, PyTree


def as_mixing(topology: Topology | Mixing, step=0) -> Mixing:
  """A Topology's weights at ``step``, or a Mixing unchanged."""
  if isinstance(topology, Mixing):
    return topology
  if isinstance(topology, Topology):
    return topology.mixing(step)
  raise TypeError(f"expected a Topology or Mixing, got {type(topology).__name__}")


def _acc_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def neighbour(x, mixing: Mixing, j: int):
  """Every agent's j-th listed neighbour's copy of leaf ``x[K, ...]``: ``x[nbr_idx[:, j]]``.

  A gather in general; for circulant graphs (``mixing.shifts``) a roll of the agent grid, which
  XLA lowers to collective-permutes when the agent axis is sharded (only boundary agents move
  between devices). Time-varying shifts pick the step's roll with ``lax.switch``.

  With simulated Byzantine agents (``mixing.attack``, :mod:`drt_jax.faults`) a copy fetched from
  a Byzantine sender is its attack message; slot 0, the agent's own copy, is always its own.
  """
  return _fetch(faults.message(x, mixing.attack) if j else x, mixing, j)


def _fetch(x, mixing: Mixing, j: int):
  """``x[nbr_idx[:, j]]`` of rows as sent (by gather, or by roll for circulant graphs)."""
  shifts = mixing.shifts
  if shifts is None:
    return jnp.take(x, mixing.nbr_idx[:, j], axis=0)
  grid = tuple(shifts.grid)

  def roll(t):
    off = shifts.table[t][j]
    if not any(off):
      return x
    y = x.reshape(grid + x.shape[1:])
    y = jnp.roll(y, tuple(-o for o in off), axis=tuple(range(len(grid))))
    return y.reshape(x.shape)

  if len(shifts.table) == 1:
    return roll(0)
  return jax.lax.switch(mixing.t, [functools.partial(roll, t) for t in range(len(shifts.table))])


def neighbours(stacked_tree: PyTree, mixing: Mixing) -> list[list[jax.Array]]:
  """Every leaf's neighbour copies, slots 1..D-1 (:func:`neighbour`), in leaf order.

  Computed once and passed to both DRT's distances and :func:`combine_layers`: on an agents
  mesh each copy is a collective, which XLA does not merge when it is written twice.
  """
  width = mixing.nbr_idx.shape[1]
  sent = [faults.message(x, mixing.attack) for x in jax.tree.leaves(stacked_tree)]
  return [[_fetch(y, mixing, j) for j in range(1, width)] for y in sent]


def _combine_leaf(x, mixing: Mixing, nbr_w, nbrs=None):
  """sum_j nbr_w[k, j] * x[nbr_idx[k, j]] for one leaf ``x[K, ...]`` (``nbrs``: the copies
  ``x[nbr_idx[:, j]]`` of slots 1..D-1 when already at hand)."""
  dtype = _acc_dtype(x)
  expand = (slice(None),) + (None,) * (x.ndim - 1)
  out = nbr_w[:, 0].astype(dtype)[expand] * x.astype(dtype)  # slot 0 is the agent itself
  sent = faults.message(x, mixing.attack) if nbrs is None else None
  for j in range(1, nbr_w.shape[1]):
    y = _fetch(sent, mixing, j) if nbrs is None else nbrs[j - 1]
    out = out + nbr_w[:, j].astype(dtype)[expand] * y
  return out.astype(x.dtype)


def combine(stacked_tree: PyTree, topology: Topology | Mixing, step=0) -> PyTree:
  """Combines every leaf with the same weights: ``x_k <- sum_l a_lk x_l``.

  Args:
    stacked_tree: pytree whose leaves all have leading axis K.
    topology: a Topology (its matrix at ``step``) or one step's Mixing.
    step: picks the matrix of a time-varying Topology (may be traced).

  Example::

    topo = topology.make("ring", 4)
    x = {"w": jnp.arange(4.0)}
    combine(x, topo)["w"]   # each agent averages itself and its two neighbours
  """
  mix = as_mixing(topology, step)
  return jax.tree.map(lambda x: _combine_leaf(x, mix, mix.nbr_w), stacked_tree)


def combine_dense(stacked_tree: PyTree, a) -> PyTree:
  """Reference path: ``x_k <- sum_l A[l, k] x_l`` with a dense ``[K, K]`` matrix."""
  a = jnp.asarray(a)

  def leaf(x):
    dtype = _acc_dtype(x)
    return jnp.einsum("lk,l...->k...", a.astype(dtype), x.astype(dtype)).astype(x.dtype)

  return jax.tree.map(leaf, stacked_tree)


# --------------------------------------------------------------------------------------------
# Layers.


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(tree: PyTree) -> list[str]:
  """'/'-joined key paths of the leaves, in ``jax.tree.leaves`` order."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["/".join(_key_name(e) for e in path) for path, _ in paths]


def layer_names(tree: PyTree, granularity: str = "module") -> list[str]:
  """The layer each leaf belongs to, in leaf order.

  ``module`` (default): the leaf's path without its last key, so a dense layer's kernel and bias,
  or a BatchNorm's scale and bias, form one layer. ``leaf``: every leaf is its own layer.
  """
  if granularity not in ("module", "leaf"):
    raise ValueError(f"unknown layer granularity {granularity!r}; expected 'module' or 'leaf'")
  paths = leaf_paths(tree)
  if granularity == "leaf":
    return paths
  return [p.rsplit("/", 1)[0] if "/" in p else p for p in paths]


def unique_layers(names: list[str]) -> list[str]:
  """Layer names in first-appearance order."""
  return list(dict.fromkeys(names))


def layer_sq_norms(stacked_tree: PyTree, names: list[str]) -> dict[str, jax.Array]:
  """Per-agent squared Euclidean norm of each layer: dict layer -> ``[K]``."""
  out = {}
  for name, x in zip(names, jax.tree.leaves(stacked_tree)):
    sq = jnp.sum(jnp.square(x.astype(_acc_dtype(x))).reshape(x.shape[0], -1), axis=1)
    out[name] = out[name] + sq if name in out else sq
  return out


def layer_sizes(tree: PyTree, names: list[str], stacked: bool = True) -> dict[str, int]:
  """Number of scalars per agent in each layer."""
  out = {}
  for name, x in zip(names, jax.tree.leaves(tree)):
    size = int(np.prod(x.shape[1:] if stacked else x.shape))
    out[name] = out.get(name, 0) + size
  return out


def combine_layers(stacked_tree: PyTree, mixing, layer_w: Mapping[str, jax.Array],
                   names: list[str], nbrs: list | None = None) -> PyTree:
  """Combines each leaf with its layer's weights ``layer_w[name]`` (each ``[K, D]``).

  ``mixing`` gives the neighbour lists: a :class:`Mixing` (its weights are not used) or just the
  ``nbr_idx`` array. ``nbrs``: the leaves' neighbour copies from :func:`neighbours`, if computed.
  """
  if not isinstance(mixing, Mixing):
    mixing = Mixing(mixing, None)
  leaves, treedef = jax.tree.flatten(stacked_tree)
  nbrs = [None] * len(leaves) if nbrs is None else nbrs
  out = [_combine_leaf(x, mixing, layer_w[n], y)
         for x, n, y in zip(leaves, names, nbrs, strict=True)]
  return jax.tree.unflatten(treedef, out)


def combine_layers_dense(stacked_tree: PyTree, layer_a: Mapping, names: list[str]) -> PyTree:
  """Reference path of :func:`combine_layers` with dense ``[K, K]`` matrices per layer."""
  leaves, treedef = jax.tree.flatten(stacked_tree)
  out = [jax.tree.leaves(combine_dense([x], layer_a[n]))[0] for x, n in zip(leaves, names)]
  return jax.tree.unflatten(treedef, out)
