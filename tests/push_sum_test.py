"""Tests for drt_jax.algorithms.push: exact averaging on directed graphs whose senders split
their mass, the least-squares fixed point, and the protocol's invariants."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from drt_jax import combine, topology
from drt_jax.algorithms import diffusion
from drt_jax.algorithms.push import push_sum

_K = 8


def _graph(kind="directed_erdos_renyi", weights="push"):
  # seed 1: the default-p draw of seed 0 is not strongly connected at K = 8
  return topology.make(kind, _K, weights=weights, seed=1)


def _float64_weights(topo):
  """The push weights in float64: each is 1 / (1 + an out-degree), so 1 / round(1 / w) recovers
  it exactly, and the rows sum to one to float64 rounding instead of float32's ~1e-7 (whose
  slow drift of y would move the least-squares fixed point by ~1e-5)."""
  w = np.asarray(topo.nbr_w, np.float64)
  return dataclasses.replace(topo, nbr_w=np.where(w > 0, 1.0 / np.rint(1.0 / np.where(
      w > 0, w, 1.0)), 0.0))


def _tree(seed, k_count=_K, shift=0.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(shift + rng.standard_normal((k_count, 3)), dtype),
          "b": {"kernel": jnp.asarray(shift + rng.standard_normal((k_count, 2, 2)), dtype)}}


def _leaves(tree):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)],
                        axis=1)


@functools.partial(jax.jit, static_argnames="steps")
def _push_sum_lr0(params, grads, topo, steps):
  """``steps`` push-sum steps with learning rate 0 (the gradients do not move anything)."""
  alg = push_sum(optax.sgd(0.0))

  def body(_, carry):
    z, state = carry
    return alg.step(z, grads, state, topo)

  return jax.lax.fori_loop(0, steps, body, (params, alg.init(params)))


@functools.partial(jax.jit, static_argnames="steps")
def _gossip(x, topo, steps):
  """Plain gossip ``x_k <- sum_l a_lk x_l``, no weight y."""
  return jax.lax.fori_loop(0, steps, lambda t, x: combine.combine(x, topo, t), x)


class AveragingTest(parameterized.TestCase):

  @parameterized.parameters("directed_erdos_renyi", "directed_exponential_random")
  def test_push_sum_reaches_the_uniform_average_where_gossip_does_not(self, kind):
    push = _graph(kind)
    self.assertTrue(push.directed)
    self.assertTrue(push.row_stochastic)
    self.assertFalse(push.column_stochastic)  # so not doubly stochastic
    with jax.enable_x64(True):
      x0 = _tree(0, shift=3.0, dtype=np.float64)
      average = _leaves(x0).mean(axis=0)
      z, state = _push_sum_lr0(x0, _tree(1, dtype=np.float64), push, steps=200)
      gossip = _leaves(_gossip(x0, push, steps=200))
      # the same graph, receiver-normalised weights: columns sum to one
      column = _leaves(_gossip(x0, _graph(kind, weights="uniform"), steps=200))
    z, y = _leaves(z), np.asarray(state.y)
    self.assertEqual(z.dtype, np.float64)
    np.testing.assert_allclose(z, np.broadcast_to(average, z.shape), atol=1e-6, rtol=0)
    self.assertAlmostEqual(y.sum(), _K, delta=1e-4)  # rows sum to one: the total is kept...
    self.assertGreater(np.abs(y - 1).max(), 0.2)  # ...but the graph is unbalanced
    # Plain gossip with the same weights keeps the total too, but each agent ends at y_k times
    # the average, which push-sum divides out: no consensus, a miss of more than 0.5 (~2).
    np.testing.assert_allclose(gossip, y[:, None] * average, atol=1e-6, rtol=0)
    self.assertGreater(np.abs(gossip - average).max(), 0.5)
    # Gossip with column-stochastic weights reaches consensus, at a pi-weighted average that is
    # not the uniform one (misses of 0.16 and 0.10 on these draws).
    np.testing.assert_allclose(column, np.broadcast_to(column.mean(axis=0), column.shape),
                               atol=1e-6, rtol=0)
    self.assertGreater(np.abs(column - average).max(), 0.05)

  def test_one_peer_exponential_is_the_exact_push_sum_graph(self):
    # SGP's time-varying directed exponential graph: regular, so its push weights are doubly
    # stochastic, y stays one, and one period (log2 K steps) averages exactly.
    topo = topology.make("one_peer_exponential", _K, weights="push")
    self.assertTrue(topo.directed)
    self.assertTrue(topo.doubly_stochastic)
    self.assertEqual(topo.period, 3)
    with jax.enable_x64(True):
      x0 = _tree(2, shift=3.0, dtype=np.float64)
      z, state = _push_sum_lr0(x0, _tree(3, dtype=np.float64), topo, steps=3)
      gossip = _leaves(_gossip(x0, topo, steps=3))
    average = _leaves(x0).mean(axis=0)
    np.testing.assert_allclose(_leaves(z), np.broadcast_to(average, (_K, average.size)),
                               atol=1e-12, rtol=0)
    np.testing.assert_allclose(gossip, _leaves(z), atol=1e-12, rtol=0)
    np.testing.assert_array_equal(state.y, 1.0)


class LeastSquaresTest(absltest.TestCase):
  """Full-batch distributed least squares, J_k(w) = |H_k w - d_k|^2 / (2 M), agents' optima far
  apart, on a directed graph with push weights."""

  N, M = 3, 10

  def _problem(self):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((_K, self.M, self.N))
    w_true = rng.standard_normal((_K, self.N)) * 2.0  # heterogeneous agents
    d = np.einsum("kmn,kn->km", h, w_true) + 0.1 * rng.standard_normal((_K, self.M))
    r_mat = np.einsum("kmi,kmj->kij", h, h) / self.M  # grad J_k(w) = R_k w - r_k
    r_vec = np.einsum("kmi,km->ki", h, d) / self.M
    return r_mat, r_vec

  def _fixed_point(self, a, mu, r_mat, r_vec):
    """The affine recursion at y = y_inf (lim (A^T)^t 1): x <- B (x - mu (R D^-1 x - r)),
    B = A^T (x) I, D = diag(y_inf) (x) I; returns its fixed point z = D^-1 x and rate."""
    n, y = self.N, np.ones(_K)
    for _ in range(200):
      y = a.T @ y
    big_b = np.kron(a.T, np.eye(n))
    big_r = np.zeros((_K * n, _K * n))
    for k in range(_K):
      big_r[k * n:(k + 1) * n, k * n:(k + 1) * n] = r_mat[k] / y[k]
    t = big_b @ (np.eye(_K * n) - mu * big_r)
    x = np.linalg.solve(np.eye(_K * n) - t, mu * big_b @ r_vec.reshape(-1)).reshape(_K, n)
    return x / y[:, None], np.max(np.abs(np.linalg.eigvals(t)))

  def test_bias_is_order_step_size_unlike_column_stochastic_atc(self):
    r_mat, r_vec = self._problem()
    w_star = np.linalg.solve(r_mat.sum(axis=0), r_vec.sum(axis=0))  # argmin sum_k J_k
    push = _float64_weights(_graph())
    uniform = _graph(weights="uniform")  # the same graph, columns summing to one

    with jax.enable_x64(True):
      r_mat_j, r_vec_j = jnp.asarray(r_mat), jnp.asarray(r_vec)

      @functools.partial(jax.jit, static_argnames=("steps", "factory"))
      def run(topo, mu, steps, factory):
        alg = factory(optax.sgd(mu))  # mu traced: one program for every step size

        def body(_, carry):
          w, state = carry
          grads = {"w": jnp.einsum("kij,kj->ki", r_mat_j, w["w"]) - r_vec_j}
          return alg.step(w, grads, state, topo)

        w = {"w": jnp.zeros((_K, self.N), jnp.float64)}
        return jax.lax.fori_loop(0, steps, body, (w, alg.init(w, topo)))[0]["w"]

      dist = {}
      for mu, steps in ((0.1, 400), (0.025, 1500)):
        expected, rate = self._fixed_point(push.dense(), mu, r_mat, r_vec)
        self.assertLess(rate ** steps, 1e-12)  # the run below is long enough
        z = np.asarray(run(push, mu, steps, push_sum))
        np.testing.assert_allclose(z, expected, atol=1e-9, rtol=0)
        dist[mu] = np.abs(z - w_star).max()
      atc = np.asarray(run(uniform, 0.025, 1500, diffusion.diffusion_atc))
    # Every agent within O(mu) of the global minimiser: 0.59 at mu = 0.1, 0.15 at mu / 4.
    self.assertLess(dist[0.025], 0.2)
    self.assertBetween(dist[0.025] / dist[0.1], 0.2, 0.3)
    # Column-stochastic ATC on the same directed graph minimises sum_k pi_k J_k instead: its
    # bias does not shrink with the step (0.98 at mu = 0.025).
    self.assertGreater(np.abs(atc - w_star).max(), 0.8)


class ProtocolTest(chex.TestCase):

  def test_one_agent_reduces_to_the_optimizer(self):
    opt = optax.sgd(0.1, momentum=0.9)
    alg = push_sum(opt)
    params = _tree(4, k_count=1)
    topo = topology.make("ring", 1, weights="push")
    state = alg.init(params, topo)
    ref = jax.tree.map(lambda x: x[0], params)
    ref_state = opt.init(ref)
    step = jax.jit(alg.step)  # eager steps dispatch (and compile) op by op: slower
    for t in range(3):
      grads = _tree(10 + t, k_count=1)
      params, state = step(params, grads, state, topo)
      updates, ref_state = opt.update(jax.tree.map(lambda g: g[0], grads), ref_state, ref)
      ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], params), ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(state.y, 1.0)

  def test_consensus_is_a_fixed_point_with_equal_and_unequal_weights(self):
    alg = push_sum(optax.sgd(0.1))
    topo = _graph()
    params = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), _tree(5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = alg.init(params, topo)
    unequal = state._replace(y=jnp.linspace(0.2, 1.8, _K))  # sum K, far from balanced
    step = jax.jit(alg.step)
    for start in (state, unequal):
      out, s = params, start
      for _ in range(3):
        out, s = step(out, zeros, s, topo)
      chex.assert_trees_all_close(out, params, atol=1e-6, rtol=1e-6)
      self.assertAlmostEqual(float(jnp.sum(s.y)), _K, delta=1e-5)
    self.assertGreater(float(jnp.max(jnp.abs(s.y - unequal.y))), 0.05)  # y did move

  def test_step_combine_stats_and_metrics_equal_the_dense_recursion(self):
    mu = 0.1
    alg = push_sum(optax.sgd(mu, momentum=0.9))
    topo = _graph("directed_exponential_random")
    a = topo.dense(1)  # the step below is the state's second: count = 1
    z, grads, stats = _tree(6), _tree(7), {"mean": _tree(8)["a"]}
    state = alg.init(z, topo)
    state = state._replace(count=jnp.ones((), jnp.int32), y=jnp.linspace(0.5, 1.5, _K))
    active = jnp.arange(_K) != 2  # agent 2 skips its local step but still combines
    new, s = jax.jit(alg.step)(z, grads, state, topo, active)
    y = np.asarray(state.y, np.float64)
    y_new = a.T @ y
    u = -mu * _leaves(grads) * np.asarray(active)[:, None]  # momentum's first step: -mu g
    expected = a.T @ (y[:, None] * _leaves(z) + u) / y_new[:, None]
    np.testing.assert_allclose(_leaves(new), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s.y, y_new, atol=1e-6)
    np.testing.assert_allclose(s.y_prev, y, atol=0)
    self.assertAlmostEqual(float(jnp.sum(s.y)), float(jnp.sum(state.y)), delta=1e-5)
    self.assertEqual(int(s.count), 2)
    chex.assert_trees_all_equal(  # the straggler's optimizer state is untouched
        jax.tree.map(lambda x: x[2], s.opt_state), jax.tree.map(lambda x: x[2], state.opt_state))
    chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
    # statistics are push-summed with the step's weights and the y of before it
    out = jax.jit(alg.combine_stats)(stats, s, topo)
    want = a.T @ (y[:, None] * np.asarray(stats["mean"])) / y_new[:, None]
    np.testing.assert_allclose(out["mean"], want, atol=1e-5, rtol=1e-5)
    metrics = jax.jit(alg.metrics)(new, s, topo)
    self.assertAlmostEqual(float(metrics["push_weight_min"]), y_new.min(), delta=1e-6)
    self.assertAlmostEqual(float(metrics["push_weight_max"]), y_new.max(), delta=1e-6)
    self.assertAlmostEqual(float(metrics["self_weight_mean"]), np.diag(a).mean(), delta=1e-6)
    self.assertIn("drt_mean", metrics)
    self.assertEqual(alg.message_bytes(100), 104)  # the float32 weight y travels along
    self.assertEqual(push_sum(optax.sgd(mu), comm_every=2).message_bytes(100), 52)

  def test_local_steps_between_combines_divide_the_update_by_y(self):
    alg = push_sum(optax.sgd(0.1), comm_every=2)
    topo = _graph()
    z, grads = _tree(9), _tree(10)
    state = alg.init(z, topo)._replace(count=jnp.ones((), jnp.int32), y=jnp.linspace(0.5, 1.5, _K))
    new, s = jax.jit(alg.step)(z, grads, state, topo)  # step 1: no combine
    np.testing.assert_array_equal(s.y, state.y)
    y = np.asarray(state.y)[:, None]
    np.testing.assert_allclose(_leaves(new), _leaves(z) - 0.1 * _leaves(grads) / y, atol=1e-6)
    stats = {"mean": _tree(11)["a"]}
    chex.assert_trees_all_equal(jax.jit(alg.combine_stats)(stats, s, topo), stats)
    with self.assertRaisesRegex(ValueError, "comm_every=0"):
      push_sum(optax.sgd(0.1), comm_every=0)

  def test_weights_whose_rows_do_not_sum_to_one_are_refused_in_one_line(self):
    alg = push_sum(optax.sgd(0.1))
    params = _tree(12)
    column_only = np.array([[0.5, 0.0, 0.3], [0.5, 0.6, 0.0], [0.0, 0.4, 0.7]])
    refused = [(topology.from_matrices(column_only, kind="orientation"), _tree(12, k_count=3)),
               (topology.make("star", 5, weights="uniform"), _tree(12, k_count=5)),
               (_graph(weights="uniform"), params)]
    for topo, p in refused:
      self.assertTrue(topo.column_stochastic)
      self.assertFalse(topo.row_stochastic)
      with self.assertRaises(ValueError) as ctx:
        alg.init(p, topo)
      message = str(ctx.exception)
      self.assertNotIn("\n", message)
      for fragment in ("push_sum needs every sender's weights summing to one", topo.kind,
                       "not row stochastic"):
        self.assertIn(fragment, message)
    for topo in (_graph(), topology.make("ring", _K), _graph("directed_exponential_random")):
      alg.init(params, topo)  # push weights, or doubly stochastic ones
    alg.init(params)  # no topology: nothing to check

  def test_new_weights_and_schedules_do_not_recompile(self):
    alg = push_sum(optax.sgd(0.1))
    step = jax.jit(alg.step)
    params, grads = _tree(13), _tree(14)
    topo = _graph()
    state = alg.init(params, topo)
    p, s = step(params, grads, state, topo)
    compiled = step._cache_size()
    lazy = topo.lazy(0.5)  # rows still sum to one
    p_lazy, _ = step(p, grads, s, lazy)
    p_same, _ = step(p, grads, s, dataclasses.replace(topo, nbr_w=lazy.nbr_w))
    chex.assert_trees_all_close(p_lazy, p_same, atol=1e-6)
    p_old, _ = step(p, grads, s, topo)
    self.assertTrue(any(bool(jnp.any(a != b)) for a, b in  # the new weights were used
                        zip(jax.tree.leaves(p_lazy), jax.tree.leaves(p_old))))
    self.assertEqual(step._cache_size(), compiled)
    schedule = _graph("directed_exponential_random")  # period 3: the state's count picks
    p, s = step(params, grads, alg.init(params, schedule), schedule)
    compiled = step._cache_size()
    for _ in range(2 * schedule.period):
      p, s = step(p, grads, s, schedule)
    self.assertEqual(step._cache_size(), compiled)


if __name__ == "__main__":
  absltest.main()
