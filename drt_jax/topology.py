"""Communication graphs and their combination weights, built on the host with numpy.

Convention (pinned by ``topology_test.py``): ``A[l, k] = a_lk`` is the weight agent k gives to
agent l, ``a_lk = 0`` unless l is in k's neighbourhood N_k (which contains k), and **every column
sums to one** (except with the sender-split rule ``push``, below). Combining is
``x_k <- sum_l a_lk x_l``.

A :class:`Topology` is data, not code: a padded neighbour list ``nbr_idx[T, K, D]``,
``nbr_w[T, K, D]`` holding the matrices of one period of T steps (T = 1 for a static graph). Row
``[t, k]`` lists the agents k listens to at step t; slot 0 is k itself and padding slots point at k
with weight 0. It is a pytree whose leaves are those two arrays, so the compiled train step takes
it as an argument: new weights or a time-varying schedule never recompile (only shapes are static).

Graphs (``make(kind, K)``):

=============================== ======== ========================================================
kind                            directed neighbours of agent k
=============================== ======== ========================================================
``ring``                        no       k - 1, k + 1 (mod K)
``torus``                       no       4 neighbours on a ``rows x cols`` grid with wrap-around
``grid``                        no       up to 4 neighbours on a ``rows x cols`` grid
``full``                        no       everyone
``star``                        no       hub 0 talks to everyone, leaves only to the hub
``erdos_renyi``                 no       each pair independently with probability ``p``
``exponential``                 yes      k listens to k - 2^i (mod K), i = 0 .. floor(log2(K-1))
``one_peer_exponential``        yes      at step t: only k - 2^(t mod tau), tau = ceil(log2 K)
``random_matching``             no       at step t: its partner in a seeded random matching
``directed_erdos_renyi``        yes      each ordered pair l -> k independently with probability
                                         ``p``; strongly connected
``directed_exponential_random`` yes      at step t: those l = k - 2^i with (t + s_l) mod tau = i,
                                         s_l a seeded phase per agent
=============================== ======== ========================================================

``one_peer_exponential``, ``random_matching`` and ``directed_exponential_random`` are
time-varying (Ying et al. 2021, arXiv 2110.13363, for the exponential graphs): single steps are
disconnected, so connectivity is checked over the union of one period. In
``directed_exponential_random`` (derived by this project) every agent l sends to one exponential
out-neighbour per step, l + 2^((t + s_l) mod tau), from a seeded random phase s_l: over a period
it uses each of its exponential links once, so the union is the ``exponential`` graph, while at a
single step the agents' in-degrees differ.

Weight rules: ``metropolis`` (default): a_lk = 1 / (1 + max(d_k, d_l)) for neighbours, the rest on
the diagonal; symmetric (hence doubly stochastic) on undirected graphs. On directed graphs d is the
in-degree: the columns still sum to one, and on the regular directed graphs above it coincides with
``uniform``. ``uniform``: a_lk = 1 / (1 + d_k) for every l in N_k (symmetric only on regular
graphs). ``push``: a_lk = a_ll = 1 / (1 + d_l^out) for every link l -> k: each sender splits its
mass equally over itself and its out-neighbours.

Push-sum weights. The matrix keeps its orientation, ``A[l, k] = a_lk`` is what k takes from l, but
with ``push`` every *row* l sums to one (a sender's split, :attr:`Topology.row_stochastic`), and
a receiver's incoming weights need not sum to one. Combining then keeps the network's total
``sum_k x_k`` but not consensus, so these weights are for push-sum
(:mod:`drt_jax.algorithms.push`), which mixes a weight y with the values and de-biases by it;
the column-stochastic algorithms refuse them. ``one_peer_exponential`` is the time-varying
directed exponential graph of stochastic gradient push (SGP; Assran, Loizou, Ballas & Rabbat
2019, arXiv 1811.10792): with ``push`` weights it is SGP's push-sum graph (being regular, its push
weights happen to be doubly stochastic). On ``directed_erdos_renyi`` and
``directed_exponential_random`` they are row- but not column-stochastic. ``lazy`` keeps rows and
columns summing to one; ``self_weight`` keeps columns only and is refused where they do not.

Scale: :func:`make` never builds a K x K matrix. Graphs are edge lists made with vectorised numpy,
the weights, checks and neighbour lists take O(K D) work, and connectivity is a breadth-first
search over the lists (or, for circulant graphs, whether their grid offsets generate the grid), so
a ring, torus, exponential or Erdős–Rényi graph of 100,000 agents builds in seconds
(``benchmarks/topology_scale.py``). :meth:`Topology.dense` stays the K x K reference;
:meth:`Topology.slem` is exact for circulant graphs at any K and NaN past a size for the rest.
"""

import dataclasses
import inspect
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.types import Mixing, Shifts

