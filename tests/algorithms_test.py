"""Tests for drt_jax.algorithms: a shared battery over every algorithm, plus closed forms."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from drt_jax import algorithms, combine, topology
from drt_jax.types import Mixing

_K = 8
_NAMES = [(name, name) for name in algorithms.NAMES]
_DRT = tuple(n for n in algorithms.NAMES if algorithms.uses_drt(n))


def _params(k_count=_K, seed=0, consensus=False, scale_dtype=jnp.float32):
  """A stacked network with a BatchNorm layer and a dense layer (equal leaf shapes: cheap)."""
  rng = np.random.default_rng(seed)

  def leaf(*shape):
    x = rng.standard_normal((1 if consensus else k_count, *shape)).astype(np.float32)
    return jnp.asarray(np.broadcast_to(x, (k_count, *shape)))

  return {"BatchNorm_0": {"scale": leaf(3).astype(scale_dtype), "bias": leaf(3)},
          "Dense_0": {"kernel": leaf(3, 3), "bias": leaf(3)}}


def _grads_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _changed(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return any(bool(jnp.any(x != y)) for x, y in pairs)


_COMM_EVERY = tuple(n for n in algorithms.NAMES if "comm_every" in algorithms.options(n))
# What each algorithm needs of the weights (drt_jax.algorithms.base.require_weights); the rest
# need every agent's weights to sum to one.
_NEEDS = {"gradient_tracking": "doubly", "choco": "doubly", "push_sum": "rows",
          "exact_diffusion": "symmetric", "drt_gradient_tracking": "symmetric",
          "drt_exact_diffusion": "symmetric"}


@functools.cache
def _alg(name, comm_every=1):
  # one Algorithm object per configuration, so that jax.jit(alg.step) compiles once per file
  kw = {"comm_every": comm_every} if name in _COMM_EVERY else {}
  return algorithms.make(name, optax.sgd(0.05, momentum=0.9), **kw)


def _graph(name):
  """The least regular static graph ``name`` accepts (directed where it may be)."""
  need = _NEEDS.get(name, "columns")
  if need == "columns":
    return _directed()
  if need == "rows":
    return topology.make("directed_erdos_renyi", _K, weights="push", seed=1)
  if need == "doubly":
    return topology.make("exponential", _K)  # directed, regular: doubly stochastic
  return topology.make("erdos_renyi", _K, seed=1)  # irregular, metropolis: symmetric


@functools.cache
def _schedule(name):
  """A time-varying graph ``name`` accepts."""
  if _NEEDS.get(name) == "symmetric":
    return topology.make("random_matching", _K, period=3)
  return _one_peer()


def _directed():
  """k listens to k - 1 and k - 2 with unequal weights (a directed graph)."""
  a = 0.5 * np.eye(_K) + 0.3 * np.roll(np.eye(_K), 1, axis=1) + 0.2 * np.roll(np.eye(_K), 2, axis=1)
  topo = topology.from_matrices(a)
  assert topo.directed and topo.max_degree == 2
  return topo


@functools.cache
def _one_peer():
  return topology.make("one_peer_exponential", _K)  # period 3, one peer per step


class BatteryTest(chex.TestCase):
  """Runs over every name in algorithms.NAMES."""

  @parameterized.named_parameters(*_NAMES)
  def test_init_and_step_keep_shapes_and_dtypes(self, name):
    alg = _alg(name)
    params = _params(scale_dtype=jnp.bfloat16)
    ring = topology.make("ring", _K)
    state = alg.init(params, ring)
    self.assertEqual(int(state.count), 0)
    new_params, new_state = alg.step(params, _grads_like(params, 1), state, ring)
    chex.assert_trees_all_equal_structs(new_params, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)  # jit/donation friendly
    self.assertEqual(int(new_state.count), 1)
    self.assertTrue(_changed(new_params, params))
    if algorithms.uses_drt(name):
      self.assertEqual(set(state.layer_w), {"BatchNorm_0", "Dense_0"})
      chex.assert_shape(list(new_state.layer_w.values()), (_K, 3))
      for w in new_state.layer_w.values():
        np.testing.assert_allclose(jnp.sum(w, axis=1), 1.0, atol=1e-6)  # columns sum to one

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_NAMES)
  def test_jit_and_no_jit_agree(self, name):
    alg = _alg(name)
    topo = topology.make("ring", _K)
    params = _params(seed=2)
    state = alg.init(params, topo)
    eager_params, eager_state = params, state
    step = self.variant(alg.step)
    for t in range(4):
      grads = _grads_like(params, 10 + t)
      params, state = step(params, grads, state, topo)
      eager_params, eager_state = alg.step(eager_params, grads, eager_state, topo)
    chex.assert_trees_all_close(params, eager_params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(state, eager_state, atol=1e-6, rtol=1e-6)

  @parameterized.product(name=algorithms.NAMES, momentum=(None, 0.9))
  def test_one_agent_reduces_to_the_optimizer(self, name, momentum):
    opt = optax.sgd(0.1, momentum=momentum)
    alg = algorithms.make(name, opt)
    params = _params(k_count=1, seed=3)
    topo = topology.make("ring", 1)
    state = alg.init(params, topo)
    ref = jax.tree.map(lambda x: x[0], params)
    ref_state = opt.init(ref)
    for t in range(3):
      grads = _grads_like(params, 20 + t)
      if alg.grad_point is not None:
        chex.assert_trees_all_close(alg.grad_point(params, state, topo), params, atol=1e-7)
      params, state = alg.step(params, grads, state, topo)
      updates, ref_state = opt.update(jax.tree.map(lambda g: g[0], grads), ref_state, ref)
      ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], params), ref, atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(*_NAMES)
  def test_consensus_with_zero_grads_is_fixed_point(self, name):
    alg = _alg(name)
    params = _params(seed=4, consensus=True)
    topo = _graph(name)
    state = alg.init(params, topo)
    out = params
    for _ in range(3):
      out, state = alg.step(out, _zeros_like(params), state, topo)
    chex.assert_trees_all_close(out, params, atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(*_NAMES)
  def test_new_weights_and_schedules_do_not_recompile(self, name):
    # jax.jit wrappers of one function share their compile cache, and other tests jit the same
    # alg.step: so count the cache entries after the first call and check that no call adds one.
    alg = _alg(name)
    # a shared start, so that agents differ by their gradients only: DRT weights stay below the
    # floor's saturation, where the base weights' scale still matters
    params = _params(seed=5, consensus=True)
    grads = _grads_like(params, 6)

    # a time-varying schedule: the step index comes from the state, the matrices are arguments
    topo = _schedule(name)
    state = alg.init(params, topo)
    step = jax.jit(alg.step)
    p, state = step(params, grads, state, topo)
    compiled = step._cache_size()
    self.assertGreaterEqual(compiled, 1)
    for _ in range(2 * topo.period):
      p, state = step(p, grads, state, topo)
    self.assertEqual(step._cache_size(), compiled)

    ring = topology.make("ring", _K)
    lazy = ring.lazy(0.5)
    state = alg.init(params, ring)
    p, s = step(params, grads, state, ring)
    compiled = step._cache_size()
    p, s = step(p, grads, s, topology.make("ring", _K))  # a new object, same weights
    new_w = dataclasses.replace(ring, nbr_w=lazy.nbr_w)  # new weights, same kind
    p_new, _ = step(p, grads, s, new_w)
    self.assertEqual(step._cache_size(), compiled)
    if name != "local":
      self.assertTrue(_changed(p_new, step(p, grads, s, ring)[0]))  # the new weights were used
    p_lazy, _ = step(p, grads, s, lazy)
    chex.assert_trees_all_close(p_lazy, p_new, atol=1e-6)
    # lazy() renames the kind to 'ring_lazy', which must not be static pytree data
    self.assertEqual(step._cache_size(), compiled,
                     "make('ring', 8).lazy(0.5) recompiled the step")

  @parameterized.parameters(*_COMM_EVERY)
  def test_comm_every_combines_on_multiples_only(self, name):
    alg = _alg(name, comm_every=3)
    params = _params(seed=7)
    topo = topology.make("ring", _K)
    state = alg.init(params, topo)
    step, combine_stats = jax.jit(alg.step), jax.jit(alg.combine_stats)
    stats = {"BatchNorm_0": {"mean": _params(seed=13)["BatchNorm_0"]["bias"]}}
    changed, stats_changed = [], []
    for _ in range(7):
      new, state = step(params, _zeros_like(params), state, topo)  # zero grads: only combining
      changed.append(_changed(new, params))
      stats_changed.append(_changed(combine_stats(stats, state, topo), stats))
      params = new
    expected = [False] * 7 if name == "local" else [t % 3 == 0 for t in range(7)]
    self.assertEqual(changed, expected)
    self.assertEqual(stats_changed, expected)  # statistics are mixed with the parameters
    self.assertEqual(int(state.count), 7)

  @parameterized.named_parameters(*_NAMES)
  def test_combine_stats(self, name):
    alg = _alg(name)
    params = _params(seed=8)  # independent agents: DRT's weights differ from the base weights
    stats = {"BatchNorm_0": {"mean": _params(seed=9)["BatchNorm_0"]["bias"],
                             "var": _params(seed=10)["BatchNorm_0"]["scale"] ** 2}}
    topo = topology.make("ring", _K)
    state = alg.init(params, topo)
    _, state = alg.step(params, _grads_like(params, 11), state, topo)
    out = alg.combine_stats(stats, state, topo)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, stats)
    if name == "local":
      chex.assert_trees_all_equal(out, stats)
    elif algorithms.uses_drt(name):
      bn_w = state.layer_w["BatchNorm_0"]
      expected = combine.combine(stats, Mixing(topo.mixing().nbr_idx, bn_w))
      chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=1e-6)
      self.assertGreater(float(jnp.max(jnp.abs(bn_w - state.layer_w["Dense_0"]))), 1e-4)
      self.assertGreater(float(jnp.max(jnp.abs(bn_w - topo.mixing().nbr_w))), 1e-4)
    elif name in ("atc", "cta", "dsgd"):
      chex.assert_trees_all_close(out, combine.combine(stats, topo), atol=1e-6, rtol=1e-6)
    else:  # the ring's weights are doubly stochastic: the statistics' average is kept
      chex.assert_trees_all_close(jax.tree.map(lambda x: jnp.mean(x, axis=0), out),
                                  jax.tree.map(lambda x: jnp.mean(x, axis=0), stats), atol=1e-5)
    if name != "local":
      self.assertTrue(_changed(out, stats))

  def test_drt_combine_stats_with_flax_collections(self):
    # The trainer passes the model state as flax returns it, {'batch_stats': {layer: ...}},
    # next to params {layer: ...}; the statistics must still use their BatchNorm layer's weights.
    alg = _alg("drt")
    params = _params(seed=8)
    stats = {"BatchNorm_0": {"mean": _params(seed=9)["BatchNorm_0"]["bias"],
                             "var": _params(seed=10)["BatchNorm_0"]["scale"] ** 2}}
    topo = topology.make("ring", _K)
    state = alg.init(params, topo)
    _, state = alg.step(params, _grads_like(params, 11), state, topo)
    expected = alg.combine_stats(stats, state, topo)
    self.assertTrue(_changed(expected, stats))
    out = alg.combine_stats({"batch_stats": stats}, state, topo)
    # Known bug: the names 'batch_stats/BatchNorm_0' never match the layer 'BatchNorm_0', so the
    # statistics silently fall back to the identity (no combining) under the trainer.
    self.assertTrue(_changed(out["batch_stats"], stats),
                    "combine_stats left {'batch_stats': ...} uncombined")
    chex.assert_trees_all_close(out["batch_stats"], expected, atol=1e-6)


class LeastSquaresTest(parameterized.TestCase):
  """Full-batch distributed least squares: each recursion converges to its closed form."""

  K, N, M, MU, STEPS = 6, 3, 10, 0.2, 400

  def _problem(self):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((self.K, self.M, self.N))
    w_true = rng.standard_normal((self.K, self.N)) * 2.0  # heterogeneous agents
    y = np.einsum("kmn,kn->km", h, w_true) + 0.1 * rng.standard_normal((self.K, self.M))
    r_mat = np.einsum("kmi,kmj->kij", h, h) / self.M  # grad J_k(w) = R_k w - r_k
    r_vec = np.einsum("kmi,km->ki", h, y) / self.M
    return r_mat, r_vec

  def _closed_form(self, name, a, r_mat, r_vec):
    n = self.N
    big_a = np.kron(a.T, np.eye(n))  # w_k <- sum_l a_lk w_l on the stacked vector
    big_r = np.zeros((self.K * n, self.K * n))
    for k in range(self.K):
      big_r[k * n:(k + 1) * n, k * n:(k + 1) * n] = r_mat[k]
    eye, r = np.eye(self.K * n), r_vec.reshape(-1)
    # each recursion is affine, w <- T w + b; its fixed point solves (I - T) w = b
    if name == "atc":  # w <- A (w - mu (R w - r))
      t, b = big_a @ (eye - self.MU * big_r), self.MU * big_a @ r
    elif name == "dsgd":  # w <- A w - mu (R w - r)
      t, b = big_a - self.MU * big_r, self.MU * r
    else:  # cta: w <- (I - mu R) A w + mu r
      t, b = (eye - self.MU * big_r) @ big_a, self.MU * r
    rate = np.max(np.abs(np.linalg.eigvals(t)))
    return np.linalg.solve(eye - t, b).reshape(self.K, n), rate

  @parameterized.parameters("atc", "dsgd", "cta")
  def test_converges_to_closed_form_fixed_point(self, name):
    r_mat, r_vec = self._problem()
    topo = topology.make("ring", self.K)
    a = topo.dense()  # the float32 weights the step applies, exactly
    expected, rate = self._closed_form(name, a, r_mat, r_vec)
    self.assertLess(rate ** self.STEPS, 1e-10)  # the run below is long enough
    with jax.enable_x64(True):
      alg = algorithms.make(name, optax.sgd(self.MU))
      r_mat_j, r_vec_j = jnp.asarray(r_mat), jnp.asarray(r_vec)

      def grad(w):
        return {"w": jnp.einsum("kij,kj->ki", r_mat_j, w["w"]) - r_vec_j}

      @jax.jit
      def run(params, topo):
        def body(_, carry):
          params, state = carry
          point = params if alg.grad_point is None else alg.grad_point(params, state, topo)
          return alg.step(params, grad(point), state, topo)
        return jax.lax.fori_loop(0, self.STEPS, body, (params, alg.init(params, topo)))[0]

      params = {"w": jnp.zeros((self.K, self.N), jnp.float64)}
      out = np.asarray(run(params, topo)["w"])
    self.assertEqual(out.dtype, np.float64)
    self.assertEqual(jnp.zeros(1).dtype, jnp.float32)  # x64 is off again
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    # the fixed points really differ between recursions and from consensus
    others = [self._closed_form(n, a, r_mat, r_vec)[0] for n in ("atc", "dsgd", "cta") if n != name]
    for other in others:
      self.assertGreater(np.abs(other - expected).max(), 1e-3)
    self.assertGreater(np.abs(out - out.mean(axis=0)).max(), 1e-2)


class MakeTest(parameterized.TestCase):

  def test_unknown_name_lists_names(self):
    with self.assertRaises(ValueError) as ctx:
      algorithms.make("gossip", optax.sgd(0.1))
    for name in algorithms.NAMES:
      self.assertIn(name, str(ctx.exception))

  def test_unknown_options_and_a_non_optimizer_are_named(self):
    with self.assertRaisesRegex(ValueError, "algorithm 'atc' takes no option 'strength'; its "
                                "options: comm_every"):
      algorithms.make("atc", optax.sgd(0.1), strength=1.0)
    with self.assertRaisesRegex(ValueError, "'drt' takes no option 'rho'; its options: strength"):
      algorithms.make("drt", optax.sgd(0.1), rho=1.0)
    with self.assertRaisesRegex(ValueError, "not an optax GradientTransformation"):
      algorithms.make("atc", "sgd")

  @parameterized.parameters(*_COMM_EVERY)
  def test_comm_every_must_be_positive(self, name):
    for bad in (0, -1):
      with self.assertRaisesRegex(ValueError, "comm_every"):
        algorithms.make(name, optax.sgd(0.1), comm_every=bad)

  @parameterized.parameters(*_DRT)
  def test_drt_options_are_checked(self, name):
    with self.assertRaisesRegex(ValueError, "floor"):
      algorithms.make(name, optax.sgd(0.1), floor=1.0)
    with self.assertRaisesRegex(ValueError, "granularity"):
      algorithms.make(name, optax.sgd(0.1), granularity="block")

  def test_weights_are_checked_on_device_topologies_inside_jit(self):
    # The benchmarks and notebooks put the topology on the device before init_state jits init;
    # the check then reads host copies instead of staging numpy calls on traced indexing.
    params = _params()
    alg = algorithms.make("exact_diffusion", optax.sgd(0.1))
    ring = jax.device_put(topology.make("ring", _K))
    self.assertEqual(int(jax.jit(lambda: alg.init(params, ring))().count), 0)
    directed = jax.device_put(topology.make("exponential", _K))
    with self.assertRaisesRegex(ValueError, "exact_diffusion needs symmetric"):
      jax.jit(lambda: alg.init(params, directed))()

  def test_only_cta_moves_the_gradient_point(self):
    for name in algorithms.NAMES:
      self.assertEqual(algorithms.make(name, optax.sgd(0.1)).grad_point is not None, name == "cta")
    alg = algorithms.make("cta", optax.sgd(0.1))
    params = _params(seed=12)
    topo = topology.make("ring", _K)
    chex.assert_trees_all_close(alg.grad_point(params, alg.init(params), topo),
                                combine.combine(params, topo))


if __name__ == "__main__":
  absltest.main()
