"""Tests for drt_jax.algorithms.tracking: gradient tracking, exact diffusion and DRT inside both.

Known answers on float64 least squares with heterogeneous agents (the global minimiser from
numpy's lstsq), the conserved sums each method rests on, reductions to the plain methods and the
local optimizer, and the protocol (refused weights, no recompilation).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from drt_jax import combine, topology
from drt_jax.algorithms import base as algorithms_base
from drt_jax.algorithms import diffusion, tracking

_K, _N, _M = 8, 3, 12
_MU, _STEPS = 0.1, 1500
# DRT settings whose weights stay away from the base weights at the optimum (self-weight
# 1 - rho (1 - c_kk) with the current norms as reference), so that converging is not ATC's luck
_DRT = {"strength": 0.5, "reference": "current", "granularity": "leaf"}

_FACTORIES = {
    "gradient_tracking": tracking.gradient_tracking,
    "gradient_tracking_dsgt": functools.partial(tracking.gradient_tracking, form="dsgt"),
    "exact_diffusion": tracking.exact_diffusion,
    "drt_gradient_tracking": functools.partial(tracking.drt_gradient_tracking, **_DRT),
    "drt_exact_diffusion": functools.partial(tracking.drt_exact_diffusion, **_DRT),
    "atc": diffusion.diffusion_atc,
    "dsgd": diffusion.dsgd,
}
_OURS = ("gradient_tracking", "gradient_tracking_dsgt", "exact_diffusion",
         "drt_gradient_tracking", "drt_exact_diffusion")


@functools.cache
def _problem():
  """Agent k: f_k(w, b) = 1/(2M) ||H_k w + b - y_k||^2, each with its own optimum."""
  rng = np.random.default_rng(0)
  h = rng.standard_normal((_K, _M, _N)) * (1.0 + 0.5 * rng.random((_K, 1, 1)))
  w_k = np.array([1.0, -2.0, 1.5]) + 0.7 * rng.standard_normal((_K, _N))
  b_k = 2.0 + 0.7 * rng.standard_normal(_K)
  y = np.einsum("kmn,kn->km", h, w_k) + b_k[:, None] + 0.1 * rng.standard_normal((_K, _M))
  design = np.concatenate([h, np.ones((_K, _M, 1))], axis=2)  # [K, M, N + 1]
  solution = np.linalg.lstsq(design.reshape(-1, _N + 1), y.reshape(-1), rcond=None)[0]
  local = np.stack([np.linalg.lstsq(design[k], y[k], rcond=None)[0] for k in range(_K)])
  return h, y, solution, local


def _ls_grads(params, h, y):
  p = params["Dense_0"]
  r = jnp.einsum("kmn,kn->km", h, p["kernel"]) + p["bias"][:, None] - y
  return {"Dense_0": {"kernel": jnp.einsum("kmn,km->kn", h, r) / _M, "bias": jnp.mean(r, axis=1)}}


def _ls_start():
  rng = np.random.default_rng(1)  # agents start apart: DRT's weights see real distances
  return {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((_K, _N))),
                      "bias": jnp.asarray(1.0 + rng.standard_normal(_K))}}


def _flat(params):
  p = params["Dense_0"]
  return np.concatenate([np.asarray(p["kernel"]), np.asarray(p["bias"])[:, None]], axis=1)


@functools.cache
def _alg(name, learning_rate=_MU):
  return _FACTORIES[name](optax.sgd(learning_rate))


@functools.cache
def _runner(name, steps):
  """A jitted run of ``steps`` full-batch steps from a given state (x64 must be on)."""
  alg = _alg(name)
  h, y, _, _ = _problem()

  @jax.jit
  def run(params, state, topo):
    def body(carry, _):
      p, s = carry
      return alg.step(p, _ls_grads(p, jnp.asarray(h), jnp.asarray(y)), s, topo), None

    return jax.lax.scan(body, (params, state), None, length=steps)[0]

  return run


@functools.cache
def _solved(name, topo_name):
  """(params, state) after _STEPS steps from _ls_start(), in float64."""
  with jax.enable_x64(True):
    topo = topology.make(topo_name, _K)
    params = _ls_start()
    out = _runner(name, _STEPS)(params, _alg(name).init(params, topo), topo)
    return jax.device_get(out)


class LeastSquaresTest(parameterized.TestCase):

  def test_problem_is_heterogeneous(self):
    _, _, solution, local = _problem()
    self.assertGreater(np.abs(local - solution).max(axis=1).min(), 0.2)

  @parameterized.parameters(
      ("gradient_tracking", "ring"),
      ("gradient_tracking", "random_matching"),  # time-varying: tracking's theory covers it
      ("gradient_tracking_dsgt", "ring"),
      ("exact_diffusion", "ring"),  # static only: Yuan et al. prove it for a fixed matrix
      ("drt_gradient_tracking", "ring"),
      ("drt_gradient_tracking", "random_matching"),
      ("drt_exact_diffusion", "ring"),
  )
  def test_reaches_the_global_minimiser(self, name, topo_name):
    params, state = _solved(name, topo_name)
    x = _flat(params)
    self.assertEqual(x.dtype, np.float64)
    np.testing.assert_allclose(x, np.broadcast_to(_problem()[2], x.shape), atol=1e-6, rtol=0)
    if name.startswith("drt"):  # DRT's weights, not the base weights, did the combining
      base_self = topology.make(topo_name, _K).dense().diagonal().mean()
      for w in state.layer_w.values():
        self.assertGreater(abs(float(np.mean(w[:, 0])) - base_self), 0.1)
    if "exact" in name:
      # Any doubly stochastic matrix keeps the fixed point (drt.py): continue on a time-varying
      # graph with other weights, for two of its periods.
      with jax.enable_x64(True):
        topo = topology.make("random_matching", _K)
        if hasattr(state, "layer_w"):  # the last weights, kept for metrics: the graph's shape
          state = state._replace(layer_w=_alg(name).init(params, topo).layer_w)
        out, _ = _runner(name, 2 * topo.period)(params, state, topo)
      np.testing.assert_allclose(_flat(out), x, atol=1e-10, rtol=0)

  @parameterized.parameters("atc", "dsgd")
  def test_plain_diffusion_misses_it(self, name):
    x = _flat(_solved(name, "ring")[0])
    self.assertGreater(np.abs(x - _problem()[2]).max(), 1e-3)  # measured: 0.35 (atc), 0.60


def _net(k_count=_K, seed=0, consensus=False, dtype=np.float64):
  """Two layers (module granularity) of small leaves."""
  rng = np.random.default_rng(seed)

  def leaf(*shape):
    x = rng.standard_normal((1 if consensus else k_count, *shape))
    return jnp.asarray(np.broadcast_to(x, (k_count, *shape)).astype(dtype))

  return {"BatchNorm_0": {"scale": 1.0 + 0.1 * leaf(3), "bias": leaf(3)},
          "Dense_0": {"kernel": leaf(3, 3), "bias": leaf(3)}}


def _like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _layer_sums(tree):
  return np.stack([np.asarray(x).sum(axis=0).ravel()[:3] for x in jax.tree.leaves(tree)])


def _rows(tree, rows):
  return jax.tree.map(lambda x: np.asarray(x)[rows], tree)


_ALL = np.ones(_K, bool)
_IDLE = {2: np.arange(_K) % 3 == 2, 3: np.arange(_K) % 3 == 0}  # stragglers at steps 2 and 3


@functools.cache
def _graph_alg(name):
  """One algorithm object per name for every float64 test on random_matching, so that they share
  one compiled step: the learning rate lives in the optimizer state (inject_hyperparams), and
  ``active`` is always passed."""
  opt = algorithms_base.local_optimizer("momentum", 0.05, momentum=0.9)
  kw = {"strength": 1.0, "eps": 1e-6, "granularity": "module"}
  if name == "drt_tracking_base":
    return tracking._drt_tracking(opt, tracking.base_layer_weights, **kw)
  if name == "drt_exact_base":
    return tracking._drt_exact(opt, tracking.base_layer_weights, **kw)
  if name.startswith("drt"):
    return getattr(tracking, name)(opt)  # the defaults
  return _FACTORIES[name](opt)


@functools.cache
def _graph_step(name):
  return jax.jit(_graph_alg(name).step)


def _at_rate(state, learning_rate):
  hyper = state.opt_state.hyperparams
  rate = jnp.full_like(hyper["learning_rate"], learning_rate)
  return state._replace(opt_state=state.opt_state._replace(
      hyperparams={**hyper, "learning_rate": rate}))


@functools.cache
def _trajectory(name, steps=6):
  """(params, state) after each of ``steps`` float64 steps on random gradients over
  random_matching (time-varying), with the stragglers of _IDLE."""
  with jax.enable_x64(True):
    topo = topology.make("random_matching", _K)
    params = _net(seed=3)
    state = _graph_alg(name).init(params, topo)
    out = []
    for t in range(steps):
      active = jnp.asarray(~_IDLE.get(t, ~_ALL))
      params, state = _graph_step(name)(params, _like(params, 100 + t), state, topo, active)
      out.append(jax.device_get((params, state)))
    return out


def _check_drt_weights(test, state, steps):
  """The last step's weights were DRT's own, and doubly stochastic."""
  last = topology.make("random_matching", _K).mixing(steps - 1)
  idx, base_w = np.asarray(last.nbr_idx), np.asarray(last.nbr_w)
  for w in state.layer_w.values():
    a = topology.to_dense(idx, np.asarray(w))
    np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    test.assertGreater(np.abs(np.asarray(w) - base_w).max(), 1e-3)


class ConservedSumsTest(parameterized.TestCase):
  """The sums each correction keeps, its reduction to the plain method, and its stragglers."""

  def test_gradient_tracking(self):
    runs = {n: _trajectory(n) for n in ("gradient_tracking", "gradient_tracking_dsgt",
                                        "drt_tracking_base", "drt_gradient_tracking")}
    for (p, s), (q, r) in zip(runs["gradient_tracking_dsgt"], runs["drt_tracking_base"],
                              strict=True):  # DRT forced to the base weights: the DSGT form
      chex.assert_trees_all_close((q, r.v), (p, s.v), atol=1e-13, rtol=0)
    for name, traj in runs.items():
      for t, (_, state) in enumerate(traj):  # sum_k v_i = sum_k g_i, held gradients included
        np.testing.assert_allclose(_layer_sums(state.v), _layer_sums(state.prev_grads),
                                   atol=1e-12, err_msg=name)
        if t in _IDLE:  # no new gradient (g_i = g_{i-1}) and no local step
          old = traj[t - 1][1]
          chex.assert_trees_all_equal(_rows(state.prev_grads, _IDLE[t]),
                                      _rows(old.prev_grads, _IDLE[t]))
          chex.assert_trees_all_equal(_rows(state.opt_state, _IDLE[t]),
                                      _rows(old.opt_state, _IDLE[t]))
    _check_drt_weights(self, runs["drt_gradient_tracking"][-1][1], 6)

  def test_exact_diffusion(self):
    runs = {n: _trajectory(n) for n in ("exact_diffusion", "drt_exact_base",
                                        "drt_exact_diffusion")}
    for (p, s), (q, r) in zip(runs["exact_diffusion"], runs["drt_exact_base"], strict=True):
      chex.assert_trees_all_close((q, r.psi), (p, s.psi), atol=1e-13, rtol=0)
    for name, traj in runs.items():
      for t, (params, state) in enumerate(traj):  # sum_k x_i = sum_k psi_i
        np.testing.assert_allclose(_layer_sums(params), _layer_sums(state.psi), atol=1e-12,
                                   err_msg=name)
        if t in _IDLE:  # psi = x: the straggler's adapt step is skipped
          chex.assert_trees_all_equal(_rows(state.psi, _IDLE[t]),
                                      _rows(traj[t - 1][0], _IDLE[t]))
    _check_drt_weights(self, runs["drt_exact_diffusion"][-1][1], 6)


class ProtocolTest(parameterized.TestCase):

  @parameterized.parameters(*_OURS)
  def test_one_agent_reduces_to_the_optimizer(self, name):
    opt = optax.adam(0.1)  # a stateful optimizer: its state must see the same inputs
    alg = _FACTORIES[name](opt)
    params = _net(k_count=1, seed=7, dtype=np.float32)
    topo = topology.make("ring", 1)
    state = alg.init(params, topo)
    step = jax.jit(alg.step)  # one compile instead of an op-by-op run of DRT's weights
    ref = jax.tree.map(lambda x: x[0], params)
    ref_state = opt.init(ref)
    for t in range(3):
      grads = _like(params, 20 + t)
      params, state = step(params, grads, state, topo)
      updates, ref_state = opt.update(jax.tree.map(lambda g: g[0], grads), ref_state, ref)
      ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], params), ref, atol=1e-6, rtol=1e-6)

  @parameterized.parameters(*_OURS)
  def test_consensus_is_a_fixed_point_at_zero_learning_rate(self, name):
    with jax.enable_x64(True):
      topo = topology.make("random_matching", _K)
      params = _net(seed=8, consensus=True)
      state = _at_rate(_graph_alg(name).init(params, topo), 0.0)
      out = params
      for t in range(3):  # nonzero gradients move the trackers, never the parameters
        out, state = _graph_step(name)(out, _like(params, 30 + t), state, topo, _ALL)
      chex.assert_trees_all_close(out, params, atol=1e-14, rtol=0)

  @parameterized.parameters(*_OURS)
  def test_new_weights_and_schedules_do_not_recompile(self, name):
    # jax.jit wrappers of one function share their cache: count entries after the first call
    step = _graph_step(name)
    with jax.enable_x64(True):
      topo = topology.make("random_matching", _K)  # time-varying: the step index is traced
      lazy = topo.lazy(0.5)
      params = _net(seed=9)
      grads = _like(params, 10)
      state = _graph_alg(name).init(params, topo)
      p, s = step(params, grads, state, topo, _ALL)
      compiled = step._cache_size()
      for _ in range(topo.period + 1):
        p, s = step(p, grads, s, topo, _ALL)
      p_new, _ = step(params, grads, state, dataclasses.replace(topo, nbr_w=lazy.nbr_w), _ALL)
      p_lazy, _ = step(params, grads, state, lazy, _ALL)
      self.assertEqual(step._cache_size(), compiled)
      chex.assert_trees_all_close(p_lazy, p_new)
      p_old, _ = step(params, grads, state, topo, _ALL)  # the new weights were used
      self.assertGreater(max(float(jnp.abs(a - b).max()) for a, b in
                             zip(jax.tree.leaves(p_new), jax.tree.leaves(p_old))), 1e-4)

  @parameterized.parameters(
      ("gradient_tracking", "star", {"weights": "uniform"}, "doubly stochastic"),
      ("gradient_tracking", "exponential", {"weights": "uniform"}, None),  # circulant: doubly
      ("exact_diffusion", "exponential", {}, "symmetric"),
      ("exact_diffusion", "star", {"weights": "uniform"}, "symmetric"),
      ("drt_gradient_tracking", "exponential", {}, "symmetric"),
      ("drt_exact_diffusion", "exponential", {}, "symmetric"),
      ("drt_exact_diffusion", "random_matching", {}, None),
  )
  def test_weights_are_checked_at_init(self, name, kind, kw, refused):
    alg = _FACTORIES[name](optax.sgd(0.1))
    topo = topology.make(kind, _K, **kw)
    params = _net(dtype=np.float32)
    if refused is None:
      alg.init(params, topo)
      return
    with self.assertRaisesRegex(ValueError, f"^{name} needs {refused}") as c:
      alg.init(params, topo)
    self.assertNotIn("\n", str(c.exception))
    self.assertIn(kind, str(c.exception))

  def test_options_are_checked(self):
    with self.assertRaisesRegex(ValueError, "form='cta'.*atc, dsgt"):
      tracking.gradient_tracking(optax.sgd(0.1), form="cta")
    for factory in (tracking.drt_gradient_tracking, tracking.drt_exact_diffusion):
      with self.assertRaisesRegex(ValueError, "floor=1.0"):
        factory(optax.sgd(0.1), floor=1.0)
      with self.assertRaisesRegex(ValueError, "reference 'last'"):
        factory(optax.sgd(0.1), reference="last")

  @parameterized.parameters(*_OURS)
  def test_statistics_metrics_and_message_bytes(self, name):
    alg, step = _graph_alg(name), _graph_step(name)
    with jax.enable_x64(True):
      topo = topology.make("random_matching", _K)
      params = _net(seed=11)
      stats = {"BatchNorm_0": {"mean": _like(params, 12)["BatchNorm_0"]["bias"]}}
      _, state = step(params, _like(params, 13), alg.init(params, topo), topo, _ALL)
      out = alg.combine_stats(stats, state, topo)
      m = topo.mixing(0)  # the step that just ran
      if name.startswith("drt"):  # the BatchNorm layer's own weights
        bn_w = state.layer_w["BatchNorm_0"]
        self.assertGreater(float(jnp.abs(bn_w - m.nbr_w).max()), 1e-3)
        expected = combine.combine(stats, m._replace(nbr_w=bn_w))
      else:
        expected = combine.combine(stats, m)
      chex.assert_trees_all_close(out, expected, atol=1e-14)
      keys = set(jax.eval_shape(alg.metrics, params, state, topo))  # traced, not compiled
    self.assertContainsSubset({"self_weight_mean", "drt_log1p_mean", "drt_mean"}, keys)
    if name.startswith("drt"):
      self.assertContainsSubset({"self_weight/BatchNorm_0", "self_weight/Dense_0"}, keys)
    self.assertEqual(alg.message_bytes(10), 10.0 if "exact" in name else 20.0)


if __name__ == "__main__":
  absltest.main()
