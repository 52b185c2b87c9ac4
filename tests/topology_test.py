"""Tests for drt_jax.topology: stochasticity, orientation, connectivity, spectra and errors."""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from drt_jax import combine, topology

_SIZES = (1, 2, 5, 8, 16)
_UNDIRECTED = ("ring", "torus", "grid", "full", "star", "erdos_renyi", "random_matching")
_DIRECTED = ("exponential", "one_peer_exponential", "directed_erdos_renyi",
             "directed_exponential_random")
_TIME_VARYING = ("one_peer_exponential", "random_matching")


def _make(kind, k_count, **kw):
  """``topology.make`` with the first seed whose random draw is strongly connected: a
  directed_erdos_renyi draw at its default p can be disconnected (K = 8 with seed 0), and the
  tests over every kind want a graph (the refusal of a disconnected draw is tested on its own)."""
  for seed in range(4):
    try:
      return topology.make(kind, k_count, seed=seed, **kw)
    except ValueError as e:
      if "not strongly connected" not in str(e) or seed == 3:
        raise
  raise AssertionError("unreachable")


def _kind_size_cases():
  return [(f"{kind}_{k}", kind, k) for kind in topology.KINDS for k in _SIZES]


def _connected(adj: np.ndarray) -> bool:
  """Strong connectivity of ``adj[l, k]`` (k hears from l) by breadth-first search."""
  n = adj.shape[0]
  for start in range(n):
    seen, frontier = {start}, [start]
    while frontier:
      nxt = [k for l in frontier for k in np.flatnonzero(adj[l]) if k not in seen]
      seen.update(nxt)
      frontier = nxt
    if len(seen) < n:
      return False
  return True


def _lattice_support(kind: str, l: np.ndarray, k: np.ndarray, k_count: int) -> np.ndarray:
  rows = max(r for r in range(1, math.isqrt(k_count) + 1) if k_count % r == 0)
  cols = k_count // rows
  rl, cl, rk, ck = l // cols, l % cols, k // cols, k % cols
  if kind == "torus":
    dr = np.minimum((rl - rk) % rows, (rk - rl) % rows)
    dc = np.minimum((cl - ck) % cols, (ck - cl) % cols)
  else:
    dr, dc = np.abs(rl - rk), np.abs(cl - ck)
  return dr + dc == 1


def _expected_support(kind: str, k_count: int, t: int):
  """Off-diagonal support ``[K, K]`` (``[l, k]``: k listens to l) of deterministic graphs."""
  l, k = np.meshgrid(np.arange(k_count), np.arange(k_count), indexing="ij")
  hop = (k - l) % k_count  # k listens to l = k - hop
  hops = [2 ** i for i in range(8) if 2 ** i < k_count]
  support = {
      "ring": lambda: (hop == 1) | (hop == k_count - 1),
      "full": lambda: np.ones_like(hop, bool),
      "star": lambda: (l == 0) | (k == 0),
      "exponential": lambda: np.isin(hop, hops),
      "one_peer_exponential": lambda: hop == (hops[t] if hops else -1),
      "torus": lambda: _lattice_support("torus", l, k, k_count),
      "grid": lambda: _lattice_support("grid", l, k, k_count),
  }.get(kind)
  return None if support is None else support() & (l != k)  # None: random graphs


class MatricesTest(parameterized.TestCase):

  @parameterized.named_parameters(*_kind_size_cases())
  def test_column_stochastic_on_graph_with_padded_lists(self, kind, k_count):
    for weights in topology.WEIGHT_RULES:
      topo = _make(kind, k_count, weights=weights)
      self.assertEqual(topo.num_agents, k_count)
      self.assertEqual(topo.nbr_idx.dtype, np.int32)
      self.assertEqual(topo.nbr_w.dtype, np.float32)
      for t in range(topo.period):
        a = topo.dense(t)
        self.assertTrue(np.all(a >= 0.0), f"{kind} K={k_count} {weights}: negative weight")
        # push weights: every sender's row sums to one instead of every receiver's column
        np.testing.assert_allclose(a.sum(axis=1 if weights == "push" else 0), 1.0, atol=1e-6)
        support = _expected_support(kind, k_count, t)
        off = (a > 0) & ~np.eye(k_count, dtype=bool)
        if support is not None:
          np.testing.assert_array_equal(off, support, err_msg=f"{kind} K={k_count} step {t}")
        elif kind == "random_matching":
          self.assertTrue(np.all(off.sum(axis=0) <= 1), "a matching has at most one partner")
        np.testing.assert_array_equal(off, off.T if kind in _UNDIRECTED else off)

        idx, w = topo.nbr_idx[t], topo.nbr_w[t]
        np.testing.assert_array_equal(idx[:, 0], np.arange(k_count))  # slot 0 is self
        self_slot = idx[:, 1:] == np.arange(k_count)[:, None]
        np.testing.assert_array_equal(w[:, 1:][self_slot], 0.0)  # padding: self, weight 0
        np.testing.assert_array_equal(self_slot, w[:, 1:] == 0.0)  # listed neighbours weigh > 0
        np.testing.assert_allclose(np.diag(a), w[:, 0], atol=0)
        for row in idx:
          listed = row[row != row[0]]
          self.assertLen(set(listed.tolist()), len(listed))

  @parameterized.named_parameters(*_kind_size_cases())
  def test_symmetry_and_directed_flag(self, kind, k_count):
    topo = _make(kind, k_count)  # metropolis
    expect_directed = kind in _DIRECTED and k_count > 2
    self.assertEqual(topo.directed, expect_directed)
    if kind in _UNDIRECTED:
      self.assertTrue(topo.symmetric)
      for a in topo.dense_schedule():
        np.testing.assert_allclose(a, a.T, atol=1e-7)
    if expect_directed:
      self.assertFalse(topo.symmetric)

  def test_uniform_weights_are_not_symmetric_on_irregular_graphs(self):
    topo = topology.make("star", 5, weights="uniform")
    a = topo.dense()
    np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(a[:, 0], 0.2, atol=1e-7)  # the hub listens to 4 leaves + itself
    np.testing.assert_allclose(a[0, 1:], 0.5, atol=1e-7)  # each leaf: itself and the hub
    self.assertFalse(topo.symmetric)

  def test_metropolis_values_on_star(self):
    a = topology.make("star", 5).dense()
    np.testing.assert_allclose(a[0, 1:], 0.2, atol=1e-7)  # 1 / (1 + max(4, 1))
    np.testing.assert_allclose(np.diag(a), [0.2, 0.8, 0.8, 0.8, 0.8], atol=1e-7)

  def test_identity(self):
    topo = topology.identity(4)
    np.testing.assert_array_equal(topo.dense(), np.eye(4))
    self.assertEqual(topo.max_degree, 0)
    self.assertEqual(topo.num_edges(), 0)


