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


class Mixing(NamedTuple):
  """One step's combination weights as a padded neighbour list (device arrays).

  Row k lists the agents k listens to: ``nbr_idx[k, j] = l`` and ``nbr_w[k, j] = a_lk``.
  Slot 0 is always agent k itself (its self-weight ``a_kk``); padding slots point at k with
  weight 0, so gathers never go out of range.
  """

  nbr_idx: Array  # int32[K, D]
  nbr_w: Array  # float32[K, D]
