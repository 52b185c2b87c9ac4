"""Communication graphs and their combination weights, built on the host with numpy.

Convention (pinned by ``topology_test.py``): ``A[l, k] = a_lk`` is the weight agent k gives to
agent l, ``a_lk = 0`` unless l is in k's neighbourhood N_k (which contains k), and **every column
sums to one**. Combining is ``x_k <- sum_l a_lk x_l``.

A :class:`Topology` is data, not code: a padded neighbour list ``nbr_idx[T, K, D]``,
``nbr_w[T, K, D]`` holding the matrices of one period of T steps (T = 1 for a static graph). Row
``[t, k]`` lists the agents k listens to at step t; slot 0 is k itself and padding slots point at k
with weight 0. It is a pytree whose leaves are those two arrays, so the compiled train step takes
it as an argument: new weights or a time-varying schedule never recompile (only shapes are static).

Graphs (``make(kind, K)``):

============================ ========== ===================================================
kind                         directed   neighbours of agent k
============================ ========== ===================================================
``ring``                     no         k - 1, k + 1 (mod K)
``torus``                    no         4 neighbours on a ``rows x cols`` grid with wrap-around
``grid``                     no         up to 4 neighbours on a ``rows x cols`` grid
``full``                     no         everyone
``star``                     no         hub 0 talks to everyone, leaves only to the hub
``erdos_renyi``              no         each pair independently with probability ``p``
``exponential``              yes        k listens to k - 2^i (mod K), i = 0 .. floor(log2(K-1))
``one_peer_exponential``     yes        at step t: only k - 2^(t mod tau), tau = ceil(log2 K)
``random_matching``          no         at step t: its partner in a seeded random matching
============================ ========== ===================================================

The last two are time-varying (Ying et al. 2021, arXiv 2110.13363, for the exponential graphs):
single steps are disconnected, so connectivity is checked over the union of one period.

Weight rules: ``metropolis`` (default): a_lk = 1 / (1 + max(d_k, d_l)) for neighbours, the rest on
the diagonal; symmetric (hence doubly stochastic) on undirected graphs. On directed graphs d is the
in-degree: the columns still sum to one, and on the regular directed graphs above it coincides with
``uniform``. ``uniform``: a_lk = 1 / (1 + d_k) for every l in N_k (symmetric only on regular
graphs).
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.types import Mixing, Shifts

WEIGHT_RULES = ("metropolis", "uniform")
_ATOL = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
  """A (possibly time-varying) combination matrix as a padded neighbour list.

  Attributes:
    nbr_idx: int32[T, K, D]: ``nbr_idx[t, k, j]`` is the j-th agent k listens to at step t.
    nbr_w: float32[T, K, D]: the matching weights ``a_lk``; slot 0 is the self-weight.
    kind: the graph's name.
    directed: whether some edge is one-way.
  """

  nbr_idx: np.ndarray
  nbr_w: np.ndarray
  kind: str = "custom"
  directed: bool = False
  shifts: Shifts | None = None  # circulant structure of the lists, when they have one

  @property
  def num_agents(self) -> int:
    """K, the number of agents."""
    return self.nbr_idx.shape[-2]

  @property
  def period(self) -> int:
    """T, the number of matrices a schedule cycles through (1 for a static graph)."""
    return self.nbr_idx.shape[0]

  @property
  def max_degree(self) -> int:
    """D - 1: the most neighbours (self excluded) any agent listens to at any step."""
    return self.nbr_idx.shape[-1] - 1

  @property
  def time_varying(self) -> bool:
    """Whether the matrix changes with the step (``period > 1``)."""
    return self.period > 1

  def mixing(self, step=0) -> Mixing:
    """The combination weights at ``step`` (may be a traced integer) as device arrays."""
    t = step % self.period
    return Mixing(jnp.asarray(self.nbr_idx)[t], jnp.asarray(self.nbr_w)[t], self.shifts,
                  jnp.asarray(t, jnp.int32) if self.shifts and self.period > 1 else None)

  def dense(self, step: int = 0) -> np.ndarray:
    """The dense ``[K, K]`` matrix at ``step`` with ``A[l, k] = a_lk`` (columns sum to one)."""
    return to_dense(np.asarray(self.nbr_idx)[step % self.period],
                     np.asarray(self.nbr_w)[step % self.period])

  def dense_schedule(self) -> np.ndarray:
    """All matrices of one period, ``[T, K, K]``."""
    return np.stack([self.dense(t) for t in range(self.period)])

  @property
  def symmetric(self) -> bool:
    """Whether every matrix of the period equals its transpose (then rows sum to one too)."""
    return all(np.allclose(a, a.T, atol=_ATOL) for a in self.dense_schedule())

  def num_edges(self, step: int = 0) -> int:
    """Directed links (l -> k, l != k) with positive weight at ``step``."""
    a = self.dense(step)
    return int(np.count_nonzero(a - np.diag(np.diag(a)) > 0))

  def slem(self) -> float:
    """Second-largest eigenvalue modulus, the per-step rate at which disagreement contracts.

    For a time-varying schedule, the SLEM of the product over one period, to the power 1/T.
    """
    prod = np.eye(self.num_agents)
    for a in self.dense_schedule():
      prod = prod @ a
    mods = np.sort(np.abs(np.linalg.eigvals(prod)))[::-1]
    mods[mods < 1e-10] = 0.0  # rounding noise of an exact average; its 1/T-th root would not be
    second = float(mods[1]) if len(mods) > 1 else 0.0
    return second ** (1.0 / self.period)

  def spectral_gap(self) -> float:
    """``1 - slem()``: larger means faster mixing."""
    return 1.0 - self.slem()

  def lazy(self, alpha: float) -> "Topology":
    """``alpha * I + (1 - alpha) * A``: slower mixing with the same graph (keeps symmetry)."""
    if not 0.0 <= alpha < 1.0:
      raise ValueError(f"lazy alpha={alpha} is outside [0, 1); pick a self-weight share below 1")
    w = np.asarray(self.nbr_w) * (1.0 - alpha)
    w[..., 0] += alpha
    return dataclasses.replace(self, nbr_w=w.astype(np.float32), kind=f"{self.kind}_lazy")

  def with_self_weight(self, s: float) -> "Topology":
    """Every agent keeps share ``s`` of itself; its neighbours' weights are rescaled to ``1 - s``.

    Columns still sum to one; on a regular graph with symmetric weights (ring, torus) the matrix
    stays symmetric. An agent without neighbours at a step keeps weight one. Used for baselines
    with matched mixing (the same self-weight as another method's run).
    """
    if not 0.0 < s < 1.0:
      raise ValueError(f"self_weight={s} is outside (0, 1); pick the share each agent keeps")
    w = np.asarray(self.nbr_w, np.float64).copy()
    old = w[..., 0]
    has_nbrs = old < 1.0 - 1e-9
    scale = np.where(has_nbrs, (1.0 - s) / np.where(has_nbrs, 1.0 - old, 1.0), 1.0)
    w[..., 1:] *= scale[..., None]
    w[..., 0] = np.where(has_nbrs, s, old)
    return dataclasses.replace(self, nbr_w=w.astype(np.float32),
                               kind=f"{self.kind}_self{s:g}")

  def __repr__(self):
    return (f"Topology(kind={self.kind!r}, K={self.num_agents}, period={self.period}, "
            f"max_degree={self.max_degree}, directed={self.directed})")


# The two arrays are the pytree children; the only static part is the circulant structure, so
# any topology of the same padded shape and structure -- other weights, a lazy or matched-mixing
# variant -- reuses a compiled step. Inside a traced function the name and flag are not needed
# (and not kept).
jax.tree_util.register_pytree_node(
    Topology, lambda t: ((t.nbr_idx, t.nbr_w), t.shifts),
    lambda shifts, c: Topology(*c, shifts=shifts))


# --------------------------------------------------------------------------------------------
# Dense <-> neighbour list.


def to_dense(nbr_idx: np.ndarray, nbr_w: np.ndarray) -> np.ndarray:
  """One step's neighbour list ``[K, D]`` -> dense ``A[l, k] = a_lk``."""
  k_count = nbr_idx.shape[0]
  a = np.zeros((k_count, k_count), np.float64)
  cols = np.repeat(np.arange(k_count), nbr_idx.shape[1])
  np.add.at(a, (nbr_idx.reshape(-1), cols), nbr_w.reshape(-1))
  return a


def _to_neighbour_list(mats: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """``[T, K, K]`` dense matrices -> padded lists ``[T, K, width]`` (self first)."""
  t_count, k_count, _ = mats.shape
  idx = np.tile(np.arange(k_count, dtype=np.int32)[None, :, None], (t_count, 1, width))
  w = np.zeros((t_count, k_count, width), np.float32)
  for t in range(t_count):
    for k in range(k_count):
      others = [l for l in np.flatnonzero(mats[t, :, k] != 0) if l != k]
      idx[t, k, 1:1 + len(others)] = others
      w[t, k, 0] = mats[t, k, k]
      w[t, k, 1:1 + len(others)] = mats[t, others, k]
  return idx, w


def check_matrix(a: np.ndarray, num_agents: int | None = None, name: str = "A") -> None:
  """Raises ValueError unless ``a`` is a square, non-negative, column-stochastic matrix."""
  a = np.asarray(a)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"{name} has shape {a.shape}; expected a square [K, K] matrix")
  if num_agents is not None and a.shape[0] != num_agents:
    raise ValueError(f"{name} is for K={a.shape[0]} agents but the run has K={num_agents}; "
                     "build the topology with the run's number of agents")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has non-finite entries; every weight must be a finite number >= 0")
  if np.any(a < -_ATOL):
    raise ValueError(f"{name} has negative weights (min {a.min():.3g}); weights must be >= 0")
  sums = a.sum(axis=0)
  bad = np.flatnonzero(np.abs(sums - 1.0) > _ATOL)
  if bad.size:
    raise ValueError(f"{name}: column {bad[0]} sums to {sums[bad[0]]:.6g}, not 1; columns of "
                     "A[l, k] = a_lk must sum to one (transpose a row-stochastic matrix)")


def _strongly_connected(adj: np.ndarray) -> bool:
  """``adj[l, k]`` true when k hears from l; every agent must reach every other."""
  n = adj.shape[0]
  reach = adj | np.eye(n, dtype=bool)
  for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
    reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
  return bool(reach.all())


def check_connected(mats: np.ndarray, what: str) -> None:
  """Raises ValueError unless the union of the graphs of ``mats`` ``[T, K, K]`` is strongly
  connected (information from every agent reaches every other within one period)."""
  adj = (np.abs(np.asarray(mats)) > 0).any(axis=0)
  if not _strongly_connected(adj):
    raise ValueError(f"{what} is disconnected (over one period): some agents can never hear from "
                     "others; use a connected graph")


def from_matrices(mats, *, kind: str = "custom", check_connectivity: bool = True) -> Topology:
  """Builds a Topology from a dense ``[K, K]`` matrix or a ``[T, K, K]`` schedule.

  Every matrix is checked: non-negative, columns summing to one, and the union over the schedule
  connected (unless ``check_connectivity=False``, e.g. for the ``local`` baseline).
  """
  mats = np.asarray(mats, np.float64)
  if mats.ndim == 2:
    mats = mats[None]
  if mats.ndim != 3:
    raise ValueError(f"combination matrices have shape {mats.shape}; expected [K, K] or [T, K, K]")
  for t, a in enumerate(mats):
    check_matrix(a, name=f"{kind} matrix at step {t}" if len(mats) > 1 else f"{kind} matrix")
  if check_connectivity:
    check_connected(mats, f"the {kind} graph")
  off = mats.copy()
  k_count = mats.shape[-1]
  off[:, np.arange(k_count), np.arange(k_count)] = 0
  width = 1 + int((off != 0).sum(axis=1).max()) if k_count > 1 else 1
  idx, w = _to_neighbour_list(mats, width)
  idx, w, shifts = circulant_order(idx, w)
  directed = not all(np.array_equal(a != 0, (a != 0).T) for a in mats)
  return Topology(idx, w, kind=kind, directed=directed, shifts=shifts)


MAX_ROLLS = 16  # beyond this many neighbour slots, gathers compile faster than rolls


def _grids(k_count: int):
  yield (k_count,)
  for rows in range(2, k_count // 2 + 1):
    if k_count % rows == 0:
      yield (rows, k_count // rows)


def circulant_order(idx: np.ndarray, w: np.ndarray):
  """Reorders each agent's neighbour slots so that slot j is the same grid offset for every
  agent, when the graph is circulant on a 1-D or 2-D grid of the agents (ring, torus, static and
  one-peer exponential, full); returns ``(idx, w, Shifts or None)``.
  """
  t_count, k_count, width = idx.shape
  if k_count < 2 or width < 2 or width - 1 > MAX_ROLLS:
    return idx, w, None
  for grid in _grids(k_count):
    pos = np.stack(np.unravel_index(np.arange(k_count), grid), axis=-1)  # [K, axes]
    new_idx, new_w, table = idx.copy(), w.copy(), []
    for t in range(t_count):
      offsets = (pos[idx[t]] - pos[:, None, :]) % np.array(grid)  # [K, D, axes]
      live = w[t] > 0
      live[:, 0] = False
      sets = {tuple(sorted(map(tuple, offsets[k][live[k]]))) for k in range(k_count)}
      if len(sets) != 1:
        break
      (order,) = sets
      if len(order) > width - 1 or len(set(order)) != len(order):
        break
      row = [tuple(0 for _ in grid)] + list(order)
      row += [row[0]] * (width - len(row))  # padding slots: the agent itself, weight 0
      for k in range(k_count):
        slot = {tuple(o): j for j, o in enumerate(offsets[k]) if live[k, j]}
        for j, off in enumerate(row[1:], 1):
          if j <= len(order):
            new_idx[t, k, j] = idx[t, k, slot[off]]
            new_w[t, k, j] = w[t, k, slot[off]]
          else:
            new_idx[t, k, j], new_w[t, k, j] = k, 0.0
      table.append(tuple(tuple(int(o) for o in off) for off in row))
    else:
      return new_idx, new_w, Shifts(tuple(grid), tuple(table))
  return idx, w, None


def identity(num_agents: int) -> Topology:
  """No communication: ``A = I`` (the ``local`` baseline)."""
  return from_matrices(np.eye(num_agents), kind="identity", check_connectivity=False)


# --------------------------------------------------------------------------------------------
# Graphs as adjacency: adj[l, k] is True when k listens to l (l != k).


def _undirected(num_agents: int, pairs) -> np.ndarray:
  adj = np.zeros((num_agents, num_agents), bool)
  for a, b in pairs:
    if a != b:
      adj[a, b] = adj[b, a] = True
  return adj


def _ring(num_agents):
  return _undirected(num_agents, [(k, (k + 1) % num_agents) for k in range(num_agents)])


def _grid_shape(num_agents: int, rows: int | None, cols: int | None) -> tuple[int, int]:
  for name, v in (("rows", rows), ("cols", cols)):
    if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
      raise ValueError(f"grid option {name}={v!r} must be an integer >= 1 (rows x cols = K)")
  if rows is None and cols is None:
    rows = max(r for r in range(1, int(math.isqrt(num_agents)) + 1) if num_agents % r == 0)
  if rows is None:
    rows = num_agents // cols
  cols = num_agents // rows if cols is None else cols
  if rows * cols != num_agents:
    raise ValueError(f"grid shape rows={rows} x cols={cols} does not hold K={num_agents} agents; "
                     "pass rows and cols whose product is K")
  return rows, cols


def _lattice(num_agents, rows=None, cols=None, wrap=True):
  rows, cols = _grid_shape(num_agents, rows, cols)
  at = lambda r, c: r * cols + c  # noqa: E731
  pairs = []
  for r in range(rows):
    for c in range(cols):
      if wrap or c + 1 < cols:
        pairs.append((at(r, c), at(r, (c + 1) % cols)))
      if wrap or r + 1 < rows:
        pairs.append((at(r, c), at((r + 1) % rows, c)))
  return _undirected(num_agents, pairs)


def _torus(num_agents, rows=None, cols=None):
  return _lattice(num_agents, rows, cols, wrap=True)


def _grid(num_agents, rows=None, cols=None):
  return _lattice(num_agents, rows, cols, wrap=False)


def _full(num_agents):
  return ~np.eye(num_agents, dtype=bool)


def _star(num_agents):
  return _undirected(num_agents, [(0, k) for k in range(1, num_agents)])


def _erdos_renyi(num_agents, seed=0, p=None):
  if p is None:
    p = min(1.0, 2.0 * math.log(max(num_agents, 2)) / num_agents)
  if not 0.0 < p <= 1.0:
    raise ValueError(f"erdos_renyi p={p} is outside (0, 1]; pass an edge probability in (0, 1]")
  upper = np.triu(np.random.default_rng(seed).random((num_agents, num_agents)) < p, 1)
  adj = upper | upper.T
  if not _strongly_connected(adj):
    raise ValueError(f"erdos_renyi draw with K={num_agents}, p={p:.3g}, seed={seed} is "
                     "disconnected; raise p or try another seed")
  return adj


def _exponential_hops(num_agents: int) -> list[int]:
  return [2 ** i for i in range(max(1, math.ceil(math.log2(num_agents))))
          if 2 ** i < num_agents] if num_agents > 1 else []


def _exponential(num_agents):
  adj = np.zeros((num_agents, num_agents), bool)
  for k in range(num_agents):
    for hop in _exponential_hops(num_agents):
      adj[(k - hop) % num_agents, k] = True
  return adj


def _one_peer_exponential(num_agents):
  hops = _exponential_hops(num_agents) or [0]
  schedule = []
  for hop in hops:
    adj = np.zeros((num_agents, num_agents), bool)
    for k in range(num_agents):
      if hop:
        adj[(k - hop) % num_agents, k] = True
    schedule.append(adj)
  return np.stack(schedule)


def _random_matching(num_agents, seed=0, period=16):
  if period < 1:
    raise ValueError(f"random_matching period={period} must be >= 1")
  rng = np.random.default_rng(seed)
  schedule = []
  for _ in range(period):
    perm = rng.permutation(num_agents)
    schedule.append(_undirected(num_agents, zip(perm[0::2], perm[1::2])))
  return np.stack(schedule)


_GRAPHS = {
    "ring": _ring,
    "torus": _torus,
    "grid": _grid,
    "full": _full,
    "star": _star,
    "erdos_renyi": _erdos_renyi,
    "exponential": _exponential,
    "one_peer_exponential": _one_peer_exponential,
    "random_matching": _random_matching,
}
KINDS = tuple(_GRAPHS)


def _weights(adj: np.ndarray, rule: str) -> np.ndarray:
  """Column-stochastic weights on the graph ``adj`` (self-loops added)."""
  deg = adj.sum(axis=0).astype(np.float64)  # in-degree: how many agents k listens to
  if rule == "metropolis":
    a = np.where(adj, 1.0 / (1.0 + np.maximum(deg[None, :], deg[:, None])), 0.0)
  else:  # uniform
    a = np.where(adj, 1.0 / (1.0 + deg[None, :]), 0.0)
  a[np.diag_indices_from(a)] = 1.0 - a.sum(axis=0)
  return a


def options(kind: str) -> tuple[str, ...]:
  """The graph options :func:`make` takes for ``kind`` (``config.topology_options``)."""
  if kind not in _GRAPHS:
    raise ValueError(f"unknown topology {kind!r}; expected one of: {', '.join(KINDS)}")
  own = [n for n in inspect.signature(_GRAPHS[kind]).parameters if n not in ("num_agents", "seed")]
  return (*own, "lazy", "self_weight")


def make(kind: str, num_agents: int, *, weights: str = "metropolis", seed: int = 0,
         **kw) -> Topology:
  """Builds a named topology for ``num_agents`` agents.

  Args:
    kind: one of :data:`KINDS` (see the module docstring).
    num_agents: K >= 1.
    weights: ``"metropolis"`` (default) or ``"uniform"``.
    seed: seeds random graphs (``erdos_renyi``, ``random_matching``).
    **kw: graph options: ``rows``/``cols`` (torus, grid), ``p`` (erdos_renyi), ``period``
      (random_matching), ``lazy`` (a self-weight share alpha: ``alpha I + (1 - alpha) A``),
      ``self_weight`` (every agent's self-weight set to s, see :meth:`Topology.with_self_weight`).

  Example::

    topo = drt_jax.topology.make("ring", 8)
    a = topo.dense()            # a[l, k] = a_lk; a.sum(axis=0) == 1
  """
  if kind not in _GRAPHS:
    raise ValueError(f"unknown topology {kind!r}; expected one of: {', '.join(KINDS)}")
  if weights not in WEIGHT_RULES:
    raise ValueError(f"unknown weight rule {weights!r}; expected one of: "
                     f"{', '.join(WEIGHT_RULES)}")
  if (not isinstance(num_agents, (int, np.integer)) or isinstance(num_agents, bool)
      or num_agents < 1):
    raise ValueError(f"num_agents={num_agents!r} must be an integer >= 1")
  lazy = kw.pop("lazy", None)
  self_weight = kw.pop("self_weight", None)
  builder = _GRAPHS[kind]
  unknown = sorted(set(kw) - set(options(kind)))
  if unknown:
    raise ValueError(f"topology {kind!r} takes no option {unknown[0]!r}; its options: "
                     f"{', '.join(options(kind))}")
  if "seed" in inspect.signature(builder).parameters:
    kw["seed"] = seed
  adjs = builder(int(num_agents), **kw)
  adjs = adjs[None] if adjs.ndim == 2 else adjs
  mats = np.stack([_weights(adj, weights) for adj in adjs])
  topo = from_matrices(mats, kind=kind)
  topo = dataclasses.replace(topo, directed=not all(np.array_equal(a, a.T) for a in adjs))
  topo = topo.lazy(lazy) if lazy else topo
  return topo.with_self_weight(self_weight) if self_weight else topo