class OrientationTest(absltest.TestCase):
  """A[l, k] = a_lk is the weight agent k gives to agent l; columns sum to one."""

  # Column-stochastic, not row-stochastic, and A[l, k] != A[k, l] everywhere off the diagonal.
  A = np.array([[0.5, 0.0, 0.3],
                [0.5, 0.6, 0.0],
                [0.0, 0.4, 0.7]])

  def test_combine_follows_columns(self):
    topo = topology.from_matrices(self.A)
    self.assertTrue(topo.directed)
    np.testing.assert_allclose(topo.dense(), self.A, atol=1e-7)
    x = jnp.array([1.0, 10.0, 100.0])
    # x_k <- sum_l A[l, k] x_l: agent 0 hears 0 and 1, agent 1 hears 1 and 2, agent 2 hears 0, 2.
    expected = np.array([0.5 * 1 + 0.5 * 10, 0.6 * 10 + 0.4 * 100, 0.3 * 1 + 0.7 * 100])
    np.testing.assert_allclose(combine.combine(x, topo), expected, rtol=1e-6)
    np.testing.assert_allclose(combine.combine_dense(x, self.A), expected, rtol=1e-6)
    # The neighbour list of agent 1 names agent 2 (A[2, 1] = 0.4), not agent 0.
    row = dict(zip(topo.nbr_idx[0, 1].tolist(), topo.nbr_w[0, 1].tolist(), strict=True))
    self.assertEqual(set(row), {1, 2})
    self.assertAlmostEqual(row[2], 0.4, places=6)
    self.assertEqual(topo.num_edges(), 3)

  def test_row_stochastic_matrix_is_refused(self):
    np.testing.assert_allclose(self.A.T.sum(axis=1), 1.0)  # rows of A.T sum to one...
    with self.assertRaisesRegex(ValueError, "column"):  # ...but its columns do not
      topology.from_matrices(self.A.T)


class TimeVaryingTest(parameterized.TestCase):

  @parameterized.product(kind=_TIME_VARYING, k_count=(5, 8, 16))
  def test_single_steps_disconnected_union_connected(self, kind, k_count):
    topo = topology.make(kind, k_count)
    self.assertGreater(topo.period, 1)
    self.assertTrue(topo.time_varying)
    self.assertFalse(topology.make("ring", k_count).time_varying)
    mats = topo.dense_schedule()
    self.assertEqual(mats.shape, (topo.period, k_count, k_count))
    connected = [_connected(a > 0) for a in mats]
    if kind == "random_matching":
      self.assertNotIn(True, connected)  # a matching never connects K >= 3 agents
    else:
      # one peer at hop 2^t: the hop-1 step is a directed cycle; hop 2 splits an even K
      self.assertTrue(connected[0])
      if k_count % 2 == 0:
        self.assertFalse(connected[1])
    self.assertTrue(_connected((mats > 0).any(axis=0)))

  def test_one_peer_exponential_period_product_is_exact_averaging(self):
    topo = topology.make("one_peer_exponential", 16)
    self.assertEqual(topo.period, 4)
    prod = np.linalg.multi_dot(list(topo.dense_schedule()))
    np.testing.assert_allclose(prod, np.full((16, 16), 1 / 16), atol=1e-6)
    self.assertLess(topo.slem(), 1e-3)

  @parameterized.named_parameters(
      ("one_peer_exponential_16", "one_peer_exponential", 16),
      ("one_peer_exponential_8", "one_peer_exponential", 8),
      ("random_matching_2", "random_matching", 2),
  )
  def test_slem_is_zero_when_period_product_is_exact_averaging(self, kind, k_count):
    topo = topology.make(kind, k_count)
    prod = np.linalg.multi_dot([np.eye(k_count)] + list(topo.dense_schedule()))
    np.testing.assert_allclose(prod, 1.0 / k_count, atol=1e-12)  # exact averaging...
    # ...so every eigenvalue but one is 0. Known bug: slem() takes the T-th root of the
    # round-off (~1e-16) left in the eigenvalue, e.g. random_matching K=2 (T=16) reports ~0.10.
    self.assertLess(topo.slem(), 1e-3, f"slem() of an exactly-averaging {kind} schedule")

  def test_mixing_picks_step_modulo_period(self):
    topo = topology.make("one_peer_exponential", 8)
    for step in range(7):
      mix = topo.mixing(step)
      np.testing.assert_array_equal(mix.nbr_idx, topo.nbr_idx[step % 3])
      np.testing.assert_array_equal(mix.nbr_w, topo.nbr_w[step % 3])
      np.testing.assert_allclose(topology.to_dense(np.asarray(mix.nbr_idx),
                                                   np.asarray(mix.nbr_w)),
                                 topo.dense(step), atol=0)


