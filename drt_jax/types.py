"""Shared types and the one representation every module follows.

**Stacked trees.** Every system-level pytree (parameters, BatchNorm statistics, optimizer state,
per-agent metrics) carries a leading *agent axis* of size K on every leaf: leaf ``x`` of shape
``[K, ...]`` holds agent k's copy in ``x[k]``. Stacked trees are consumed only by per-agent code
that is vmapped (or mapped, or sharded) over that axis, or by :mod:`drt_jax.combine`.

**Orientation.** A combination matrix ``A`` has ``A[l, k] = a_lk``, the weight agent k gives to
agent l; its *columns* sum to one (Sayed's convention), and combining is
``x_k <- sum_l a_lk x_l``.
"""

from typing import Any, NamedTuple

import jax

PyTree = Any
Array = jax.Array


class Shifts(NamedTuple):
  """Static structure of a circulant graph: every neighbour slot is one shift of an agent grid.

  Agents sit on a grid of shape ``grid`` (``(K,)`` for a ring, ``(rows, cols)`` for a torus), in
  row-major order. ``table[t][j]`` is the grid offset of slot j at step t of the period: agent k's
  j-th neighbour is the agent at ``position(k) + table[t][j]`` (modulo the grid). A neighbour
  exchange is then a roll of the stacked array, which XLA lowers to collective-permutes between
  devices instead of gathering every agent's parameters everywhere.
  """

  grid: tuple
  table: tuple  # [T][D] tuples of per-axis offsets


# Compile-time data: a pytree node without children, so it never becomes a tracer.
jax.tree_util.register_pytree_node(Shifts, lambda s: ((), tuple(s)), lambda aux, _: Shifts(*aux))


class Attack(NamedTuple):
  """What the Byzantine agents send at one step instead of their own copies (see
  :mod:`drt_jax.faults`): :func:`drt_jax.combine.neighbour` replaces their rows of every leaf by
  the attack message before the exchange. ``kind`` and ``scale`` are compile-time data."""

  byzantine: Array  # bool[K]: the Byzantine agents
  key: Array  # the step's typed PRNG key (random attacks)
  kind: str = "sign_flip"  # one of drt_jax.faults.ATTACKS
  scale: float = 10.0


jax.tree_util.register_pytree_node(
    Attack, lambda a: ((a.byzantine, a.key), (a.kind, a.scale)),
    lambda aux, children: Attack(*children, *aux))


class Mixing(NamedTuple):
  """One step's combination weights as a padded neighbour list (device arrays).

  Row k lists the agents k listens to: ``nbr_idx[k, j] = l`` and ``nbr_w[k, j] = a_lk``.
  Slot 0 is always agent k itself (its self-weight ``a_kk``); padding slots point at k with
  weight 0, so gathers never go out of range. For circulant graphs ``shifts`` describes the
  same lists as grid offsets (and ``t`` is the step within the period), so that neighbours are
  fetched by rolls rather than gathers; code that changes the weights keeps them with
  ``mixing._replace(nbr_w=...)``. ``attack`` (simulated Byzantine agents, None without) changes
  what the neighbours receive, not the weights.
  """

  nbr_idx: Array  # int32[K, D]
  nbr_w: Array  # float32[K, D]
  shifts: Shifts | None = None
  t: Array | None = None  # int32 scalar: the step within the period (time-varying shifts)
  attack: Attack | None = None
