"""The study's controls: parameter-weighted self-weight metrics, ATC with per-layer static
self-weights (the matched control) and DRT's ablations (``layerwise=False``, ``freeze_after``)."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data

from drt_jax import algorithms, backends, build, combine, config, drt, topology, train
from drt_jax.algorithms import diffusion
from experiments import sweep

_K = 8
_FLOOR = 0.05
# Unequal layer sizes, so that the parameter-weighted mean differs from the plain one.
_SIZES = {"BatchNorm_0": 6, "Dense_0": 3 * 5 + 5}


def _params(seed=0, shared=True):
  """A BatchNorm layer (6 scalars) and a dense layer (20): a shared start plus a little noise."""
  rng = np.random.default_rng(seed)

  def leaf(*shape):
    base = rng.standard_normal((1 if shared else _K, *shape))
    return jnp.asarray(base + 0.05 * rng.standard_normal((_K, *shape)), jnp.float32)

  return {"BatchNorm_0": {"scale": leaf(3), "bias": leaf(3)},
          "Dense_0": {"kernel": leaf(3, 5), "bias": leaf(5)}}


def _grads(params, t):
  # agent-dependent gradients: the agents drift apart, DRT's weights change from step to step
  shift = jnp.arange(_K, dtype=jnp.float32)
  return jax.tree.map(
      lambda x: 0.3 * jnp.sin(3.0 * x + t + shift.reshape((_K,) + (1,) * (x.ndim - 1))), params)


def _changed(a, b) -> bool:
  return any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.cache
def _alg(name, **kw):
  """One Algorithm per configuration (``self_weights`` given as pairs, to be hashable)."""
  kw = {k: dict(v) if k == "self_weights" else v for k, v in kw.items()}
  return algorithms.make(name, optax.sgd(0.1), **kw)


def _static_dense(c: np.ndarray, s: float) -> np.ndarray:
  """The dense reference of static_weights: A[k, k] = s, A[l, k] = c_lk (1 - s) / (1 - c_kk)."""
  a = c.astype(np.float64).copy()
  for k in range(c.shape[0]):
    if c[k, k] < 1.0:
      a[:, k] *= (1.0 - s) / (1.0 - c[k, k])
      a[k, k] = s
  return a


class SelfWeightMetricsTest(absltest.TestCase):

  def test_parameter_weighted_and_plain_means(self):
    layer_w = {"a": jnp.array([[0.2, 0.8], [0.4, 0.6]]), "b": jnp.array([[0.9, 0.1], [0.7, 0.3]])}
    out = drt.self_weight_metrics(layer_w, {"a": 1, "b": 99})
    self.assertAlmostEqual(float(out["self_weight/a"]), 0.3, places=6)
    self.assertAlmostEqual(float(out["self_weight/b"]), 0.8, places=6)
    self.assertAlmostEqual(float(out["self_weight_mean"]), (0.3 + 99 * 0.8) / 100, places=6)
    self.assertAlmostEqual(float(out["self_weight_layer_mean"]), 0.55, places=6)

  def test_drt_algorithms_report_both_means(self):
    params = _params(seed=1)
    ring = topology.make("ring", _K)
    self.assertEqual(combine.layer_sizes(params, combine.layer_names(params)), _SIZES)
    for name in ("drt", "drt_gradient_tracking", "drt_exact_diffusion"):
      alg = _alg(name)
      state = alg.init(params, ring)
      p, state = alg.step(params, _grads(params, 0), state, ring)
      m = alg.metrics(p, state, ring)
      per_layer = {q: float(jnp.mean(w[:, 0])) for q, w in state.layer_w.items()}
      self.assertGreater(abs(per_layer["BatchNorm_0"] - per_layer["Dense_0"]), 1e-5, name)
      for q, v in per_layer.items():
        self.assertAlmostEqual(float(m[f"self_weight/{q}"]), v, places=6)
      weighted = sum(_SIZES[q] * v for q, v in per_layer.items()) / sum(_SIZES.values())
      self.assertAlmostEqual(float(m["self_weight_mean"]), weighted, places=6, msg=name)
      self.assertAlmostEqual(float(m["self_weight_layer_mean"]), np.mean(list(per_layer.values())),
                             places=6, msg=name)

  def test_plain_diffusion_keeps_its_mean_self_weight(self):
    ring = topology.make("ring", _K).with_self_weight(0.4)
    params = _params()
    for name in ("atc", "cta", "dsgd"):
      alg = _alg(name)
      state = alg.init(params, ring)
      _, state = alg.step(params, _grads(params, 0), state, ring)
      m = alg.metrics(params, state, ring)
      self.assertAlmostEqual(float(m["self_weight_mean"]), 0.4, places=6)
      self.assertNotIn("self_weight_layer_mean", m)


class StaticWeightsTest(parameterized.TestCase):

  @parameterized.parameters(0.2, 0.5, 1.0)
  def test_matches_the_dense_rule_with_unit_columns(self, s):
    # k listens to k - 1 and k - 2 with unequal weights; agent 3 has no neighbour at all
    a = 0.5 * np.eye(_K) + 0.3 * np.roll(np.eye(_K), 1, axis=1) + 0.2 * np.roll(np.eye(_K), 2, 1)
    a[:, 3] = 0.0
    a[3, 3] = 1.0
    topo = topology.from_matrices(a, check_connectivity=False)
    m = topo.mixing()
    w = diffusion.static_weights(m, s)
    got = topology.to_dense(np.asarray(m.nbr_idx), np.asarray(w, np.float64))
    np.testing.assert_allclose(got, _static_dense(topo.dense(), s), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=0), 1.0, atol=1e-6)
    self.assertEqual(float(w[3, 0]), 1.0)  # no neighbour: keeps itself
    self.assertTrue(np.all(got >= 0.0))

  def test_base_self_weight_gives_plain_atc(self):
    # On the ring every Metropolis self-weight is 1/3: s_p = 1/3 everywhere is ATC itself.
    ring = topology.make("ring", _K)
    params = _params(seed=2)
    plain, matched = _alg("atc"), _alg("atc", self_weights=(("BatchNorm_0", 1 / 3),
                                                            ("Dense_0", 1 / 3)))
    grads = _grads(params, 1)
    want, _ = plain.step(params, grads, plain.init(params, ring), ring)
    got, _ = matched.step(params, grads, matched.init(params, ring), ring)
    chex.assert_trees_all_close(got, want, atol=1e-6)


class MatchedATCTest(parameterized.TestCase):

  SW = (("BatchNorm_0", 0.7), ("Dense_0", 0.25))

  def _layer_reference(self, tree, c, step):
    """Each layer of ``tree`` combined with its static matrix (numpy, float64)."""
    sw = dict(self.SW)
    out = {}
    for layer, leaves in tree.items():
      a = _static_dense(c(step), sw[layer])
      out[layer] = {n: np.einsum("lk,l...->k...", a, np.asarray(x, np.float64))
                    for n, x in leaves.items()}
    return out

  @parameterized.parameters("ring", "one_peer_exponential")
  def test_atc_combines_each_layer_with_its_own_matrix(self, kind):
    topo = topology.make(kind, _K)  # one_peer_exponential: a new graph every step
    alg = _alg("atc", self_weights=self.SW)
    params = _params(seed=3)
    state = alg.init(params, topo)
    step = jax.jit(alg.step)
    for t in range(4):
      grads = _grads(params, t)
      psi = jax.tree.map(lambda x, g: x - 0.1 * g, params, grads)
      want = self._layer_reference(psi, topo.dense, t)
      params, state = step(params, grads, state, topo)
      chex.assert_trees_all_close(params, want, atol=2e-5)
    m = alg.metrics(params, state, topo)
    self.assertAlmostEqual(float(m["self_weight/BatchNorm_0"]), 0.7, places=6)
    self.assertAlmostEqual(float(m["self_weight/Dense_0"]), 0.25, places=6)
    self.assertAlmostEqual(float(m["self_weight_mean"]), (6 * 0.7 + 20 * 0.25) / 26, places=6)
    self.assertAlmostEqual(float(m["self_weight_layer_mean"]), (0.7 + 0.25) / 2, places=6)

  def test_cta_and_dsgd_take_them_too(self):
    ring = topology.make("ring", _K)
    params = _params(seed=4)
    grads = _grads(params, 0)
    mixed = self._layer_reference(params, ring.dense, 0)
    cta = _alg("cta", self_weights=self.SW)
    state = cta.init(params, ring)
    chex.assert_trees_all_close(cta.grad_point(params, state, ring), mixed, atol=1e-5)
    dsgd = _alg("dsgd", self_weights=self.SW)
    got, _ = dsgd.step(params, grads, dsgd.init(params, ring), ring)
    want = jax.tree.map(lambda w, g: w - 0.1 * g, mixed, grads)
    chex.assert_trees_all_close(got, want, atol=1e-5)

  def test_combine_stats_use_their_layer_else_the_base_weights(self):
    ring = topology.make("ring", _K)
    alg = _alg("atc", self_weights=self.SW)
    params = _params(seed=5)
    state = alg.init(params, ring)
    _, state = alg.step(params, _grads(params, 0), state, ring)
    rng = np.random.default_rng(6)
    stats = {"batch_stats": {"BatchNorm_0": {"mean": jnp.asarray(rng.standard_normal((_K, 3)),
                                                                 jnp.float32)},
                             "Other_0": {"mean": jnp.asarray(rng.standard_normal((_K, 3)),
                                                             jnp.float32)}}}
    out = alg.combine_stats(stats, state, ring)
    bn = np.asarray(stats["batch_stats"]["BatchNorm_0"]["mean"], np.float64)
    other = np.asarray(stats["batch_stats"]["Other_0"]["mean"], np.float64)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"],
                               _static_dense(ring.dense(), 0.7).T @ bn, atol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["Other_0"]["mean"], ring.dense().T @ other,
                               atol=1e-5)

  def test_comm_every_and_shapes(self):
    ring = topology.make("ring", _K)
    alg = algorithms.make("atc", optax.sgd(0.1), comm_every=2, self_weights=dict(self.SW))
    params = _params(seed=7)
    state = alg.init(params, ring)
    step = jax.jit(alg.step)
    zeros = jax.tree.map(jnp.zeros_like, params)
    changed = []
    for _ in range(4):
      new, state = step(params, zeros, state, ring)
      chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
      changed.append(_changed(new, params))
      params = new
    self.assertEqual(changed, [True, False, True, False])

  def test_refusals_are_one_line(self):
    params = _params()
    ring = topology.make("ring", _K)
    cases = [
        ({"BatchNorm_0": 0.5}, "atc self_weights has no self-weight for layer 'Dense_0'; give one "
         "for every layer of the model: BatchNorm_0, Dense_0"),
        ({"BatchNorm_0": 0.5, "Dense_0": 0.5, "Conv_0": 0.5}, "atc self_weights names 'Conv_0', "
         "not a layer of the model; its layers are: BatchNorm_0, Dense_0"),
    ]
    for sw, message in cases:
      with self.assertRaises(ValueError) as ctx:
        algorithms.make("atc", optax.sgd(0.1), self_weights=sw).init(params, ring)
      self.assertEqual(str(ctx.exception), message)
    for bad, fragment in (({"Dense_0": 0.0}, r"self-weight in \(0, 1\]"),
                          ({"Dense_0": 1.5}, r"self-weight in \(0, 1\]"),
                          ({"Dense_0": True}, r"self-weight in \(0, 1\]"),
                          ({"Dense_0": float("nan")}, r"self-weight in \(0, 1\]"),
                          ({}, "not a mapping"), (0.5, "not a mapping")):
      with self.assertRaisesRegex(ValueError, fragment):
        algorithms.make("dsgd", optax.sgd(0.1), self_weights=bad)
    with self.assertRaisesRegex(ValueError, "^cta self_weights works with aggregation='mean' only, "
                                "not 'median': drop one of the two options$"):
      algorithms.make("cta", optax.sgd(0.1), self_weights={"Dense_0": 0.5}, aggregation="median")
    self.assertNotIn("self_weights", algorithms.options("local"))


class LayerwiseTest(absltest.TestCase):

  def test_one_matrix_for_the_whole_model(self):
    ring = topology.make("ring", _K)
    params = _params(seed=8)
    per_layer, shared = _alg("drt"), _alg("drt", layerwise=False)
    grads = _grads(params, 0)
    _, s_layer = per_layer.step(params, grads, per_layer.init(params, ring), ring)
    new, s_shared = shared.step(params, grads, shared.init(params, ring), ring)
    w = s_shared.layer_w
    chex.assert_trees_all_equal(w["BatchNorm_0"], w["Dense_0"])
    np.testing.assert_allclose(jnp.sum(w["Dense_0"], axis=1), 1.0, atol=1e-6)
    self.assertTrue(bool(jnp.all(w["Dense_0"][:, 0] >= _FLOOR - 1e-6)))
    # the parameter-weighted mean of the per-layer matrices, which differ
    lw = s_layer.layer_w
    self.assertGreater(float(jnp.max(jnp.abs(lw["BatchNorm_0"] - lw["Dense_0"]))), 1e-5)
    want = (_SIZES["BatchNorm_0"] * lw["BatchNorm_0"] + _SIZES["Dense_0"] * lw["Dense_0"]) / 26
    np.testing.assert_allclose(w["Dense_0"], want, atol=1e-6)
    psi = jax.tree.map(lambda x, g: x - 0.1 * g, params, grads)
    names = combine.layer_names(psi)
    chex.assert_trees_all_close(new, combine.combine_layers(psi, ring.mixing(), w, names),
                                atol=1e-6)
    m = shared.metrics(new, s_shared, ring)
    self.assertEqual(float(m["self_weight/BatchNorm_0"]), float(m["self_weight/Dense_0"]))
    self.assertAlmostEqual(float(m["self_weight_mean"]), float(m["self_weight/Dense_0"]),
                           places=6)


class FreezeTest(parameterized.TestCase):

  def test_weights_of_the_last_warm_up_step_are_kept(self):
    ring = topology.make("ring", _K)
    params = _params(seed=9)
    frozen, live = _alg("drt", freeze_after=2), _alg("drt")
    s_frozen, s_live = frozen.init(params, ring), live.init(params, ring)
    p_frozen = p_live = params
    step_frozen, step_live = jax.jit(frozen.step), jax.jit(live.step)
    history = []
    for t in range(5):
      grads = _grads(p_frozen, t)
      before = p_frozen
      p_frozen, s_frozen = step_frozen(p_frozen, grads, s_frozen, ring)
      p_live, s_live = step_live(p_live, _grads(p_live, t), s_live, ring)
      history.append(s_frozen.layer_w)
      self.assertTrue(_changed(p_frozen, before))  # the parameters keep moving
      if t < 2:  # the warm-up: DRT diffusion itself
        chex.assert_trees_all_equal(p_frozen, p_live)
        chex.assert_trees_all_equal(s_frozen.layer_w, s_live.layer_w)
      else:  # combined with step 2's weights
        chex.assert_trees_all_equal(s_frozen.layer_w, history[1])
        psi = jax.tree.map(lambda x, g: x - 0.1 * g, before, grads)
        want = combine.combine_layers(psi, ring.mixing(), history[1], combine.layer_names(psi))
        chex.assert_trees_all_close(p_frozen, want, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(history[1]["Dense_0"]
                                             - s_live.layer_w["Dense_0"]))), 1e-6)

  def test_under_vmap_and_with_comm_every(self):
    ring = topology.make("ring", _K)
    alg = algorithms.make("drt", optax.sgd(0.1), freeze_after=3, comm_every=2, layerwise=False)
    members = [_params(seed=10), _params(seed=11)]
    states = [alg.init(p, ring) for p in members]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    vstep = jax.jit(jax.vmap(alg.step, in_axes=(0, 0, 0, None)))
    vp, vs = stack(members), stack(states)
    for t in range(6):
      grads = [_grads(p, t) for p in members]
      vp, vs = vstep(vp, stack(grads), vs, ring)
      out = [alg.step(p, g, s, ring) for p, g, s in zip(members, grads, states)]
      members, states = [o[0] for o in out], [o[1] for o in out]
      chex.assert_trees_all_close(vp, stack(members), atol=1e-6)
      chex.assert_trees_all_close(vs, stack(states), atol=1e-6)
    # combines at counts 0, 2 (computed) and 4 (frozen: count >= 3 keeps count 2's weights)
    self.assertEqual(int(states[0].count), 6)

  def test_a_failed_link_gives_its_frozen_weight_to_the_self_weight(self):
    ring = topology.make("ring", _K)
    alg = _alg("drt", freeze_after=1)
    params = _params(seed=12)
    state = alg.init(params, ring)
    params, state = alg.step(params, _grads(params, 0), state, ring)
    frozen = state.layer_w
    m = ring.mixing()
    w = np.asarray(m.nbr_w).copy()
    w[0, 0] += w[0, 1]  # agent 0 loses its first neighbour for this step
    w[0, 1] = 0.0
    cut = m._replace(nbr_w=jnp.asarray(w))
    grads = _grads(params, 1)
    new, state = alg.step(params, grads, state, cut)
    chex.assert_trees_all_equal(state.layer_w, frozen)  # kept for later steps as they were
    used = {p: v.at[0, 0].add(v[0, 1]).at[0, 1].set(0.0) for p, v in frozen.items()}
    psi = jax.tree.map(lambda x, g: x - 0.1 * g, params, grads)
    chex.assert_trees_all_close(new, combine.combine_layers(psi, cut, used,
                                                            combine.layer_names(psi)), atol=1e-6)

  def test_refusals(self):
    params = _params()
    with self.assertRaisesRegex(ValueError, "^drt freeze_after=2 keeps one step's weights, on that "
                                "step's neighbour lists, but the random_matching topology "
                                "changes its lists every step"):
      _alg("drt", freeze_after=2).init(params, topology.make("random_matching", _K))
    _alg("drt", freeze_after=2).init(params, topology.make("ring", _K))
    for bad in (-1, 1.5, True, "2"):
      with self.assertRaisesRegex(ValueError, "freeze_after=.* expected an integer >= 0"):
        algorithms.make("drt_symmetric", optax.sgd(0.1), freeze_after=bad)
    for bad in (0, "no", None):
      with self.assertRaisesRegex(ValueError, "layerwise=.* expected True"):
        algorithms.make("drt", optax.sgd(0.1), layerwise=bad)
    alg = algorithms.make("drt", optax.sgd(0.1), freeze_after=1)
    state = alg.init(params)  # no topology: [K, 1] weights
    with self.assertRaisesRegex(ValueError, r"pass the topology to init\(params, topology\)"):
      alg.step(params, _grads(params, 0), state, topology.make("ring", _K))


class ShardedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("atc_self_weights", "atc", {"self_weights": (("BatchNorm_0", 0.6), ("Dense_0", 0.3))}),
      ("drt_ablations", "drt", {"layerwise": False, "freeze_after": 2}))
  def test_sharded_step_equals_one_device(self, name, kw):
    self.assertGreaterEqual(jax.device_count(), _K)
    alg = _alg(name, **kw)
    topo = topology.make("ring", _K)
    params = _params(seed=13)
    state = alg.init(params, topo)
    step = jax.jit(alg.step)
    one_p, one_s = params, state
    split_p, split_s = (backends.place(t, "shard", _K) for t in (params, state))
    split_topo = backends.place(topo, "shard", _K, stacked=False)
    for t in range(4):
      grads = _grads(params, t)
      one_p, one_s = step(one_p, grads, one_s, topo)
      split_p, split_s = step(split_p, backends.place(grads, "shard", _K), split_s, split_topo)
    self.assertEqual(len(jax.tree.leaves(split_p)[0].sharding.device_set), _K)
    for a, b in zip(jax.tree.leaves((one_p, one_s)), jax.tree.leaves((split_p, split_s))):
      if jnp.issubdtype(a.dtype, jnp.inexact):
        np.testing.assert_allclose(backends.to_host(b), np.asarray(a), atol=2e-5, rtol=2e-5)


# Layers of the TINY config's MLP.
_TINY_SW = {"Dense_0": 0.6, "Dense_1": 0.2}


class ConfigTest(parameterized.TestCase):

  def test_options_resolve_and_build(self):
    for c in ({"algorithm": "atc", "algorithm_options": {"self_weights": _TINY_SW}},
              {"algorithm": "atc",
               "algorithm_options": ml_collections.ConfigDict({"self_weights": _TINY_SW})},
              {"algorithm": "drt", "algorithm_options": {"layerwise": False, "freeze_after": 5}}):
      resolved = config.resolve(c)
      want = c["algorithm_options"]
      want = want.to_dict() if isinstance(want, ml_collections.ConfigDict) else want
      self.assertEqual({k: v for k, v in build.algorithm_options(resolved).items()
                        if k in want}, want)
      self.assertIsNotNone(build.algorithm(resolved).init)
      config.resolve(json.loads(resolved.to_json()))  # a workdir's config.json resolves again

  def test_bad_options_are_one_line(self):
    for c, fragment in (
        ({"algorithm": "atc", "algorithm_options": {"self_weights": {"Dense_0": 2.0}}},
         r"self_weights\['Dense_0'\]=2.0 is not accepted"),
        ({"algorithm": "atc", "algorithm_options": {"self_weights": 0.5}}, "not a mapping"),
        ({"algorithm": "drt", "algorithm_options": {"self_weights": _TINY_SW}},
         "config.algorithm_options.self_weights=.* an option of 'drt'"),
        ({"algorithm": "drt", "algorithm_options": {"freeze_after": -1}}, "freeze_after=-1"),
        ({"algorithm": "drt_gradient_tracking", "algorithm_options": {"layerwise": False}},
         "an option of 'drt_gradient_tracking'"),
    ):
      with self.assertRaisesRegex(ValueError, fragment) as ctx:
        config.resolve(c)
      self.assertNotIn("\n", str(ctx.exception))

  def test_sweep_points_train_three_steps(self):
    base = {**TINY, "num_steps": 3, "eval_every": 3}
    points = [
        {"algorithm": "atc", "algorithm_options.self_weights": dict(_TINY_SW)},
        {"algorithm": "atc", "algorithm_options.self_weights.Dense_0": 0.6,
         "algorithm_options.self_weights.Dense_1": 0.2},
        {"algorithm": "drt", "algorithm_options.layerwise": False,
         "algorithm_options.freeze_after": 2},
    ]
    sweep.check(base, points)
    keys = [sweep.run_key(p) for p in points]
    self.assertEqual(len(set(keys)), 3)
    self.assertEqual(json.loads(keys[0])["algorithm_options.self_weights"], _TINY_SW)
    self.assertEqual(len({sweep.safe_name(k) for k in keys}), 3)
    # the two spellings of one config train the same run
    self.assertEqual(config.resolve(sweep.config_for(base, points[0])).to_dict(),
                     config.resolve(sweep.config_for(base, points[1])).to_dict())
    for overrides in points[1:]:
      history = train.train_and_evaluate(sweep.config_for(base, overrides), data=tiny_data(),
                                         verbose=False)
      last = history[-1]
      self.assertEqual(last["step"], 3)
      self.assertTrue(np.isfinite(last["train_loss"]))
      if overrides["algorithm"] == "atc":
        self.assertAlmostEqual(last["self_weight/Dense_0"], 0.6, places=5)
        self.assertAlmostEqual(last["self_weight/Dense_1"], 0.2, places=5)
        sizes = {"Dense_0": 64 * 16 + 16, "Dense_1": 16 * 10 + 10}
        weighted = (0.6 * sizes["Dense_0"] + 0.2 * sizes["Dense_1"]) / sum(sizes.values())
        self.assertAlmostEqual(last["self_weight_mean"], weighted, places=5)
        self.assertAlmostEqual(last["self_weight_layer_mean"], 0.4, places=5)
      else:
        self.assertEqual(last["self_weight/Dense_0"], last["self_weight/Dense_1"])

  def test_missing_layer_is_refused_at_init_in_one_line(self):
    c = {**TINY, "num_steps": 1, "eval_every": 0, "algorithm": "atc",
         "algorithm_options": {"self_weights": {"Dense_0": 0.5, "Conv_0": 0.5}}}
    with self.assertRaisesRegex(ValueError, "^atc self_weights names 'Conv_0', not a layer of "
                                "the model; its layers are: Dense_0, Dense_1$"):
      train.train_and_evaluate(c, data=tiny_data(), verbose=False)


if __name__ == "__main__":
  absltest.main()