class SpectrumTest(parameterized.TestCase):

  @parameterized.parameters(3, 5, 8, 16)
  def test_ring_slem_is_analytic(self, k_count):
    # Metropolis ring: 1/3 on self and both neighbours; eigenvalues 1/3 + 2/3 cos(2 pi j / K).
    topo = topology.make("ring", k_count)
    expected = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / k_count)
    self.assertAlmostEqual(topo.slem(), expected, delta=1e-6)
    self.assertAlmostEqual(topo.spectral_gap(), 1 - expected, delta=1e-6)

  def test_slem_orders_graphs(self):
    self.assertLess(topology.make("full", 8).slem(), 1e-6)
    self.assertLess(topology.make("torus", 16).slem(), topology.make("ring", 16).slem())


class RandomGraphTest(absltest.TestCase):

  def test_erdos_renyi_is_seeded(self):
    a0 = topology.make("erdos_renyi", 16, seed=0).dense()
    np.testing.assert_array_equal(a0, topology.make("erdos_renyi", 16, seed=0).dense())
    self.assertFalse(np.array_equal(a0, topology.make("erdos_renyi", 16, seed=1).dense()))

  def test_erdos_renyi_disconnected_draw_raises(self):
    with self.assertRaisesRegex(ValueError, "disconnected"):
      topology.make("erdos_renyi", 8, p=0.01)

  def test_random_matching_is_seeded(self):
    a0 = topology.make("random_matching", 8, seed=3).dense_schedule()
    np.testing.assert_array_equal(a0, topology.make("random_matching", 8, seed=3).dense_schedule())
    self.assertFalse(np.array_equal(
        a0, topology.make("random_matching", 8, seed=4).dense_schedule()))
    self.assertEqual(topology.make("random_matching", 8, period=5).period, 5)


class ErrorsTest(parameterized.TestCase):

  def _assert_one_line_error(self, fn, *fragments):
    with self.assertRaises(ValueError) as ctx:
      fn()
    message = str(ctx.exception)
    self.assertNotIn("\n", message)
    for fragment in fragments:
      self.assertIn(fragment, message)

  def test_unknown_kind_lists_kinds(self):
    self._assert_one_line_error(lambda: topology.make("hypercube", 8), "hypercube",
                                *topology.KINDS)

  def test_unknown_weights(self):
    self._assert_one_line_error(lambda: topology.make("ring", 8, weights="max"), "max",
                                "metropolis", "uniform")

  @parameterized.parameters(0, -3)
  def test_bad_num_agents(self, k_count):
    self._assert_one_line_error(lambda: topology.make("ring", k_count), "num_agents")

  def test_unknown_option(self):
    self._assert_one_line_error(lambda: topology.make("ring", 8, rows=2), "rows")

  @parameterized.parameters({"rows": 3}, {"rows": 2, "cols": 3}, {"cols": 5})
  def test_torus_shape_must_hold_k(self, **kw):
    self._assert_one_line_error(lambda: topology.make("torus", 8, **kw), "K=8")

  def test_torus_explicit_shape(self):
    topo = topology.make("torus", 8, rows=4, cols=2)
    self.assertEqual(topo.max_degree, 3)  # 2 columns: left and right neighbour coincide
    np.testing.assert_allclose(topo.dense().sum(axis=0), 1.0, atol=1e-6)

  def test_negative_weights(self):
    a = np.array([[1.5, -0.5], [-0.5, 1.5]])
    self._assert_one_line_error(lambda: topology.from_matrices(a), "negative")

  def test_non_stochastic(self):
    a = np.array([[0.5, 0.5], [0.6, 0.5]])
    self._assert_one_line_error(lambda: topology.from_matrices(a), "column 0", "sum")

  def test_disconnected_matrix(self):
    half = np.full((2, 2), 0.5)
    a = np.block([[half, np.zeros((2, 2))], [np.zeros((2, 2)), half]])
    self._assert_one_line_error(lambda: topology.from_matrices(a), "disconnected")
    topo = topology.from_matrices(a, check_connectivity=False)  # allowed when asked
    self.assertEqual(topo.num_edges(), 4)

  def test_non_square_matrix(self):
    self._assert_one_line_error(lambda: topology.from_matrices(np.ones((2, 3)) / 2), "square")

  def test_check_matrix_wrong_size(self):
    topology.check_matrix(np.eye(4), num_agents=4)  # fine
    self._assert_one_line_error(lambda: topology.check_matrix(np.eye(3), num_agents=4),
                                "K=3", "K=4")

  def test_check_matrix_non_finite(self):
    a = np.eye(2)
    a[0, 1] = np.nan
    self._assert_one_line_error(lambda: topology.check_matrix(a), "finite")