WEIGHT_RULES = ("metropolis", "uniform", "push")
_ATOL = 1e-6
# slem() of a graph that is not circulant: dense eigenvalues up to this K (the values of earlier
# versions), ARPACK on a static matrix up to _SLEM_SPARSE_MAX, NaN beyond (where it would cost
# more than the build; on 2 CPU cores ARPACK takes about a second at K = 20,000 on a slowly
# mixing grid, and much longer when other processes compete for the cores).
_SLEM_DENSE_MAX = 256
_SLEM_SPARSE_MAX = 20_000


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
    """The dense ``[K, K]`` matrix at ``step`` with ``A[l, k] = a_lk`` (columns sum to one; rows
    instead with ``push`` weights)."""
    return to_dense(np.asarray(self.nbr_idx)[step % self.period],
                     np.asarray(self.nbr_w)[step % self.period])

  def dense_schedule(self) -> np.ndarray:
    """All matrices of one period, ``[T, K, K]``."""
    return np.stack([self.dense(t) for t in range(self.period)])

  @property
  def symmetric(self) -> bool:
    """Whether every matrix of the period equals its transpose (then rows sum to one too)."""
    return all(_symmetric_list(self.nbr_idx[t], self.nbr_w[t]) for t in range(self.period))

  def column_sums(self) -> np.ndarray:
    """``[T, K]``: the weights each agent k gives, ``sum_l a_lk`` (one by construction for the
    receiver-normalised rules, ``metropolis`` and ``uniform``)."""
    return np.asarray(self.nbr_w, np.float64).sum(axis=-1)

  def row_sums(self) -> np.ndarray:
    """``[T, K]``: the weights agent l's copy receives in total, ``sum_k a_lk`` -- the share of
    its mass a sender passes on (one for the sender-split rule ``push``)."""
    idx, w = np.asarray(self.nbr_idx), np.asarray(self.nbr_w, np.float64)
    return np.stack([_row_sums(idx[t], w[t]) for t in range(self.period)])

  @property
  def column_stochastic(self) -> bool:
    """Every agent's weights sum to one at every step (the library's convention: consensus
    averaging ``x_k <- sum_l a_lk x_l`` with a convex combination)."""
    return bool(np.all(np.abs(self.column_sums() - 1.0) <= _ATOL))

  @property
  def row_stochastic(self) -> bool:
    """Every sender's weights sum to one at every step: the total ``sum_k x_k`` is kept (the
    convention of push-sum, where a sender splits its mass over its out-neighbours)."""
    return bool(np.all(np.abs(self.row_sums() - 1.0) <= _ATOL))

  @property
  def doubly_stochastic(self) -> bool:
    """Columns and rows sum to one at every step: the network average is kept."""
    return self.column_stochastic and self.row_stochastic

  def num_edges(self, step: int = 0) -> int:
    """Directed links (l -> k, l != k) with positive weight at ``step``."""
    _, a = _entries(*self._step(step))
    return int(np.count_nonzero(a > 0))

  def _step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    t = step % self.period
    return np.asarray(self.nbr_idx)[t], np.asarray(self.nbr_w)[t]

  def slem(self) -> float:
    """Second-largest eigenvalue modulus, the per-step rate at which disagreement contracts.

    For a time-varying schedule, the SLEM of the product over one period, to the power 1/T.

    Circulant graphs (ring, torus, exponential, one-peer exponential, full, with weights equal
    across agents; any K) take the eigenvalues from the DFT of their stencil, multiplied over the
    period. Other graphs: dense eigenvalues up to K = 256; for a static matrix, ARPACK (scipy) up
    to K = 20,000. Otherwise -- a larger graph, a time-varying one that is not circulant (ARPACK's
    largest-modulus search is unreliable on the clustered spectra of such products), ARPACK not
    converging within its budget, or scipy missing -- the result is **NaN**: not computed,
    because it would cost more than building the graph.
    """
    idx, w = np.asarray(self.nbr_idx), np.asarray(self.nbr_w, np.float64)
    if self.num_agents == 1:
      return 0.0
    if idx.shape[-1] == 1:  # diagonal matrices: their entries are the eigenvalues
      return _second_modulus(np.abs(np.prod(w[..., 0], axis=0)), self.period)
    spectrum = _circulant_spectrum(idx, w, self.shifts)
    if spectrum is not None:
      return _second_modulus(np.abs(spectrum), self.period)
    if self.num_agents <= _SLEM_DENSE_MAX:
      prod = np.eye(self.num_agents)
      for a in self.dense_schedule():
        prod = prod @ a
      return _second_modulus(np.abs(np.linalg.eigvals(prod)), self.period)
    if self.period == 1 and self.num_agents <= _SLEM_SPARSE_MAX:
      return _slem_arpack(idx[0], w[0])
    return math.nan

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
    with matched mixing (the same self-weight as another method's run). Refused where the
    columns do not sum to one (``push`` weights on an irregular graph): rescaling a receiver's
    weights would break the senders' split.
    """
    if not 0.0 < s < 1.0:
      raise ValueError(f"self_weight={s} is outside (0, 1); pick the share each agent keeps")
    if not self.column_stochastic:
      raise ValueError(f"self_weight={s} needs weights whose columns sum to one, and the "
                       f"{self.kind} topology's do not (push weights?); use lazy(alpha), which "
                       "keeps the rows' sums, instead")
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


def _padded(k_count: int, steps) -> tuple[np.ndarray, np.ndarray]:
  """Per-step links -> padded lists ``[T, K, D]`` (float64 weights), D = 1 + the most links.

  ``steps`` holds one ``(l, k, a_lk, a_kk)`` per step: links l -> k sorted by (k, l), their
  weights, and the ``[K]`` self-weights. Slot 0 is k itself, then its neighbours in ascending l.
  """
  width = 1 + max(int(np.bincount(k, minlength=k_count).max()) for _, k, _, _ in steps)
  idx = np.tile(np.arange(k_count, dtype=np.int32)[None, :, None], (len(steps), 1, width))
  w = np.zeros((len(steps), k_count, width))
  for t, (l, k, a, a_self) in enumerate(steps):
    slot = 1 + np.arange(k.size) - np.searchsorted(k, k)  # rank within k's group
    idx[t, k, slot] = l
    w[t, k, slot] = a
    w[t, :, 0] = a_self
  return idx, w


def _links(a: np.ndarray):
  """A dense matrix's off-diagonal nonzeros as ``(l, k, a_lk, diag)``, sorted by (k, l)."""
  k, l = np.nonzero(a.T)
  keep = k != l
  k, l = k[keep], l[keep]
  return l, k, a[l, k], np.diag(a).copy()


def _row_sums(idx: np.ndarray, w: np.ndarray) -> np.ndarray:
  """One step's row sums ``sum_k a_lk`` ``[K]`` from its lists, without the dense A."""
  return np.bincount(np.asarray(idx).reshape(-1), weights=np.asarray(w, np.float64).reshape(-1),
                     minlength=idx.shape[0])


def _entries(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One step's off-diagonal nonzeros ``A[l, k]`` as sorted codes ``k * K + l`` and values.

  Repeated slots add up, in list order, as in :func:`to_dense`.
  """
  k_count = idx.shape[0]
  k = np.broadcast_to(np.arange(k_count)[:, None], idx.shape)
  live = (idx != k) & (w != 0)
  code = k[live].astype(np.int64) * k_count + idx[live]
  order = np.argsort(code, kind="stable")
  code, a = code[order], w[live].astype(np.float64)[order]
  if not code.size:
    return code, a
  first = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]]))
  return (code, a) if first.size == code.size else (code[first], np.add.reduceat(a, first))


def _symmetric_list(idx: np.ndarray, w: np.ndarray) -> bool:
  """``np.allclose(A, A.T, atol=_ATOL)`` for one step's lists, without the dense A."""
  idx, w = np.asarray(idx), np.asarray(w)
  if not np.all(np.isfinite(w)):  # rare; the dense comparison has the exact inf/nan rules
    a = to_dense(idx, w)
    return bool(np.allclose(a, a.T, atol=_ATOL))
  k_count = idx.shape[0]
  code, a = _entries(idx, w)
  if not code.size:
    return True
  mirror = (code % k_count) * k_count + code // k_count  # where each value sits in A.T
  order = np.argsort(mirror)
  code_t, a_t = mirror[order], a[order]  # the entries of A.T, sorted
  at = np.minimum(np.searchsorted(code, code_t), code.size - 1)
  found = code[at] == code_t
  a_here = np.where(found, a[at], 0.0)  # A where A.T has an entry
  # allclose(A, A.T) compares A[l, k] with A[k, l] and A[k, l] with A[l, k]: rtol on the smaller
  rtol = 1e-5
  close = np.abs(a_here - a_t) <= _ATOL + rtol * np.minimum(np.abs(a_here), np.abs(a_t))
  alone = np.ones(code.size, bool)
  alone[at[found]] = False  # A's entries where A.T is zero
  return bool(np.all(close) and np.all(np.abs(a[alone]) <= _ATOL))


STOCHASTIC = ("columns", "rows")


def _check_stochastic_option(stochastic) -> None:
  if stochastic not in STOCHASTIC:
    raise ValueError(f"stochastic={stochastic!r} is not one of: {', '.join(STOCHASTIC)} (which "
                     "sums of A[l, k] = a_lk must be one)")


def check_matrix(a: np.ndarray, num_agents: int | None = None, name: str = "A", *,
                 stochastic: str = "columns") -> None:
  """Raises ValueError unless ``a`` is a square, non-negative matrix whose columns (or, with
  ``stochastic="rows"``, rows: push-sum weights) sum to one."""
  _check_stochastic_option(stochastic)
  a = np.asarray(a)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"{name} has shape {a.shape}; expected a square [K, K] matrix")
  if num_agents is not None and a.shape[0] != num_agents:
    raise ValueError(f"{name} is for K={a.shape[0]} agents but the run has K={num_agents}; "
                     "build the topology with the run's number of agents")
  _check_sums(a, a.sum(axis=0 if stochastic == "columns" else 1), name, stochastic)


def _check_sums(a: np.ndarray, sums: np.ndarray, name: str, stochastic: str = "columns") -> None:
  """The checks of :func:`check_matrix` on the weights ``a`` (a matrix or one step's lists)
  and its per-agent column (or row) sums."""
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has non-finite entries; every weight must be a finite number >= 0")
  if np.any(a < -_ATOL):
    raise ValueError(f"{name} has negative weights (min {a.min():.3g}); weights must be >= 0")
  bad = np.flatnonzero(np.abs(sums - 1.0) > _ATOL)
  if not bad.size:
    return
  if stochastic == "columns":
    raise ValueError(f"{name}: column {bad[0]} sums to {sums[bad[0]]:.6g}, not 1; columns of "
                     "A[l, k] = a_lk must sum to one (transpose a row-stochastic matrix, or pass "
                     "stochastic='rows' for push-sum weights)")
  raise ValueError(f"{name}: row {bad[0]} sums to {sums[bad[0]]:.6g}, not 1; with "
                   "stochastic='rows' every sender's weights a_lk (row l) must sum to one")


# --------------------------------------------------------------------------------------------
# Connectivity: breadth-first search over the links, O(edges).


def _reaches_all(k_count: int, src: np.ndarray, dst: np.ndarray) -> bool:
  """Whether agent 0 reaches every agent along the links ``src -> dst``, breadth first.

  One vectorised step per level: the frontier's links are gathered from a compressed (CSR)
  copy of the links sorted by source.
  """
  dst = dst[np.argsort(src)]
  start = np.zeros(k_count + 1, np.int64)
  np.cumsum(np.bincount(src, minlength=k_count), out=start[1:])
  seen = np.zeros(k_count, bool)
  seen[0] = True
  frontier = np.zeros(1, np.int64)
  while frontier.size:
    first, count = start[frontier], start[frontier + 1] - start[frontier]
    end = np.cumsum(count)
    if not end[-1]:
      break
    nxt = dst[np.repeat(first - end + count, count) + np.arange(end[-1])]
    nxt = nxt[~seen[nxt]]
    seen[nxt] = True
    nxt.sort()
    frontier = nxt[np.concatenate([[True], nxt[1:] != nxt[:-1]])] if nxt.size else nxt
  return bool(seen.all())


def _strongly_connected_links(k_count: int, l: np.ndarray, k: np.ndarray,
                              both_ways: bool = False) -> bool:
  """Every agent hears from every other along the links ``l -> k`` (k listens to l): a search
  from agent 0 along the links and one against them both reach everyone (one suffices when
  every link comes ``both_ways``)."""
  l, k = np.asarray(l, np.int64), np.asarray(k, np.int64)
  return k_count <= 1 or (_reaches_all(k_count, l, k)
                          and (both_ways or _reaches_all(k_count, k, l)))


def _strongly_connected(adj: np.ndarray) -> bool:
  """``adj[l, k]`` true when k hears from l; every agent must reach every other."""
  return _strongly_connected_links(adj.shape[0], *np.nonzero(adj),
                                   both_ways=np.array_equal(adj, adj.T))


def _lists_connected(idx: np.ndarray, w: np.ndarray, both_ways: bool = False) -> bool:
  """Strong connectivity of the union over the period of the lists' links (nonzero weights)."""
  k = np.broadcast_to(np.arange(idx.shape[1])[None, :, None], idx.shape)
  live = (w != 0) & (idx != k)
  return _strongly_connected_links(idx.shape[1], idx[live], k[live], both_ways)


def _generates(grid: tuple, offsets) -> bool:
  """Whether grid ``offsets`` generate the group of the ``grid`` (1-D or 2-D, with wrap-around).

  A circulant graph is a Cayley graph on that group, strongly connected exactly when its
  offsets generate it: in 1-D when gcd(K, offsets) = 1; in 2-D when the lattice spanned by the
  offsets and the grid's periods (rows, 0), (0, cols) is all of Z^2, i.e. the gcd of its 2 x 2
  minors is 1.
  """
  if len(grid) == 1:
    return math.gcd(grid[0], *(int(o[0]) for o in offsets)) == 1
  rows, cols = grid
  vecs = [tuple(int(v) for v in o) for o in offsets] + [(rows, 0), (0, cols)]
  return math.gcd(*(a * d - b * c for (a, b), (c, d) in itertools.combinations(vecs, 2))) == 1


def _disconnected(what: str) -> ValueError:
  return ValueError(f"{what} is disconnected (over one period): some agents can never hear from "
                    "others; use a connected graph")


def check_connected(mats: np.ndarray, what: str) -> None:
  """Raises ValueError unless the union of the graphs of ``mats`` ``[T, K, K]`` is strongly
  connected (information from every agent reaches every other within one period)."""
  adj = (np.abs(np.asarray(mats)) > 0).any(axis=0)
  if not _strongly_connected(adj):
    raise _disconnected(what)


def from_matrices(mats, *, kind: str = "custom", check_connectivity: bool = True,
                  stochastic: str = "columns") -> Topology:
  """Builds a Topology from a dense ``[K, K]`` matrix or a ``[T, K, K]`` schedule.

  Every matrix is checked: non-negative, columns summing to one (rows with
  ``stochastic="rows"``: push-sum weights, each sender's split), and the union over the schedule
  connected (unless ``check_connectivity=False``, e.g. for the ``local`` baseline).
  """
  _check_stochastic_option(stochastic)
  mats = np.asarray(mats, np.float64)
  if mats.ndim == 2:
    mats = mats[None]
  if mats.ndim != 3:
    raise ValueError(f"combination matrices have shape {mats.shape}; expected [K, K] or [T, K, K]")
  for t, a in enumerate(mats):
    check_matrix(a, name=f"{kind} matrix at step {t}" if len(mats) > 1 else f"{kind} matrix",
                 stochastic=stochastic)
  idx, w = _padded(mats.shape[-1], [_links(a) for a in mats])
  directed = not all(np.array_equal(a != 0, (a != 0).T) for a in mats)
  if check_connectivity and not _lists_connected(idx, w, both_ways=not directed):
    raise _disconnected(f"the {kind} graph")
  idx, w, shifts = circulant_order(idx, w.astype(np.float32))
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
  return _circulant(idx, w) or (idx, w, None)


def _offset_codes(idx_t: np.ndarray, live_t: np.ndarray, agents: np.ndarray, grid: tuple):
  """Grid offsets from each of ``agents`` to its listed neighbours, as row-major codes (their
  order is the lexicographic order of the offsets), sorted per agent; dead slots code K last.
  Returns ``(codes, slot order)``, both ``[len(agents), D]``."""
  here = np.unravel_index(agents, grid)
  there = np.unravel_index(idx_t[agents], grid)
  off = tuple((b - a[:, None]) % n for a, b, n in zip(here, there, grid))
  code = np.where(live_t[agents], np.ravel_multi_index(off, grid), math.prod(grid))
  order = np.argsort(code, axis=1, kind="stable")
  return np.take_along_axis(code, order, axis=1), order


def _circulant(idx: np.ndarray, w: np.ndarray):
  """:func:`circulant_order` without the limit on the number of slots; None when not circulant
  (the support only: the weights may still differ between agents)."""
  t_count, k_count, width = idx.shape
  agents = np.arange(k_count)
  sample = agents[:64]  # a mismatch among the first agents rejects a grid cheaply
  for grid in _grids(k_count):
    steps = []
    for t in range(t_count):
      live = w[t] > 0
      live[:, 0] = False
      codes, _ = _offset_codes(idx[t], live, sample, grid)
      if np.any(codes != codes[:1]):
        break
      codes, order = _offset_codes(idx[t], live, agents, grid)
      row = codes[0][codes[0] < k_count]
      if np.any(codes != codes[:1]) or np.any(row[1:] == row[:-1]):
        break
      steps.append((row, order[:, :row.size]))
    else:
      new_idx, new_w, table = idx.copy(), w.copy(), []
      zero = tuple(0 for _ in grid)
      for t, (row, order) in enumerate(steps):
        n = row.size
        new_idx[t, :, 1:] = agents[:, None]
        new_w[t, :, 1:] = 0.0  # padding slots: the agent itself, weight 0
        new_idx[t, :, 1:1 + n] = np.take_along_axis(idx[t], order, axis=1)
        new_w[t, :, 1:1 + n] = np.take_along_axis(w[t], order, axis=1)
        offsets = [tuple(int(o) for o in off) for off in zip(*np.unravel_index(row, grid))]
        table.append(tuple([zero] + offsets + [zero] * (width - 1 - n)))
      return new_idx, new_w, Shifts(tuple(grid), tuple(table))
  return None


def identity(num_agents: int) -> Topology:
  """No communication: ``A = I`` (the ``local`` baseline)."""
  return Topology(np.arange(num_agents, dtype=np.int32).reshape(1, num_agents, 1),
                  np.ones((1, num_agents, 1), np.float32), kind="identity")


# --------------------------------------------------------------------------------------------
# Spectrum.


def _second_modulus(mods: np.ndarray, period: int) -> float:
  """The second-largest of the eigenvalue moduli ``mods``, to the power 1 / period."""
  mods = np.sort(np.asarray(mods, np.float64).reshape(-1))[::-1].copy()
  mods[mods < 1e-10] = 0.0  # rounding noise of an exact average; its 1/T-th root would not be
  second = float(mods[1]) if len(mods) > 1 else 0.0
  return second ** (1.0 / period)


def _circulant_spectrum(idx: np.ndarray, w: np.ndarray, shifts: Shifts | None):
  """Eigenvalues of the period's product when every step is one circulant matrix, else None.

  A circulant matrix, ``A[l, k] = c(l - k)`` on a grid of agents, is diagonalised by the DFT of
  the grid: its eigenvalues are the DFT of its stencil ``c``. The steps of a period share those
  eigenvectors, so the product's eigenvalues are the products of the steps' DFTs.
  """
  if shifts is None or not _matches(idx, shifts):
    found = _circulant(idx, w)
    if found is None:
      return None
    idx, w, shifts = found
  if not np.all(w == w[:, :1, :]):  # the support is circulant, the weights must be too
    return None
  spectrum = np.ones(shifts.grid, complex)
  for t, row in enumerate(shifts.table):
    stencil = np.zeros(shifts.grid)
    np.add.at(stencil, tuple((np.array(row) % shifts.grid).T), w[t, 0])
    spectrum = spectrum * np.fft.fftn(stencil)
  return spectrum


def _matches(idx: np.ndarray, shifts: Shifts) -> bool:
  """Whether ``idx`` lists, in every slot, the neighbour at that slot's offset in ``shifts``."""
  grid = tuple(shifts.grid)
  if math.prod(grid) != idx.shape[1] or len(shifts.table) != idx.shape[0]:
    return False
  here = np.unravel_index(np.arange(idx.shape[1]), grid)
  for t, row in enumerate(shifts.table):
    if len(row) != idx.shape[2]:
      return False
    off = np.array(row)  # [D, axes]
    there = tuple((a[:, None] + off[:, i]) % n for i, (a, n) in enumerate(zip(here, grid)))
    if not np.array_equal(np.ravel_multi_index(there, grid), idx[t]):
      return False
  return True


def _slem_arpack(idx: np.ndarray, w: np.ndarray) -> float:
  """The SLEM of one step's matrix by ARPACK (scipy), with a bounded number of iterations; NaN
  when scipy is missing or ARPACK does not converge within them."""
  try:
    from scipy import sparse  # optional: not a declared dependency (jax installs it)
    from scipy.sparse import linalg
  except ImportError:
    return math.nan
  k_count, width = idx.shape
  a = sparse.csr_matrix((w.reshape(-1), (idx.reshape(-1), np.repeat(np.arange(k_count), width))),
                        shape=(k_count, k_count))
  kw = dict(return_eigenvectors=False, v0=np.random.default_rng(0).standard_normal(k_count),
            ncv=min(k_count - 1, 32), maxiter=100, tol=1e-10)
  try:
    if _symmetric_list(idx, w):
      # Symmetric, so rows sum to one too: 1 / sqrt(K) is the eigenvector of eigenvalue 1, and
      # removing the average leaves the other eigenvalues (and a 0) for Lanczos to search.
      op = linalg.LinearOperator((k_count, k_count), matvec=lambda x: a @ x - x.mean(),
                                 dtype=np.float64)
      return _second_modulus([1.0, *np.abs(linalg.eigsh(op, k=1, which="LM", **kw))], 1)
    return _second_modulus(np.abs(linalg.eigs(a, k=2, which="LM", **kw)), 1)
  except linalg.ArpackNoConvergence:
    return math.nan


# --------------------------------------------------------------------------------------------
# Graphs as links: per step, arrays (l, k) of the links l -> k (k listens to l, l != k).


def _links_of(num_agents: int, l, k) -> tuple[np.ndarray, np.ndarray]:
  """Links ``l -> k`` without self-loops or repeats, sorted by (k, l)."""
  l, k = np.asarray(l, np.int64).reshape(-1), np.asarray(k, np.int64).reshape(-1)
  keep = l != k
  code = np.sort(k[keep] * num_agents + l[keep])
  code = code[np.concatenate([[True], code[1:] != code[:-1]])] if code.size else code
  return code % num_agents, code // num_agents


def _undirected(num_agents: int, a, b) -> tuple[np.ndarray, np.ndarray]:
  """The links of the undirected edges ``{a_i, b_i}``, both ways."""
  a, b = np.asarray(a, np.int64).reshape(-1), np.asarray(b, np.int64).reshape(-1)
  return _links_of(num_agents, np.concatenate([a, b]), np.concatenate([b, a]))


def _ring(num_agents):
  k = np.arange(num_agents)
  return [_undirected(num_agents, k, (k + 1) % num_agents)]


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
  r, c = np.divmod(np.arange(num_agents), cols)
  right = (c + 1 < cols) | wrap
  down = (r + 1 < rows) | wrap
  a = np.concatenate([(r * cols + c)[right], (r * cols + c)[down]])
  b = np.concatenate([(r * cols + (c + 1) % cols)[right], ((r + 1) % rows * cols + c)[down]])
  return [_undirected(num_agents, a, b)]


def _torus(num_agents, rows=None, cols=None):
  return _lattice(num_agents, rows, cols, wrap=True)


def _grid(num_agents, rows=None, cols=None):
  return _lattice(num_agents, rows, cols, wrap=False)


def _full(num_agents):
  l, k = np.divmod(np.arange(num_agents * num_agents), num_agents)
  return [_links_of(num_agents, l, k)]


def _star(num_agents):
  k = np.arange(1, num_agents)
  return [_undirected(num_agents, np.zeros_like(k), k)]


# Up to this K, Erdős–Rényi graphs come from the dense uniform draw of earlier versions, bit for
# bit, so that seeded graphs (tests, recorded runs) stay the same; above it, from an O(edges)
# sampler of the same distribution.
_ER_DENSE_DRAW_MAX = 2048


def _edge_probability(kind: str, num_agents: int, p):
  if p is None:
    return min(1.0, 2.0 * math.log(max(num_agents, 2)) / num_agents)
  if not 0.0 < p <= 1.0:
    raise ValueError(f"{kind} p={p} is outside (0, 1]; pass an edge probability in (0, 1]")
  return p


def _erdos_renyi(num_agents, seed=0, p=None):
  p = _edge_probability("erdos_renyi", num_agents, p)
  rng = np.random.default_rng(seed)
  if num_agents <= _ER_DENSE_DRAW_MAX:
    a, b = np.nonzero(np.triu(rng.random((num_agents, num_agents)) < p, 1))
  else:
    a, b = _bernoulli_pairs(rng, num_agents, p)
  l, k = _undirected(num_agents, a, b)
  if not _strongly_connected_links(num_agents, l, k, both_ways=True):
    raise ValueError(f"erdos_renyi draw with K={num_agents}, p={p:.3g}, seed={seed} is "
                     "disconnected; raise p or try another seed")
  return [(l, k)]


def _bernoulli_codes(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
  """The numbers in ``[0, n)``, each chosen independently with probability p, in O(chosen): the
  gaps between chosen numbers are geometric (Batagelj & Brandes 2005)."""
  chosen, last = [], -1
  while True:
    left = n - 1 - last
    gaps = rng.geometric(p, size=int(p * left + 6 * math.sqrt(p * left) + 64))
    at = last + np.cumsum(gaps)
    chosen.append(at[at < n])
    if at[-1] >= n:
      break
    last = int(at[-1])
  return np.concatenate(chosen)


def _bernoulli_pairs(rng: np.random.Generator, num_agents: int, p: float):
  """Each pair a < b independently with probability p, in O(edges) (:func:`_bernoulli_codes`
  over the pairs numbered row by row over the upper triangle)."""
  code = _bernoulli_codes(rng, num_agents * (num_agents - 1) // 2, p)
  rows = np.arange(num_agents - 1, dtype=np.int64)
  first = rows * (2 * num_agents - rows - 1) // 2  # number of the pair (a, a + 1)
  a = np.searchsorted(first, code, side="right") - 1
  return a, code - first[a] + a + 1


def _directed_erdos_renyi(num_agents, seed=0, p=None):
  p = _edge_probability("directed_erdos_renyi", num_agents, p)
  if num_agents == 1:
    return [_links_of(1, [], [])]
  # Ordered pairs numbered sender by sender: l's (K - 1) receivers are the others in order.
  code = _bernoulli_codes(np.random.default_rng(seed), num_agents * (num_agents - 1), p)
  l, j = np.divmod(code, num_agents - 1)
  l, k = _links_of(num_agents, l, j + (j >= l))
  if not _strongly_connected_links(num_agents, l, k):
    raise ValueError(f"directed_erdos_renyi draw with K={num_agents}, p={p:.3g}, seed={seed} is "
                     "not strongly connected; raise p or try another seed")
  return [(l, k)]


def _exponential_hops(num_agents: int) -> list[int]:
  return [2 ** i for i in range(max(1, math.ceil(math.log2(num_agents))))
          if 2 ** i < num_agents] if num_agents > 1 else []


def _exponential(num_agents):
  k = np.arange(num_agents)
  hops = _exponential_hops(num_agents)
  return [_links_of(num_agents, [(k - hop) % num_agents for hop in hops],
                    [k for _ in hops])]


def _one_peer_exponential(num_agents):
  k = np.arange(num_agents)
  hops = _exponential_hops(num_agents) or [0]
  return [_links_of(num_agents, (k - hop) % num_agents, k) for hop in hops]


def _directed_exponential_random(num_agents, seed=0):
  hops = np.asarray(_exponential_hops(num_agents) or [0])
  phase = np.random.default_rng(seed).integers(0, hops.size, num_agents)
  l = np.arange(num_agents)
  return [_links_of(num_agents, l, (l + hops[(t + phase) % hops.size]) % num_agents)
          for t in range(hops.size)]


def _random_matching(num_agents, seed=0, period=16):
  if period < 1:
    raise ValueError(f"random_matching period={period} must be >= 1")
  rng = np.random.default_rng(seed)
  schedule = []
  for _ in range(period):
    perm = rng.permutation(num_agents)
    half = num_agents // 2
    schedule.append(_undirected(num_agents, perm[0::2][:half], perm[1::2][:half]))
  return schedule


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
    "directed_erdos_renyi": _directed_erdos_renyi,
    "directed_exponential_random": _directed_exponential_random,
}
KINDS = tuple(_GRAPHS)


def _weights(num_agents: int, l: np.ndarray, k: np.ndarray, rule: str):
  """Weights on the links ``l -> k`` (sorted by (k, l)): ``(l, k, a_lk, a_kk)``.

  Column-stochastic rules: the self-weight is one minus the column's sum, accumulated in
  ascending l as a dense column sum would be, so the weights are those of the dense construction
  bit for bit. ``push``: every sender's 1 / (1 + out-degree), on its links and on itself.
  """
  if rule == "push":
    split = 1.0 / (1.0 + np.bincount(l, minlength=num_agents).astype(np.float64))
    return l, k, split[l], split
  deg = np.bincount(k, minlength=num_agents).astype(np.float64)  # in-degree: how many k hears
  if rule == "metropolis":
    a = 1.0 / (1.0 + np.maximum(deg[k], deg[l]))
  else:  # uniform
    a = 1.0 / (1.0 + deg[k])
  return l, k, a, 1.0 - np.bincount(k, weights=a, minlength=num_agents)


def _symmetric_links(num_agents: int, l: np.ndarray, k: np.ndarray) -> bool:
  return np.array_equal(np.sort(l * num_agents + k), k * num_agents + l)


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
    weights: ``"metropolis"`` (default), ``"uniform"`` (columns sum to one) or ``"push"`` (rows
      sum to one: push-sum weights, see the module docstring).
    seed: seeds random graphs (``erdos_renyi``, ``random_matching``, ``directed_erdos_renyi``,
      ``directed_exponential_random``).
    **kw: graph options: ``rows``/``cols`` (torus, grid), ``p`` (erdos_renyi,
      directed_erdos_renyi), ``period`` (random_matching), ``lazy`` (a self-weight share alpha:
      ``alpha I + (1 - alpha) A``), ``self_weight`` (every agent's self-weight set to s, see
      :meth:`Topology.with_self_weight`).

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
  k_count = int(num_agents)
  schedule = builder(k_count, **kw)
  idx, w = _padded(k_count, [_weights(k_count, l, k, weights) for l, k in schedule])
  stochastic = "rows" if weights == "push" else "columns"
  for t in range(len(schedule)):
    sums = _row_sums(idx[t], w[t]) if weights == "push" else w[t].sum(axis=-1)
    _check_sums(w[t], sums, f"{kind} matrix at step {t}" if len(schedule) > 1 else
                f"{kind} matrix", stochastic)
  w = w.astype(np.float32)
  circulant = _circulant(idx, w) if k_count > 1 and idx.shape[-1] > 1 else None
  directed = not all(_symmetric_links(k_count, l, k) for l, k in schedule)
  if circulant:  # a Cayley graph of the grid: connected when its offsets generate the grid
    _, _, shifts = circulant
    connected = _generates(shifts.grid, {o for row in shifts.table for o in row})
  else:
    connected = _lists_connected(idx, w, both_ways=not directed)
  if not connected:
    raise _disconnected(f"the {kind} graph")
  shifts = None
  if circulant and idx.shape[-1] - 1 <= MAX_ROLLS:
    idx, w, shifts = circulant
  topo = Topology(idx, w, kind=kind, directed=directed, shifts=shifts)
  topo = topo.lazy(lazy) if lazy else topo
  return topo.with_self_weight(self_weight) if self_weight else topo
