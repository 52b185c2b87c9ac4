"""Tests for drt_jax.compression and CHOCO-SGD (drt_jax.algorithms.compressed)."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from drt_jax import backends, compression, topology
from drt_jax.algorithms import compressed as choco_lib
from drt_jax.algorithms import diffusion
from tests import fixtures

_K = 8
_COMPRESSORS = compression.COMPRESSORS


def _params(k_count=_K, seed=0, consensus=False, dtype=jnp.float32):
  """Two leaves of 10 and 3 x 4 entries per agent."""
  rng = np.random.default_rng(seed)

  def leaf(*shape):
    x = rng.standard_normal((1 if consensus else k_count, *shape))
    return jnp.asarray(np.broadcast_to(x, (k_count, *shape)), dtype)

  return {"a": leaf(10), "b": {"c": leaf(3, 4)}}


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def _zeros(tree):
  return jax.tree.map(jnp.zeros_like, tree)


@functools.cache
def _jitted(compressor="top_k", momentum=0.9, **kw):
  """One CHOCO and its jitted step per configuration, shared by the tests of a worker."""
  alg = choco_lib.choco(optax.sgd(0.1, momentum=momentum), compressor=compressor, **kw)
  return alg, jax.jit(alg.step)


def _np_compress(v, name, ratio):
  """numpy top_k (or identity) of one flat vector."""
  if name == "none":
    return v
  k = max(1, math.ceil(round(ratio * v.size, 6)))
  out = np.zeros_like(v)
  idx = np.argsort(-np.abs(v))[:k]
  out[idx] = v[idx]
  return out


def _np_keep_largest(x, score, k):
  """x with all but the first k entries of a stable descending sort of |score| zeroed."""
  idx = np.argsort(-np.abs(np.asarray(score, np.float64)), kind="stable")[:k]
  out = np.zeros_like(x)
  out[idx] = x[idx]
  return out


def _tied_rows(n, seed):
  """Rows of n entries: many ties (zeros among them), distinct values, all equal, all zero."""
  rng = np.random.default_rng(seed)
  rows = [rng.integers(-3, 4, n) * 0.5, rng.integers(-1, 2, n) * 1.0, rng.standard_normal(n),
          np.full(n, -2.0), np.zeros(n),
          np.where(rng.random(n) < 0.5, np.inf, rng.standard_normal(n))]
  return np.stack(rows).astype(np.float32)


def _ks(n):
  """The k to check on n entries: 1, 2, n / 3, n - 1 and n."""
  return sorted({1, 2, n // 3, n - 1, n} & set(range(1, n + 1)))


class SelectionTest(parameterized.TestCase):
  """top_k and random_k select by bisection, not by sorting: the same entries as a stable sort."""

  @parameterized.parameters(1, 7, 33, 300)
  def test_top_k_equals_a_stable_argsort(self, n):
    rows = _tied_rows(n, seed=n)
    for k in _ks(n):
      out = np.asarray(jax.jit(jax.vmap(lambda v, k=k: compression.top_k(v, k)))(rows))
      for row, got in zip(rows, out, strict=True):
        np.testing.assert_array_equal(got, _np_keep_largest(row, row, k), f"n={n} k={k}")
      self.assertTrue(np.all((out != 0).sum(axis=1) <= k))

  @parameterized.parameters(1, 7, 33, 300)
  def test_random_k_equals_a_stable_argsort_of_its_uniform_draws(self, n):
    rows = _tied_rows(n, seed=n + 1)
    keys = jax.random.split(jax.random.key(n), len(rows))
    for k in _ks(n):
      out = np.asarray(jax.jit(jax.vmap(lambda v, key, k=k: compression.random_k(v, k, key)))(
          rows, keys))
      for row, key, got in zip(rows, keys, out, strict=True):
        u = np.asarray(jax.random.uniform(key, (n,)))
        np.testing.assert_array_equal(got, _np_keep_largest(row, u, k), f"n={n} k={k}")

  def test_ties_on_uniform_draws_go_to_the_lower_index(self):
    # 3 of 2^23 float32 uniform values: collisions at the threshold do happen, keep exactly k
    score = jnp.array([0.5, 0.25, 0.5, 0.5, 0.75, 0.25], jnp.float32)
    x = jnp.arange(1.0, 7.0)
    for k, want in ((1, [0, 0, 0, 0, 5, 0]), (2, [1, 0, 0, 0, 5, 0]), (3, [1, 0, 3, 0, 5, 0]),
                    (5, [1, 2, 3, 4, 5, 0])):
      np.testing.assert_array_equal(compression._keep_largest(x, score, k), want)

  def test_nan_counts_as_largest_and_half_precision_is_exact(self):
    np.testing.assert_array_equal(compression.top_k(jnp.array([1.0, jnp.nan, -3.0]), 1),
                                  [0, np.nan, 0])
    rows = _tied_rows(300, seed=4)
    for dtype in (jnp.float16, jnp.bfloat16):
      x = jnp.asarray(rows, dtype)
      out = compression.compress_stacked(compression.make("top_k", ratio=0.1), {"w": x},
                                         jax.random.key(0))["w"]
      self.assertEqual(out.dtype, dtype)
      want = [_np_keep_largest(r, r, 30) for r in np.asarray(x, np.float32)]
      np.testing.assert_array_equal(np.asarray(out, np.float32), want)

  def test_float64_is_not_rounded_to_float32(self):
    with jax.enable_x64(True):
      x = 1.0 + np.arange(8) * 1e-12  # equal in float32
      perm = np.random.default_rng(0).permutation(8)
      out = np.asarray(compression.top_k(jnp.asarray(x[perm]), 3))
    np.testing.assert_array_equal(out, _np_keep_largest(x[perm], x[perm], 3))
    self.assertEqual(set(out[out != 0]), set(x[-3:]))

  @parameterized.parameters("top_k", "random_k")
  def test_sharded_agents_select_alike_and_gather_nothing(self, name):
    k_count = 8
    self.assertGreaterEqual(jax.device_count(), k_count)
    rng = np.random.default_rng(5)
    tree = {"w": jnp.asarray(rng.integers(-4, 5, (k_count, 40, 25)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((k_count, 25)), jnp.float32)}
    q = compression.make(name, ratio=0.1)
    fn = jax.jit(lambda t, key: compression.compress_stacked(q, t, key))
    key = jax.random.key(1)
    split = backends.place(tree, "shard", k_count)
    out = fn(split, key)
    self.assertEqual(len(out["w"].sharding.device_set), k_count)  # the agents stayed split
    chex.assert_trees_all_equal(jax.tree.map(backends.to_host, out), fn(tree, key))
    hlo = fn.lower(split, key).compile().as_text()
    gathered = fixtures.collectives(hlo)["all-gather"]
    self.assertEmpty([s for s in gathered if fixtures.elements(s) >= 25], gathered)


class CompressorTest(parameterized.TestCase):

  def test_top_k_keeps_the_largest_magnitudes(self):
    q = compression.make("top_k", ratio=0.25)
    x = jnp.array([0.1, -3.0, 2.0, 0.5, -0.2, 4.0, 0.0, -1.0])  # k = 2
    m = jnp.array([[0.3, -9.0, 1.0, 0.2], [5.0, 0.1, 0.0, -0.4], [2.0, 0.7, -6.0, 1.5]])  # k = 3
    out = q.compress({"x": x, "m": m}, jax.random.key(0))
    np.testing.assert_array_equal(out["x"], [0, -3.0, 0, 0, 0, 4.0, 0, 0])
    np.testing.assert_array_equal(out["m"], [[0, -9.0, 0, 0], [5.0, 0, 0, 0], [0, 0, -6.0, 0]])

  def test_random_k_keeps_exactly_k_entries_unchanged(self):
    q = compression.make("random_k", ratio=0.3)
    x = jnp.arange(1.0, 21.0) * jnp.where(jnp.arange(20) % 2 == 0, 1.0, -1.0)  # all nonzero
    keys = jax.random.split(jax.random.key(3), 64)
    out = np.asarray(jax.jit(jax.vmap(lambda k: q.compress({"x": x}, k)["x"]))(keys))
    kept = out != 0
    np.testing.assert_array_equal(kept.sum(axis=1), 6)  # k = ceil(0.3 * 20)
    np.testing.assert_array_equal(out[kept], np.broadcast_to(x, out.shape)[kept])
    self.assertTrue(kept.any(axis=0).all())  # every index gets drawn in 64 draws
    self.assertGreater(len({tuple(r) for r in kept}), 32)  # the draws differ by key
    np.testing.assert_array_equal(q.compress({"x": x}, keys[0])["x"], out[0])  # same key, same

  def test_quantize_is_unbiased_up_to_tau_and_on_the_level_grid(self):
    bits, n, draws = 2, 8, 20000
    s = 2 ** bits - 1
    x = jnp.array([0.3, -1.2, 0.0, 2.5, -0.7, 0.05, 1.1, -2.0])
    tau = 1 + min(n / s ** 2, math.sqrt(n) / s)
    self.assertAlmostEqual(compression.tau(n, bits), tau)
    q = compression.make("quantize", bits=bits)
    out = np.asarray(jax.jit(jax.vmap(lambda k: q.compress({"x": x}, k)["x"]))(
        jax.random.split(jax.random.key(1), draws)), np.float64)
    norm = float(jnp.linalg.norm(x))
    level = out * s * tau / norm
    np.testing.assert_allclose(level, np.round(level), atol=1e-4)  # on the grid
    self.assertTrue(np.all(np.abs(np.round(level)) <= s))
    self.assertTrue(np.all(out * np.asarray(x) >= 0))  # the sign is x's (or zero)
    self.assertTrue(np.all(out[:, 2] == 0))
    # E[Q(x)] = x / tau; each entry's spread is at most ||x|| / (2 s tau) per draw
    stderr = norm / (2 * s * tau) / math.sqrt(draws)
    np.testing.assert_allclose(out.mean(axis=0), np.asarray(x) / tau, atol=5 * stderr)
    self.assertGreater(np.abs(out.mean(axis=0) - np.asarray(x)).max(), 50 * stderr)  # not x

  def test_zero_and_empty_leaves(self):
    for name in _COMPRESSORS:
      out = compression.make(name).compress(
          {"z": jnp.zeros((5,)), "e": jnp.zeros((0,))}, jax.random.key(0))
      np.testing.assert_array_equal(out["z"], np.zeros(5))  # no NaN from a zero norm
      self.assertEqual(out["e"].shape, (0,))

  def test_message_bytes_are_a_hand_count(self):
    tree = {"a": jax.ShapeDtypeStruct((10,), jnp.float32),
            "b": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)}
    expected = {"none": 10 * 4 + 12 * 2,
                "top_k": 3 * (4 + 4) + 3 * (2 + 4),  # k = ceil(2.5) = 3 and ceil(3) = 3
                "random_k": 3 * (4 + 4) + 3 * (2 + 4),
                "quantize": (4 + 7) + (4 + 8)}  # 10 * 5 bits -> 7 bytes, 12 * 5 -> 8
    arrays = {"a": jnp.zeros(10), "b": jnp.zeros((3, 4), jnp.bfloat16)}
    for name, count in expected.items():
      self.assertEqual(compression.message_bytes(tree, name, ratio=0.25, bits=4), count)
      self.assertEqual(compression.make(name, ratio=0.25, bits=4).message_bytes(arrays), count)
    self.assertEqual(compression.message_bytes(tree, "quantize", bits=1), (4 + 3) + (4 + 3))

  def test_kept_and_delta(self):
    self.assertEqual([compression.kept(10, r) for r in (0.3, 0.01, 0.25, 1.0)], [3, 1, 3, 10])
    tree = {"a": jnp.zeros(10), "b": jnp.zeros(40)}
    self.assertEqual(compression.delta(tree, "none"), 1.0)
    self.assertAlmostEqual(compression.delta(tree, "top_k", ratio=0.1), 0.1)
    self.assertAlmostEqual(compression.delta(tree, "random_k", ratio=0.15), 0.15)  # 6/40 < 2/10
    self.assertAlmostEqual(compression.delta(tree, "quantize", bits=2), 1 / compression.tau(40, 2))

  def test_bad_options_are_refused_in_one_line(self):
    for kw, pattern in (({"compressor": "gzip"}, "none, top_k, random_k, quantize"),
                        ({"ratio": 0}, r"ratio=0 must be a number in \(0, 1\]"),
                        ({"ratio": 1.5}, "ratio=1.5"), ({"ratio": True}, "ratio=True"),
                        ({"bits": 0}, "bits=0 must be an integer in 1..16"),
                        ({"bits": 17}, "bits=17"), ({"bits": 2.5}, "bits=2.5")):
      with self.assertRaisesRegex(ValueError, pattern) as ctx:
        compression.make(**{"compressor": "top_k", **kw})
      self.assertNotIn("\n", str(ctx.exception))


class ChocoTest(parameterized.TestCase):

  def test_none_with_step_one_is_atc_step_for_step(self):
    opt = optax.sgd(0.1, momentum=0.9)
    alg = choco_lib.choco(opt, compressor="none")
    atc = diffusion.diffusion_atc(opt)
    ring = topology.make("ring", _K)
    params = _params(seed=1)
    state, atc_state = alg.init(params, ring), atc.init(params, ring)
    self.assertEqual(float(state.consensus_step), 1.0)  # the default for 'none'
    step, atc_step = jax.jit(alg.step), jax.jit(atc.step)
    p, q = params, params
    for t in range(4):
      grads = _grads(params, 10 + t)
      p, state = step(p, grads, state, ring)
      q, atc_state = atc_step(q, grads, atc_state, ring)
      chex.assert_trees_all_close(p, q, atol=2e-6, rtol=2e-6)
    self.assertTrue(_changed(p, params))

  @parameterized.parameters(("none", 0.5), ("top_k", 0.375))
  def test_matches_a_numpy_recursion(self, name, gamma):
    # float64, a time-varying directed graph (doubly stochastic), plain SGD
    topo = topology.make("one_peer_exponential", _K)
    mu, ratio, steps = 0.1, 0.25, 6
    with jax.enable_x64(True):
      alg = choco_lib.choco(optax.sgd(mu), compressor=name, ratio=ratio, consensus_step=gamma)
      params = _params(seed=2, dtype=jnp.float64)
      grads = [_grads(params, 20 + t) for t in range(steps)]
      state = alg.init(params, topo)
      step = jax.jit(alg.step)
      p = params
      for g in grads:
        p, state = step(p, g, state, topo)
      out = [np.asarray(x) for x in jax.tree.leaves(p)]
    self.assertEqual(out[0].dtype, np.float64)
    x = [np.asarray(v, np.float64) for v in jax.tree.leaves(params)]
    x_hat = [v.copy() for v in x]
    for t, g in enumerate(grads):
      a = topo.dense(t)  # x_k <- sum_l a_lk x_l
      for i, gi in enumerate(jax.tree.leaves(g)):
        half = x[i] - mu * np.asarray(gi)
        q = np.stack([_np_compress((half[k] - x_hat[i][k]).reshape(-1), name, ratio)
                      .reshape(half.shape[1:]) for k in range(_K)])
        x_hat[i] = x_hat[i] + q
        mixed = np.einsum("lk,l...->k...", a, x_hat[i])
        x[i] = half + gamma * (mixed - x_hat[i])  # columns of a sum to one
    for got, want in zip(out, x, strict=True):
      np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)

  @parameterized.parameters(("top_k", 0.25), ("quantize", 225 / 237))  # 1 / tau(12, 4)
  def test_reaches_consensus_on_the_initial_average(self, name, gamma):
    # learning rate 0: a fixed-point problem whose solution is the initial average
    steps = 600
    with jax.enable_x64(True):
      alg = choco_lib.choco(optax.sgd(0.0), compressor=name, ratio=0.25, bits=4)
      ring = topology.make("ring", _K)
      params = _params(seed=3, dtype=jnp.float64)
      state = alg.init(params, ring)
      self.assertAlmostEqual(float(state.consensus_step), gamma, places=6)  # delta, the default

      @jax.jit
      def run(params, state):
        def body(_, carry):
          p, s = carry
          return alg.step(p, _zeros(p), s, ring)
        return jax.lax.fori_loop(0, steps, body, (params, state))

      out, state = run(params, state)
      avg0 = [np.asarray(x).mean(axis=0) for x in jax.tree.leaves(params)]
      leaves = [np.asarray(x) for x in jax.tree.leaves(out)]
      public = [np.asarray(x) for x in jax.tree.leaves(state.x_hat)]
    for x, a in zip(leaves, avg0, strict=True):
      np.testing.assert_allclose(x.mean(axis=0), a, atol=1e-12, rtol=0)  # the average is kept
      np.testing.assert_allclose(x, np.broadcast_to(a, x.shape), atol=1e-10, rtol=0)
    for h, a in zip(public, avg0, strict=True):  # the public copies caught up
      np.testing.assert_allclose(h, np.broadcast_to(a, h.shape), atol=1e-10, rtol=0)
    self.assertGreater(max(np.abs(np.asarray(x) - a).max()  # they had to travel
                           for x, a in zip(jax.tree.leaves(params), avg0)), 1.0)

  def test_random_k_is_reproducible_and_seeded(self):
    ring = topology.make("ring", _K)
    params = _params(seed=4)
    alg, step = _jitted("random_k")  # k = 1 of 10 and 2 of 12 entries

    def run(seed):
      init = choco_lib.choco(optax.sgd(0.1, momentum=0.9), compressor="random_k",
                             seed=seed).init
      p, state = params, init(params, ring)
      for t in range(2):
        p, state = step(p, _grads(params, 30 + t), state, ring)
      return p, state

    (p0, s0), (p0_again, s0_again) = run(0), run(0)
    compiled = step._cache_size()
    p1, _ = run(1)
    self.assertEqual(step._cache_size(), compiled)  # the seed is a state value, not a constant
    chex.assert_trees_all_equal(p0, p0_again)
    chex.assert_trees_all_equal(s0.x_hat, s0_again.x_hat)
    self.assertTrue(_changed(p0, p1))
    self.assertGreater(float(s0.compression_error), 0.5)  # most of v dropped: a real error

  @parameterized.parameters(*_COMPRESSORS)
  def test_consensus_with_zero_grads_is_a_fixed_point(self, name):
    alg, step = _jitted(name)
    topo = topology.make("one_peer_exponential", _K)  # directed, time-varying, doubly stochastic
    params = _params(seed=5, consensus=True)
    state = alg.init(params, topo)
    out = params
    for _ in range(3):
      out, state = step(out, _zeros(params), state, topo)
    chex.assert_trees_all_equal(out, params)
    chex.assert_trees_all_equal(state.x_hat, params)

  @parameterized.parameters("top_k", "quantize")
  def test_one_agent_is_the_optimizer(self, name):
    opt = optax.sgd(0.1, momentum=0.9)
    alg, step = _jitted(name)
    params = _params(k_count=1, seed=6)
    topo = topology.make("ring", 1)
    state = alg.init(params, topo)
    ref = jax.tree.map(lambda x: x[0], params)
    ref_state = opt.init(ref)
    for t in range(3):
      grads = _grads(params, 40 + t)
      params, state = step(params, grads, state, topo)
      updates, ref_state = opt.update(jax.tree.map(lambda g: g[0], grads), ref_state, ref)
      ref = optax.apply_updates(ref, updates)
      # the combine term vanishes although x_hat lags behind x (compressed)
      chex.assert_trees_all_equal(choco_lib.disagreement(state.x_hat, topo.mixing()),
                                  _zeros(params))
    self.assertTrue(_changed(state.x_hat, params))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], params), ref, atol=1e-6, rtol=1e-6)

  def test_new_weights_do_not_recompile(self):
    alg = choco_lib.choco(optax.sgd(0.1), compressor="top_k", ratio=0.25)
    ring = topology.make("ring", _K)
    lazy = ring.lazy(0.5)
    params = _params(seed=7)
    grads = _grads(params, 8)
    step = jax.jit(alg.step)  # its own: counts this test's compilations
    p, s = step(params, grads, alg.init(params, ring), ring)
    compiled = step._cache_size()
    p, s = step(p, grads, s, topology.make("ring", _K))  # a new object, same weights
    p_ring, _ = step(p, grads, s, ring)
    p_lazy, _ = step(p, grads, s, lazy)
    p_new, _ = step(p, grads, s, dataclasses.replace(ring, nbr_w=lazy.nbr_w))
    self.assertEqual(step._cache_size(), compiled)
    self.assertTrue(_changed(p_lazy, p_ring))  # the new weights were used
    chex.assert_trees_all_close(p_lazy, p_new, atol=1e-6)
    # a swept consensus step is a state value, not a constant of the program
    step(p, grads, s._replace(consensus_step=jnp.float32(0.5)), ring)
    self.assertEqual(step._cache_size(), compiled)

  def test_refuses_bad_options_and_weights_in_one_line(self):
    opt = optax.sgd(0.1)
    for kw, pattern in (({"compressor": "gzip"}, "unknown compressor 'gzip'; expected one of"),
                        ({"ratio": 0.0}, "ratio=0.0"), ({"bits": 0}, "bits=0"),
                        ({"consensus_step": 0}, r"consensus_step=0 must be a number in \(0, 1\]"),
                        ({"consensus_step": 1.5}, "consensus_step=1.5"),
                        ({"seed": "a"}, r"seed='a' must be an integer in \[0, 2\^31\)"),
                        ({"seed": -1}, "seed=-1")):
      with self.assertRaisesRegex(ValueError, pattern) as ctx:
        choco_lib.choco(opt, **kw)
      self.assertNotIn("\n", str(ctx.exception))
    a = 0.5 * np.eye(_K) + 0.5 * np.roll(np.eye(_K), 1, axis=1)  # k listens to k - 1
    a[0, 0], a[_K - 1, 0] = 0.2, 0.8  # columns still sum to one, row K - 1 to 1.3
    with self.assertRaisesRegex(ValueError, "choco needs doubly stochastic weights") as ctx:
      choco_lib.choco(opt).init(_params(), topology.from_matrices(a))
    self.assertNotIn("\n", str(ctx.exception))

  def test_message_bytes(self):
    alg = choco_lib.choco(optax.sgd(0.1), compressor="top_k", ratio=0.25)
    params = _params()
    raw = 4 * (10 + 12)
    self.assertEqual(alg.message_bytes(raw), 8.0 * 6)  # before init: one float32 vector, k = 6
    alg.init(params)
    compressed = 3 * 8 + 3 * 8  # k = 3 of 10 and 3 of 12, value and index each
    self.assertEqual(alg.message_bytes(raw), compressed)
    self.assertEqual(alg.message_bytes(raw + 24), compressed + 24)  # statistics go uncompressed
    per_agent = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    self.assertEqual(alg.message_bytes(per_agent), compressed)
    none = choco_lib.choco(optax.sgd(0.1), compressor="none")
    none.init(params)
    self.assertEqual(none.message_bytes(raw + 24), raw + 24)

  def test_combine_stats_and_metrics(self):
    alg, step = _jitted("quantize")
    topo = topology.make("one_peer_exponential", _K)
    params = _params(seed=9)
    state = alg.init(params, topo)
    stats = {"mean": _params(seed=10)["a"]}
    for t in range(2):
      params, state = step(params, _grads(params, 50 + t), state, topo)
    out = jax.jit(alg.combine_stats)(stats, state, topo)
    for t in (0, 1):  # mixed with the weights of step 1, the last one taken
      expected = np.einsum("lk,l...->k...", topo.dense(t), np.asarray(stats["mean"]))
      close = np.allclose(out["mean"], expected, atol=1e-6)
      self.assertEqual(close, t == 1)
    m = jax.jit(alg.metrics)(params, state, topo)
    self.assertTrue({"compression_error", "public_gap", "drt_mean"} <= set(m))
    self.assertTrue(0 < float(m["compression_error"]) < 1)
    gap = [np.sqrt(sum(np.sum((np.asarray(x[k]) - np.asarray(h[k])) ** 2) for x, h in pairs)
                   / sum(np.sum(np.asarray(x[k]) ** 2) for x, _ in pairs)) for k in range(_K)
           for pairs in [list(zip(jax.tree.leaves(params), jax.tree.leaves(state.x_hat)))]]
    self.assertAlmostEqual(float(m["public_gap"]), np.mean(gap), places=5)
    self.assertGreater(float(m["public_gap"]), 0.1)  # x_hat lags x by the consensus move


def _changed(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return any(bool(jnp.any(x != y)) for x, y in pairs)


if __name__ == "__main__":
  absltest.main()