class LazyTest(parameterized.TestCase):

  @parameterized.product(kind=("ring", "star", "exponential", "random_matching"),
                         alpha=(0.0, 0.25, 0.9))
  def test_lazy_mixes_in_identity(self, kind, alpha):
    topo = topology.make(kind, 8)
    lazy = topo.lazy(alpha)
    self.assertEqual(lazy.nbr_w.dtype, np.float32)
    np.testing.assert_array_equal(lazy.nbr_idx, topo.nbr_idx)
    for t in range(topo.period):
      a, b = topo.dense(t), lazy.dense(t)
      np.testing.assert_allclose(b, alpha * np.eye(8) + (1 - alpha) * a, atol=1e-6)
      np.testing.assert_allclose(b.sum(axis=0), 1.0, atol=1e-6)
    self.assertEqual(lazy.symmetric, topo.symmetric)
    if kind == "ring":  # its SLEM is the positive eigenvalue 1/3 + 2/3 cos(2 pi / K)
      self.assertAlmostEqual(lazy.slem(), alpha + (1 - alpha) * topo.slem(), delta=1e-6)
    via_make = topology.make(kind, 8, lazy=alpha)
    np.testing.assert_allclose(via_make.dense_schedule(), lazy.dense_schedule(), atol=1e-7)

  @parameterized.parameters(-0.1, 1.0, 1.5)
  def test_lazy_alpha_out_of_range(self, alpha):
    with self.assertRaisesRegex(ValueError, "alpha"):
      topology.make("ring", 8).lazy(alpha)

  @parameterized.product(kind=("ring", "torus", "random_matching"), s=(0.1, 0.5, 0.8))
  def test_self_weight_sets_the_diagonal_and_keeps_columns_stochastic(self, kind, s):
    topo = topology.make(kind, 16)
    matched = topology.make(kind, 16, self_weight=s)
    for t in range(topo.period):
      a, b = topo.dense(t), matched.dense(t)
      self.assertTrue(np.all(b >= 0))
      np.testing.assert_allclose(b.sum(axis=0), 1.0, atol=1e-6)
      has_nbrs = np.diag(a) < 1.0
      np.testing.assert_allclose(np.diag(b)[has_nbrs], s, atol=1e-6)
      np.testing.assert_allclose(np.diag(b)[~has_nbrs], 1.0, atol=1e-6)
      off = lambda m: m - np.diag(np.diag(m))  # noqa: E731
      np.testing.assert_array_equal(off(b) > 0, off(a) > 0)  # the same graph
    self.assertTrue(matched.symmetric)  # regular graphs with symmetric weights stay symmetric

  def test_self_weight_out_of_range(self):
    with self.assertRaisesRegex(ValueError, r"self_weight=1.0 is outside \(0, 1\)"):
      topology.make("ring", 8, self_weight=1.0)

  def test_new_weights_do_not_recompile(self):
    # The Topology is a pytree argument of compiled steps: new weights of the same shape (a lazy
    # variant, or new weights on the same graph) must reuse the compiled program.
    x = jnp.arange(16.0).reshape(8, 2)
    fn = jax.jit(lambda topo: combine.combine(x, topo))
    ring = topology.make("ring", 8)
    lazy = ring.lazy(0.5)
    fn(ring)
    reweighted = dataclasses.replace(ring, nbr_w=lazy.nbr_w)  # the lazy weights, kind 'ring'
    np.testing.assert_allclose(fn(reweighted), combine.combine_dense(x, lazy.dense()), atol=1e-5)
    self.assertEqual(fn._cache_size(), 1)
    np.testing.assert_allclose(fn(lazy), combine.combine_dense(x, lazy.dense()), atol=1e-5)
    # lazy() renames the kind to 'ring_lazy': the name must not be static pytree data
    self.assertEqual(fn._cache_size(), 1, "ring.lazy(0.5) recompiled a step jitted for ring")
    fn(topology.make("one_peer_exponential", 8).lazy(0.2))  # another shape: one more compile
    self.assertEqual(fn._cache_size(), 2)


def _dense_slem(topo) -> float:
  """The reference SLEM: eigenvalues of the dense product over one period."""
  prod = np.eye(topo.num_agents)
  for a in topo.dense_schedule():
    prod = prod @ a
  mods = np.sort(np.abs(np.linalg.eigvals(prod)))[::-1]
  mods[mods < 1e-10] = 0.0
  return (float(mods[1]) if len(mods) > 1 else 0.0) ** (1.0 / topo.period)


def _assert_slem_close(test, got, want, period, msg=""):
  # The 1/T-th root magnifies rounding in a product's tiny eigenvalues: compare the product's.
  test.assertTrue(abs(got - want) < 1e-9 or abs(got ** period - want ** period) < 1e-12,
                  f"{msg}: slem {got!r} != dense {want!r}")


def _dense_weights(adj: np.ndarray, rule: str) -> np.ndarray:
  """Metropolis / uniform / push weights on the dense support ``adj[l, k]``, the reference
  formula."""
  if rule == "push":  # each row l: 1 / (1 + out-degree) on l itself and on its out-links
    split = 1.0 / (1.0 + adj.sum(axis=1).astype(np.float64))
    return np.where(adj | np.eye(len(adj), dtype=bool), split[:, None], 0.0)
  deg = adj.sum(axis=0).astype(np.float64)
  if rule == "metropolis":
    a = np.where(adj, 1.0 / (1.0 + np.maximum(deg[None, :], deg[:, None])), 0.0)
  else:
    a = np.where(adj, 1.0 / (1.0 + deg[None, :]), 0.0)
  a[np.diag_indices_from(a)] = 1.0 - a.sum(axis=0)
  return a


def _custom_matrices():
  """(name, [T, K, K]) matrices for from_matrices: directed, disconnected, weighted, schedules."""
  rng = np.random.default_rng(7)
  directed = rng.random((9, 9)) * (rng.random((9, 9)) < 0.3)
  directed[np.arange(9), (np.arange(9) + 1) % 9] = 0.5  # a directed cycle keeps it connected
  directed /= directed.sum(axis=0)
  half = np.full((3, 3), 1 / 3)
  blocks = np.block([[half, np.zeros((3, 3))], [np.zeros((3, 3)), half]])
  ring = topology.make("ring", 8).dense()
  weighted = (ring - np.diag(np.diag(ring))) * np.linspace(0.3, 1.0, 8)  # circulant support only
  weighted[np.diag_indices(8)] = 1.0 - weighted.sum(axis=0)
  return [("directed", directed[None]), ("orientation", OrientationTest.A[None]),
          ("disconnected", blocks[None]), ("weighted_ring", weighted[None]),
          ("schedule", np.stack([ring, np.eye(8)])),
          ("disconnected_schedule", np.stack([blocks, np.eye(6)]))]


class SparseEqualsDenseTest(parameterized.TestCase):
  """What make() and the Topology compute from the lists equals the dense reference."""

  def _assert_list_checks_match_dense(self, topo, msg):
    mats = topo.dense_schedule()
    self.assertEqual(topo.symmetric, all(np.allclose(a, a.T, atol=1e-6) for a in mats), msg)
    for t, a in enumerate(mats):
      self.assertEqual(topo.num_edges(t), int(np.count_nonzero(a - np.diag(np.diag(a)) > 0)), msg)
    union = (mats != 0).any(axis=0)
    self.assertEqual(topology._lists_connected(topo.nbr_idx, topo.nbr_w), _connected(union), msg)
    self.assertEqual(topology._strongly_connected(union), _connected(union), msg)
    _assert_slem_close(self, topo.slem(), _dense_slem(topo), topo.period, msg)

  @parameterized.product(kind=topology.KINDS, k_count=(1, 2, 3, 5, 8, 12, 16, 30),
                         weights=topology.WEIGHT_RULES)
  def test_make(self, kind, k_count, weights):
    topo = _make(kind, k_count, weights=weights)
    msg = f"{kind} K={k_count} {weights}"
    self._assert_list_checks_match_dense(topo, msg)
    for a in topo.dense_schedule():  # the weights of the dense construction
      off = (a != 0) & ~np.eye(k_count, dtype=bool)
      np.testing.assert_array_equal(
          a, _dense_weights(off, weights).astype(np.float32).astype(np.float64), err_msg=msg)
    self.assertEqual(topo.directed, any(not np.array_equal(a != 0, (a != 0).T)
                                        for a in topo.dense_schedule()), msg)
    # Through the dense matrices: the same lists, order, structure and flags.
    stochastic = "rows" if weights == "push" else "columns"
    again = topology.from_matrices(topo.dense_schedule(), kind=kind, stochastic=stochastic)
    np.testing.assert_array_equal(again.nbr_idx, topo.nbr_idx, err_msg=msg)
    np.testing.assert_array_equal(again.nbr_w, topo.nbr_w, err_msg=msg)
    self.assertEqual(again.shifts, topo.shifts, msg)
    self.assertEqual(again.directed, topo.directed, msg)
    variants = [topo.lazy(0.3)]
    if topo.column_stochastic:  # push weights on an irregular graph refuse it (PushWeightsTest)
      variants.append(topo.with_self_weight(0.6))
    for variant in variants:
      self._assert_list_checks_match_dense(variant, f"{msg} {variant.kind}")

  @parameterized.named_parameters(*_custom_matrices())
  def test_from_matrices(self, mats):
    topo = topology.from_matrices(mats, check_connectivity=False)
    self._assert_list_checks_match_dense(topo, "custom")
    np.testing.assert_allclose(topo.dense_schedule(), mats, atol=1e-7)
    connected = _connected((mats != 0).any(axis=0))
    if connected:
      topology.from_matrices(mats)
    else:
      with self.assertRaisesRegex(ValueError, "disconnected"):
        topology.from_matrices(mats)
      with self.assertRaisesRegex(ValueError, "disconnected"):
        topology.check_connected(mats, "custom")

  def test_hand_built_lists_with_repeated_slots(self):
    # A Topology built by hand may list a neighbour twice: its weights add up, as in dense().
    idx = np.array([[[0, 1, 1], [1, 0, 2], [2, 1, 2]]], np.int32)
    w = np.array([[[0.4, 0.3, 0.3], [0.5, 0.4, 0.1], [0.9, 0.1, 0.0]]], np.float32)
    topo = topology.Topology(idx, w)
    self._assert_list_checks_match_dense(topo, "repeated slots")
    self.assertEqual(topo.num_edges(), 4)  # 1 -> 0 once, though listed twice

  @parameterized.parameters(*[(grid,) for grid in ((12,), (7,), (4, 6), (6, 6), (3, 5), (8, 2))])
  def test_circulant_connectivity_is_generation_of_the_grid(self, grid):
    # A circulant graph is connected exactly when its offsets generate the grid (gcd / minors).
    rng = np.random.default_rng(len(grid) * 100 + math.prod(grid))
    k_count = math.prod(grid)
    pos = np.stack(np.unravel_index(np.arange(k_count), grid), axis=-1)
    for _ in range(40):
      offsets = [tuple(int(v) for v in rng.integers(0, grid)) for _ in range(rng.integers(1, 4))]
      adj = np.zeros((k_count, k_count), bool)
      for off in offsets:
        l = np.ravel_multi_index(tuple(((pos + off) % grid).T), grid)
        adj[l, np.arange(k_count)] = True
      reach = adj | np.eye(k_count, dtype=bool)  # transitive closure by repeated squaring
      for _ in range(math.ceil(math.log2(k_count)) + 1):
        reach = reach | (reach.astype(np.int64) @ reach.astype(np.int64) > 0)
      self.assertEqual(topology._generates(grid, offsets), bool(reach.all()), f"{grid} {offsets}")


class ScaleSpectrumTest(parameterized.TestCase):

  @parameterized.product(kind=("ring", "torus", "exponential", "one_peer_exponential", "full"),
                         k_count=(3, 6, 8, 12, 16, 20, 32), weights=topology.WEIGHT_RULES)
  def test_circulant_slem_equals_dense(self, kind, k_count, weights):
    topo = topology.make(kind, k_count, weights=weights)
    for variant in (topo, topo.lazy(0.4), topo.with_self_weight(0.7),
                    dataclasses.replace(topo, shifts=None)):  # found again without shifts
      self.assertIsNotNone(topology._circulant_spectrum(
          np.asarray(variant.nbr_idx), np.asarray(variant.nbr_w, np.float64), variant.shifts))
      _assert_slem_close(self, variant.slem(), _dense_slem(variant), topo.period,
                         f"{kind} K={k_count} {variant.kind}")

  def test_circulant_support_with_unequal_weights_is_not_circulant(self):
    (_, mats), = [c for c in _custom_matrices() if c[0] == "weighted_ring"]
    topo = topology.from_matrices(mats)
    self.assertIsNotNone(topo.shifts)  # the support is circulant...
    self.assertIsNone(topology._circulant_spectrum(topo.nbr_idx, topo.nbr_w, topo.shifts))
    _assert_slem_close(self, topo.slem(), _dense_slem(topo), 1)  # ...so the dense path runs

  @parameterized.product(kind=("star", "grid", "erdos_renyi", "ring"),
                         weights=topology.WEIGHT_RULES)
  def test_arpack_slem_equals_dense(self, kind, weights):
    topo = topology.make(kind, 40, weights=weights)
    got = topology._slem_arpack(topo.nbr_idx[0], topo.nbr_w[0].astype(np.float64))
    self.assertAlmostEqual(got, _dense_slem(topo), delta=1e-8)

  def test_arpack_slem_of_a_directed_matrix(self):
    rng = np.random.default_rng(3)
    a = rng.random((40, 40)) * (rng.random((40, 40)) < 0.2)
    a[np.arange(40), (np.arange(40) + 1) % 40] = 1.0
    topo = topology.from_matrices(a / a.sum(axis=0))
    self.assertTrue(topo.directed)
    got = topology._slem_arpack(topo.nbr_idx[0], topo.nbr_w[0].astype(np.float64))
    self.assertAlmostEqual(got, _dense_slem(topo), delta=1e-8)

  def test_slem_past_the_thresholds_is_nan(self):
    # A time-varying schedule that is not circulant is not computed past the dense size.
    k_count = topology._SLEM_DENSE_MAX + 2
    slem = topology.make("random_matching", k_count).slem()
    self.assertTrue(math.isnan(slem))
    self.assertEqual(f"{slem:.4f}", "nan")  # train.py logs it with %.4f
    # A static one goes to ARPACK, which agrees with the dense eigenvalues.
    star = topology.make("star", k_count)
    self.assertAlmostEqual(star.slem(), _dense_slem(star), delta=1e-8)
    ring = topology.make("ring", 100_000)  # circulant: exact at any size
    (a_kk, a_lk, _), = ring.nbr_w[0, :1].astype(np.float64)  # float32 weights, as computed
    self.assertAlmostEqual(ring.slem(), a_kk + 2 * a_lk * math.cos(2 * math.pi / 100_000),
                           delta=1e-12)


class ScaleTest(parameterized.TestCase):
  """Graphs of many agents build without K x K matrices (a ring of 4,000 once did not)."""

  _K = 20_000

  @parameterized.parameters("ring", "torus", "exponential", "erdos_renyi",
                            "one_peer_exponential")
  def test_builds_fast(self, kind):
    start = time.perf_counter()
    topo = topology.make(kind, self._K)
    symmetric, edges = topo.symmetric, topo.num_edges()
    seconds = time.perf_counter() - start
    self.assertLess(seconds, 20.0, f"{kind} K={self._K} took {seconds:.1f} s")
    self.assertEqual(topo.num_agents, self._K)
    np.testing.assert_allclose(topo.nbr_w.sum(axis=-1), 1.0, atol=1e-6)
    self.assertEqual(symmetric, kind in ("ring", "torus", "erdos_renyi"))
    self.assertGreaterEqual(edges, self._K)
    self.assertEqual(topo.shifts is None, kind == "erdos_renyi")  # exponential: 15 hops, rolls
    if topo.shifts is not None:  # circulant: an exact SLEM at any size, in milliseconds
      self.assertTrue(0.0 < topo.slem() < 1.0)

  def test_combine_on_a_large_ring_equals_numpy(self):
    topo = topology.make("ring", self._K)
    x = np.random.default_rng(0).standard_normal((self._K, 4)).astype(np.float32)
    out = np.asarray(jax.jit(combine.combine)(jnp.asarray(x), topo))
    idx, w = topo.nbr_idx[0], topo.nbr_w[0].astype(np.float64)
    for k in (0, 1, self._K // 2, self._K - 1):
      want = sum(w[k, j] * x[idx[k, j]].astype(np.float64) for j in range(idx.shape[1]))
      np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=f"row {k}")
      np.testing.assert_allclose(want, (x[k - 1] + x[k] + x[(k + 1) % self._K]) / 3, rtol=1e-5)

  def test_erdos_renyi_sampler_draws_each_pair_once_with_probability_p(self):
    k_count, p = 400, 0.05
    a, b = topology._bernoulli_pairs(np.random.default_rng(1), k_count, p)
    self.assertTrue(np.all((0 <= a) & (a < b) & (b < k_count)))
    self.assertLen(np.unique(a * k_count + b), a.size)
    pairs = k_count * (k_count - 1) / 2
    self.assertLess(abs(a.size - p * pairs), 5 * math.sqrt(p * pairs))
    again = topology._bernoulli_pairs(np.random.default_rng(1), k_count, p)
    np.testing.assert_array_equal(again[0], a)
    all_pairs = topology._bernoulli_pairs(np.random.default_rng(1), 9, 1.0)
    self.assertLen(all_pairs[0], 36)

  def test_erdos_renyi_graphs_of_small_k_keep_their_edges(self):
    # Up to _ER_DENSE_DRAW_MAX the draw is the dense uniform matrix of earlier versions.
    for k_count, seed, p in ((16, 0, None), (8, 10, 0.3), (10, 1, 0.5), (300, 2, None)):
      topo = topology.make("erdos_renyi", k_count, seed=seed, **({"p": p} if p else {}))
      p = p or 2 * math.log(k_count) / k_count
      upper = np.triu(np.random.default_rng(seed).random((k_count, k_count)) < p, 1)
      a = topo.dense()
      np.testing.assert_array_equal((a > 0) & ~np.eye(k_count, dtype=bool), upper | upper.T)

  def test_erdos_renyi_of_large_k_has_the_expected_degree(self):
    k_count = topology._ER_DENSE_DRAW_MAX + 1000
    topo = topology.make("erdos_renyi", k_count, seed=3)
    mean_degree = topo.num_edges() / k_count
    expected = 2 * math.log(k_count) / k_count * (k_count - 1)
    self.assertLess(abs(mean_degree - expected), 0.05 * expected)
    self.assertTrue(topo.symmetric)
    self.assertFalse(topo.directed)


class PushWeightsTest(parameterized.TestCase):
  """weights='push': every sender splits its mass equally over itself and its out-neighbours."""

  def _assert_one_line_error(self, fn, *fragments):
    with self.assertRaises(ValueError) as ctx:
      fn()
    message = str(ctx.exception)
    self.assertNotIn("\n", message)
    for fragment in fragments:
      self.assertIn(fragment, message)

  def test_rows_sum_to_one_columns_need_not(self):
    topo = topology.make("star", 5, weights="push")
    a = topo.dense()
    np.testing.assert_allclose(a[0], 0.2, atol=1e-7)  # the hub sends to 4 leaves and itself
    np.testing.assert_allclose(a[1:, 0], 0.5, atol=1e-7)  # each leaf: to the hub and itself
    np.testing.assert_allclose(np.diag(a), [0.2, 0.5, 0.5, 0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(a.sum(axis=0), [2.2, 0.7, 0.7, 0.7, 0.7], atol=1e-6)
    np.testing.assert_allclose(topo.row_sums(), a.sum(axis=1)[None], atol=1e-7)
    np.testing.assert_allclose(topo.column_sums(), a.sum(axis=0)[None], atol=1e-7)
    self.assertTrue(topo.row_stochastic)
    self.assertFalse(topo.column_stochastic)
    self.assertFalse(topo.doubly_stochastic)

  def test_directed_graph_push_weights_follow_out_degrees(self):
    topo = _make("directed_erdos_renyi", 12, weights="push")
    a = topo.dense()
    off = (a > 0) & ~np.eye(12, dtype=bool)
    out_degree = off.sum(axis=1)
    self.assertGreater(len(set(out_degree.tolist())), 1)  # irregular: the test means something
    np.testing.assert_allclose(a, np.where(off | np.eye(12, dtype=bool),
                                           1.0 / (1.0 + out_degree)[:, None], 0.0), atol=1e-7)
    self.assertTrue(topo.row_stochastic)
    self.assertFalse(topo.column_stochastic)
    uniform = _make("directed_erdos_renyi", 12, weights="uniform")  # the same graph
    np.testing.assert_array_equal(uniform.dense() > 0, a > 0)
    self.assertTrue(uniform.column_stochastic)
    self.assertFalse(uniform.row_stochastic)

  @parameterized.parameters("ring", "torus", "exponential", "one_peer_exponential")
  def test_regular_graphs_push_weights_are_doubly_stochastic(self, kind):
    # On a regular graph out-degree = in-degree: push weights are the uniform weights
    push, uniform = topology.make(kind, 16, weights="push"), topology.make(kind, 16,
                                                                            weights="uniform")
    np.testing.assert_array_equal(push.nbr_w, uniform.nbr_w)
    self.assertTrue(push.doubly_stochastic)
    self.assertEqual(push.shifts, uniform.shifts)

  def test_lazy_keeps_rows_and_columns(self):
    for topo in (_make("directed_erdos_renyi", 8, weights="push"),
                 topology.make("directed_exponential_random", 8, weights="push"),
                 topology.make("star", 5, weights="uniform")):
      lazy = topo.lazy(0.3)
      self.assertEqual(lazy.row_stochastic, topo.row_stochastic)
      self.assertEqual(lazy.column_stochastic, topo.column_stochastic)
      # alpha + (1 - alpha) * sum: the sums that were one stay one
      np.testing.assert_allclose(lazy.row_sums(), 0.3 + 0.7 * topo.row_sums(), atol=1e-6)
      np.testing.assert_allclose(lazy.column_sums(), 0.3 + 0.7 * topo.column_sums(), atol=1e-6)
    self.assertTrue(topo.lazy(0.3).column_stochastic)  # the last: columns

  def test_self_weight_is_refused_where_columns_do_not_sum_to_one(self):
    star = topology.make("star", 5, weights="push")
    self._assert_one_line_error(lambda: star.with_self_weight(0.5), "self_weight=0.5",
                                "columns sum to one", "star", "lazy")
    self._assert_one_line_error(
        lambda: topology.make("directed_erdos_renyi", 8, seed=1, weights="push", self_weight=0.5),
        "columns sum to one", "directed_erdos_renyi")
    ring = topology.make("ring", 8, weights="push", self_weight=0.5)  # doubly stochastic: fine
    np.testing.assert_allclose(np.diag(ring.dense()), 0.5, atol=1e-7)
    self.assertTrue(ring.doubly_stochastic)

  def test_from_matrices_with_rows(self):
    a = OrientationTest.A.T  # rows sum to one, columns do not
    topo = topology.from_matrices(a, stochastic="rows")
    np.testing.assert_allclose(topo.dense(), a, atol=1e-7)
    self.assertTrue(topo.row_stochastic)
    self.assertFalse(topo.column_stochastic)
    self.assertTrue(topo.directed)
    schedule = topology.from_matrices(np.stack([a, np.eye(3)]), stochastic="rows")
    self.assertEqual(schedule.period, 2)
    self.assertTrue(schedule.row_stochastic)
    # the column-stochastic original is refused as rows, in one line naming the row
    self._assert_one_line_error(
        lambda: topology.from_matrices(OrientationTest.A, stochastic="rows"), "row 0", "rows")
    self._assert_one_line_error(lambda: topology.from_matrices(a, stochastic="both"),
                                "stochastic='both'", "columns, rows")
    self._assert_one_line_error(  # the default still checks columns, and names the way out
        lambda: topology.from_matrices(a), "column 0", "stochastic='rows'")
    blocks = np.kron(np.eye(2), np.full((2, 2), 0.5))
    self._assert_one_line_error(lambda: topology.from_matrices(blocks, stochastic="rows"),
                                "disconnected")
    negative = np.array([[1.5, -0.5], [0.5, 0.5]])
    self._assert_one_line_error(lambda: topology.from_matrices(negative, stochastic="rows"),
                                "negative")


class DirectedGraphsTest(parameterized.TestCase):
  """directed_erdos_renyi and directed_exponential_random."""

  def test_directed_erdos_renyi_is_seeded_and_directed(self):
    a = topology.make("directed_erdos_renyi", 16, seed=2).dense()
    np.testing.assert_array_equal(a, topology.make("directed_erdos_renyi", 16, seed=2).dense())
    self.assertFalse(np.array_equal(a, topology.make("directed_erdos_renyi", 16, seed=3).dense()))
    off = (a > 0) & ~np.eye(16, dtype=bool)
    self.assertTrue(np.any(off & ~off.T))  # one-way links
    self.assertTrue(np.any(off & off.T))  # and some both ways: pairs are drawn independently
    self.assertTrue(_connected(off))
    self.assertTrue(topology.make("directed_erdos_renyi", 16, seed=2).directed)
    np.testing.assert_array_equal(  # p = 1: every ordered pair
        topology.make("directed_erdos_renyi", 6, p=1.0).dense() > 0, np.ones((6, 6), bool))

  def test_directed_erdos_renyi_draws_ordered_pairs_with_probability_p(self):
    k_count, p = 3000, 0.01  # past the dense-draw size of erdos_renyi: O(edges) all the same
    start = time.perf_counter()
    topo = topology.make("directed_erdos_renyi", k_count, p=p, seed=5)
    self.assertLess(time.perf_counter() - start, 20.0)
    edges, pairs = topo.num_edges(), k_count * (k_count - 1)
    self.assertLess(abs(edges - p * pairs), 5 * math.sqrt(p * pairs))
    code, _ = topology._entries(topo.nbr_idx[0], topo.nbr_w[0])
    k, l = np.divmod(code, k_count)
    mutual = np.isin(l * k_count + k, code).sum() / 2  # pairs linked both ways: about p^2
    self.assertLess(abs(mutual - p * p * pairs / 2), 5 * math.sqrt(p * p * pairs / 2) + 5)

  def test_directed_erdos_renyi_must_be_strongly_connected(self):
    with self.assertRaises(ValueError) as ctx:
      topology.make("directed_erdos_renyi", 8, p=0.05)
    self.assertNotIn("\n", str(ctx.exception))
    self.assertIn("not strongly connected", str(ctx.exception))
    with self.assertRaisesRegex(ValueError, "directed_erdos_renyi p=0 is outside"):
      topology.make("directed_erdos_renyi", 8, p=0)
    # a cycle plus one chord is strongly connected; dropping one cycle link leaves it weakly
    # connected only, which the undirected search would accept
    k = np.arange(6)
    l_ok, k_ok = topology._links_of(6, np.r_[k, 0], np.r_[(k + 1) % 6, 3])
    self.assertTrue(topology._strongly_connected_links(6, l_ok, k_ok))
    keep = ~((l_ok == 5) & (k_ok == 0))
    self.assertFalse(topology._strongly_connected_links(6, l_ok[keep], k_ok[keep]))
    self.assertTrue(topology._strongly_connected_links(6, l_ok[keep], k_ok[keep],
                                                       both_ways=True))

  def test_directed_exponential_random_sends_to_one_exponential_peer(self):
    k_count = 16
    topo = topology.make("directed_exponential_random", k_count, weights="push", seed=4)
    hops = [1, 2, 4, 8]
    self.assertEqual(topo.period, len(hops))
    mats = topo.dense_schedule()
    eye = np.eye(k_count, dtype=bool)
    off = (mats > 0) & ~eye[None]
    np.testing.assert_array_equal(off.sum(axis=2), 1)  # one out-neighbour per agent and step
    exponential = (topology.make("exponential", k_count).dense() > 0) & ~eye
    np.testing.assert_array_equal(off.sum(axis=0), exponential)  # each link once a period
    np.testing.assert_array_equal(mats[off], 0.5)  # a sender splits its mass in two
    np.testing.assert_array_equal(mats[:, eye], 0.5)
    self.assertTrue(topo.row_stochastic)
    self.assertFalse(topo.column_stochastic)  # in-degrees differ within a step
    self.assertGreater(off.sum(axis=1).max(), 1)
    self.assertIsNone(topo.shifts)  # not circulant: agents' hops differ
    self.assertFalse(np.array_equal(
        mats, topology.make("directed_exponential_random", k_count, weights="push",
                            seed=5).dense_schedule()))


if __name__ == "__main__":
  absltest.main()
