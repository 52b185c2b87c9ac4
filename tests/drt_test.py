"""Tests for drt_jax.drt: the properties every DRT combination matrix must satisfy."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from drt_jax import combine, drt, topology
from drt_jax.types import Mixing

_K = 8
_FLOOR = 0.05
# (name, kind, make kwargs, step)
_TOPOLOGIES = (
    ("ring", "ring", {}, 0),
    ("torus", "torus", {}, 0),  # 2 x 4
    ("star", "star", {}, 0),  # irregular
    ("exponential", "exponential", {}, 0),  # directed
    ("erdos_renyi", "erdos_renyi", {"seed": 10, "p": 0.3}, 0),  # degrees 1..3
    ("random_matching", "random_matching", {}, 3),  # one step of a time-varying graph
)
# Every neighbour list is padded to the star's width (padding: self, weight 0, as the Topology
# pads): the weights then run on one set of shapes, and op-by-op compiles of new shapes are what
# dominates this file's run time. test_padding_changes_nothing checks the padding is inert.
_WIDTH = _K
_UNDIRECTED = ("ring", "torus", "star", "erdos_renyi", "random_matching")
_NETWORKS = ("shared_noise", "independent")


def _normal(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _shapes():
  # One leaf shape per role: eager ops compile once per shape, so layers of equal shapes are
  # cheap (this file runs the weights op by op, as layer_matrices does).
  return {f"Dense_{i}": {"kernel": (3, 3), "bias": (3,)} for i in range(3)}


def _network(kind: str, k_count: int = _K, seed: int = 0):
  """A stacked 3-layer tree: consensus, shared init + small noise, or independent inits."""
  rng = np.random.default_rng(seed)

  def leaf(shape):
    if kind == "independent":
      return jnp.asarray(_normal(rng, k_count, *shape))
    shared = np.broadcast_to(_normal(rng, *shape), (k_count, *shape))
    noise = 0.0 if kind == "consensus" else 0.05 * _normal(rng, k_count, *shape)
    return jnp.asarray(shared + noise, jnp.float32)

  return jax.tree.map(leaf, _shapes(), is_leaf=lambda x: isinstance(x, tuple))


def _pad(mix: Mixing, width: int = _WIDTH) -> Mixing:
  idx, w = np.asarray(mix.nbr_idx), np.asarray(mix.nbr_w)
  k_count, extra = idx.shape[0], width - idx.shape[1]
  pad_idx = np.tile(np.arange(k_count, dtype=np.int32)[:, None], (1, extra))
  return Mixing(jnp.asarray(np.concatenate([idx, pad_idx], axis=1)),
                jnp.asarray(np.concatenate([w, np.zeros((k_count, extra), np.float32)], axis=1)))


def _topology(name: str):
  """(base matrix ``[K, K]``, padded Mixing) of one step of a named topology."""
  _, kind, kw, step = next(t for t in _TOPOLOGIES if t[0] == name)
  topo = topology.make(kind, _K, **kw)
  return topo.dense(step), _pad(topo.mixing(step))


def _dense(mix: Mixing, layer_w: dict) -> dict:
  idx = np.asarray(mix.nbr_idx)
  return {p: topology.to_dense(idx, np.asarray(w, np.float64)) for p, w in layer_w.items()}


@functools.cache
def _matrices(topo_name, variant, network, method):
  _, mix = _topology(topo_name)
  return drt.layer_matrices(_network(network), mix, variant=variant, floor=_FLOOR, method=method)


# One compile for one-off shapes (the 20-layer and the 2-agent networks) instead of op-by-op
# compiles of every op.
_weights_jit = jax.jit(drt.weights, static_argnames=("names", "variant", "floor", "eps"))


def _cases():
  return [(f"{t[0]}_{v}_{n}", t[0], v, n)
          for t in _TOPOLOGIES for v in drt.VARIANTS for n in _NETWORKS]


class MatrixPropertiesTest(parameterized.TestCase):

  def _assert_properties(self, mats, base, variant, floor=_FLOOR, exact_floor=False):
    k_count = base.shape[0]
    off_graph = (base == 0) & ~np.eye(k_count, dtype=bool)
    for name, a in mats.items():
      self.assertEqual(a.shape, (k_count, k_count))
      self.assertTrue(np.all(np.isfinite(a)), f"{name}: non-finite weights")
      self.assertTrue(np.all(a >= 0.0), f"{name}: negative weight {a.min()}")
      np.testing.assert_array_equal(a[off_graph], 0.0, err_msg=f"{name}: weight off the graph")
      np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-6, err_msg=f"{name}: column sums")
      diag = np.diag(a)
      if variant == "drt_normalized":
        np.testing.assert_allclose(diag, np.maximum(np.diag(base), floor), atol=1e-6)
      else:
        self.assertTrue(np.all(diag >= floor - 1e-6), f"{name}: self-weight {diag.min()}")
        if exact_floor:
          np.testing.assert_allclose(diag, floor, atol=1e-5, err_msg=f"{name}: not saturated")

  @parameterized.named_parameters(*_cases())
  def test_properties_and_sparse_equals_dense(self, topo_name, variant, network):
    base, _ = _topology(topo_name)
    sparse = _matrices(topo_name, variant, network, "sparse")
    dense = _matrices(topo_name, variant, network, "dense")
    self.assertEqual(set(sparse), {"Dense_0", "Dense_1", "Dense_2"})
    self._assert_properties(sparse, base, variant)
    self._assert_properties(dense, base, variant)
    for name in sparse:
      np.testing.assert_allclose(sparse[name], dense[name], atol=1e-6, err_msg=name)
    # The weights are layer-wise: layers get different matrices, except where every agent has
    # one neighbour and its column is fixed: saturated at the floor, or drt_normalized.
    max_degree = int(((base > 0) & ~np.eye(_K, dtype=bool)).sum(axis=0).max())
    single = max_degree == 1 and (network == "independent" or variant == "drt_normalized")
    if not single:
      self.assertGreater(np.abs(sparse["Dense_0"] - sparse["Dense_2"]).max(), 1e-4)

  @parameterized.parameters(*drt.VARIANTS)
  def test_astronomical_drt_saturates_at_floor(self, variant):
    # Independent inits at scales 1e-3 .. 1e3 over 20 layers on a star whose hub has the smallest
    # scale: DRT overflows float32 (log(1 + DRT) ~ 277), yet the weights must stay finite, keep
    # the properties and saturate at the floor.
    rng = np.random.default_rng(5)
    scales = np.logspace(-3, 3, _K).astype(np.float32)[:, None]
    params = {f"layer_{i:02d}": jnp.asarray(scales * _normal(rng, _K, 3)) for i in range(20)}
    base, mix = _topology("star")
    names = combine.layer_names(params)
    gamma = drt.calibrate(params, names)
    layer_w, log1p_drt = _weights_jit(params, mix, tuple(names), gamma, variant=variant,
                                      floor=_FLOOR)
    self.assertGreater(float(jnp.max(log1p_drt)), math.log(np.finfo(np.float32).max))
    self.assertTrue(bool(jnp.all(jnp.isfinite(log1p_drt))))
    mats = _dense(mix, layer_w)
    dense = drt.layer_matrices(params, mix, variant=variant, floor=_FLOOR, method="dense")
    self._assert_properties(dense, base, variant, exact_floor=variant == "drt")
    # Normalising before scaling (softmax x mass) keeps the saturated weights within 1e-6 of the
    # float64 reference and the floor exact. (drt_symmetric's edges without a mirrored reverse,
    # on directed graphs, still take exp(log a + log f) with log a ~ 500: ~1e-5 relative error.)
    self._assert_properties(mats, base, variant, exact_floor=variant == "drt")
    for p in mats:
      np.testing.assert_allclose(mats[p], dense[p], atol=1e-6, err_msg=f"sparse vs dense, {p}")

  @parameterized.product(variant=drt.VARIANTS, relative=(1e20, 1e30))
  def test_extreme_relative_distances_stay_finite(self, variant, relative):
    # A star whose hub is tiny next to its leaves: the leaves sit ~relative * ||hub|| away from
    # it, beyond float32's exp range (log1p(exp(2 log d)) overflowed once d > ~1e19, the weights
    # then went NaN or stopped mixing); softplus keeps them finite, equal to the float64
    # reference and saturated at the floor. Every squared norm and distance is still a normal
    # float32 (hub norm ~1e-18, leaves ~1e12), with eps below the hub's norm.
    rng = np.random.default_rng(11)
    big = 1e6 if relative < 1e25 else 1e12
    scales = np.full((_K, 1), big, np.float32)
    scales[0] = big / relative
    params = {f"Dense_{i}": {"kernel": jnp.asarray(scales * _normal(rng, _K, 4))}
              for i in range(3)}
    base, mix = _topology("star")
    kw = {"variant": variant, "floor": _FLOOR, "eps": 1e-30}
    sparse = drt.layer_matrices(params, mix, method="sparse", **kw)
    dense = drt.layer_matrices(params, mix, method="dense", **kw)
    saturated = variant == "drt"  # drt_symmetric: an edge takes min(f_k, f_hub), below the floor
    self._assert_properties(dense, base, variant, exact_floor=saturated)
    self._assert_properties(sparse, base, variant, exact_floor=saturated)
    # drt_symmetric's hub column is a softmax of log a in the hundreds: float32 keeps ~1e-5 of it
    # (as in test_astronomical_drt_saturates_at_floor).
    rtol = 3e-5 if variant == "drt_symmetric" else 0.0
    for p in sparse:
      np.testing.assert_allclose(sparse[p], dense[p], atol=1e-6, rtol=rtol,
                                 err_msg=f"sparse vs dense, {p}")
    names = combine.layer_names(params)
    _, log1p_drt = _weights_jit(params, mix, tuple(names), drt.calibrate(params, names, 1e-30),
                                variant=variant, floor=_FLOOR, eps=1e-30)
    self.assertTrue(bool(jnp.all(jnp.isfinite(log1p_drt))))
    # a leaf listening to the hub: DRT ~ relative^3 over the three layers
    self.assertGreater(float(jnp.max(log1p_drt)), 3 * math.log(relative) - 5)

  @parameterized.product(topo_name=("ring", "exponential", "random_matching"),
                         variant=drt.VARIANTS)
  def test_consensus_is_fixed_point(self, topo_name, variant):
    psi = _network("consensus")
    _, mix = _topology(topo_name)
    names = combine.layer_names(psi)
    gamma = drt.calibrate(psi, names)
    layer_w, log1p_drt = drt.weights(psi, mix, names, gamma, variant=variant, floor=_FLOOR)
    np.testing.assert_array_equal(log1p_drt, 0.0)  # identical networks: DRT = 0
    out = combine.combine_layers(psi, mix.nbr_idx, layer_w, names)
    chex.assert_trees_all_close(out, psi, atol=1e-6, rtol=1e-6)

  @parameterized.product(topo_name=("ring", "star"), variant=("drt", "drt_symmetric"),
                         strength=(0.5, 1.0, 1.4))
  def test_starts_as_atc_at_calibration_point(self, topo_name, variant, strength):
    # Shared init, calibrated on itself: beta = 1 / n_0^2, so a_lk = rho c_lk unless the column
    # (drt) or either endpoint (drt_symmetric) would exceed the floor, then scaled down.
    params = _network("consensus", seed=2)
    c, mix = _topology(topo_name)
    mats = drt.layer_matrices(params, mix, variant=variant, strength=strength, floor=_FLOOR,
                              calibration=params)
    s = strength * (1.0 - np.diag(c))
    f = np.minimum(1.0, (1.0 - _FLOOR) / s)
    scale = np.minimum(f[:, None], f[None, :]) if variant == "drt_symmetric" else f[None, :]
    off = ~np.eye(_K, dtype=bool)
    expected = np.where(off, strength * c * scale, 0.0)
    expected += np.diag(1.0 - expected.sum(axis=0))
    unscaled = 0
    for name, a in mats.items():
      np.testing.assert_allclose(a, expected, atol=1e-6, err_msg=name)
      fits = s <= 1.0 - _FLOOR
      if variant == "drt":  # whenever rho (1 - c_kk) <= 1 - floor: exactly ATC scaled by rho
        np.testing.assert_allclose(a[:, fits][off[:, fits]], strength * c[:, fits][off[:, fits]],
                                   atol=1e-6)
        unscaled += int(fits.sum())
    if variant == "drt" and strength <= 1.0:
      self.assertEqual(unscaled, 3 * _K)  # every column fits: it is ATC (times rho)
    if topo_name == "star" and strength == 1.4:
      self.assertTrue(np.any(f < 1.0))  # the hub's column saturates

  @parameterized.product(topo_name=_UNDIRECTED, network=_NETWORKS)
  def test_symmetric_variant_preserves_layer_averages(self, topo_name, network):
    _, mix = _topology(topo_name)
    psi = _network(network, seed=3)
    names = combine.layer_names(psi)
    gamma = {p: 2.0 * v for p, v in drt.calibrate(psi, names).items()}
    layer_w, _ = drt.weights(psi, mix, names, gamma, variant="drt_symmetric", floor=_FLOOR)
    for p, a in _dense(mix, layer_w).items():
      np.testing.assert_allclose(a, a.T, atol=1e-6, err_msg=p)
    out = combine.combine_layers(psi, mix.nbr_idx, layer_w, names)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.mean(axis=0), out),
                                jax.tree.map(lambda x: x.mean(axis=0), psi), atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(out["Dense_1"]["kernel"]
                                             - psi["Dense_1"]["kernel"]))), 1e-3)

  def test_plain_drt_is_not_symmetric(self):
    # Control for the test above: the default variant normalises by the neighbour's norms only.
    mats = _matrices("star", "drt", "independent", "sparse")
    self.assertGreater(max(np.abs(a - a.T).max() for a in mats.values()), 1e-3)

  @parameterized.parameters(0.3, 50.0)
  def test_symmetric_variant_with_asymmetric_base_weights(self, strength):
    # Uniform weights on a star: c_lk != c_kl on every edge. The floor is still applied per edge
    # with min(f_k, f_l), a_lk min(f_k, f_l), so the matrices are not symmetric.
    topo = topology.make("star", _K, weights="uniform")
    base, mix = topo.dense(0), _pad(topo.mixing(0))
    self.assertFalse(np.allclose(base, base.T))
    psi = _network("independent", seed=6)
    names = combine.layer_names(psi)
    gamma = {p: strength * v for p, v in drt.calibrate(psi, names).items()}
    layer_w, _ = _weights_jit(psi, mix, tuple(names), gamma, variant="drt_symmetric",
                              floor=_FLOOR)
    sparse = _dense(mix, layer_w)
    dense = drt.weights_dense(psi, base, names, gamma, variant="drt_symmetric", floor=_FLOOR)
    self._assert_properties(sparse, base, "drt_symmetric")
    for p in sparse:
      np.testing.assert_allclose(sparse[p], dense[p], atol=1e-6, err_msg=p)
    self.assertGreater(max(np.abs(a - a.T).max() for a in sparse.values()), 1e-2)

  @parameterized.parameters("drt", "drt_symmetric")
  def test_zero_strength_does_not_mix(self, variant):
    # rho = 0 gives every off-diagonal weight zero mass: each agent keeps its own psi (local
    # training), not 0/0.
    psi = _network("independent", seed=7)
    _, mix = _topology("ring")
    names = combine.layer_names(psi)
    gamma = {p: 0.0 * v for p, v in drt.calibrate(psi, names).items()}
    layer_w, _ = _weights_jit(psi, mix, tuple(names), gamma, variant=variant, floor=_FLOOR)
    for p, a in _dense(mix, layer_w).items():
      np.testing.assert_array_equal(a, np.eye(_K), err_msg=p)
    out = combine.combine_layers(psi, mix.nbr_idx, layer_w, names)
    chex.assert_trees_all_equal(out, psi)

  @parameterized.product(topo_name=("ring", "star", "exponential"), floor=(0.05, 0.2, 0.5))
  def test_normalized_self_weight(self, topo_name, floor):
    c, mix = _topology(topo_name)
    mats = drt.layer_matrices(_network("independent", seed=4), mix, variant="drt_normalized",
                              floor=floor)
    for a in mats.values():
      np.testing.assert_allclose(np.diag(a), np.maximum(np.diag(c), floor), atol=1e-6)
    # strength plays no role
    other = drt.layer_matrices(_network("independent", seed=4), mix, variant="drt_normalized",
                               floor=floor, strength=7.0)
    for p in mats:
      np.testing.assert_allclose(other[p], mats[p], atol=1e-7)


class HandComputedTest(absltest.TestCase):
  """Two agents, two layers; every number below follows the spec's definitions by hand."""

  PSI = {"a": {"w": jnp.array([[1.0, 2.0, 2.0], [2.0, 4.0, 4.0]])},  # norms 3, 6
         "b": {"w": jnp.array([[3.0, 4.0], [0.0, 5.0]])}}  # norms 5, 5; distance sqrt(10)

  def test_log1p_drt(self):
    names = combine.layer_names(self.PSI)
    self.assertEqual(names, ["a", "b"])
    mix = topology.make("ring", 2).mixing()
    gamma = drt.calibrate(self.PSI, names)
    _, log1p_drt = _weights_jit(self.PSI, mix, tuple(names), gamma)
    # DRT(w_l -> w_k) = prod_p (1 + ||w_k^p - w_l^p|| / ||w_l^p||) - 1
    d_b = math.sqrt(10) / 5
    drt_10 = (1 + 3 / 6) * (1 + d_b) - 1  # agent 0 listens to l = 1 (reference norms of agent 1)
    drt_01 = (1 + 3 / 3) * (1 + d_b) - 1  # agent 1 listens to l = 0
    np.testing.assert_allclose(np.asarray(log1p_drt),
                               [[0.0, math.log(1 + drt_10)], [0.0, math.log(1 + drt_01)]],
                               rtol=1e-6)

  def test_weights(self):
    names = combine.layer_names(self.PSI)
    gamma = drt.calibrate(self.PSI, names)  # n_0^2: (9 + 36) / 2 and (25 + 25) / 2
    np.testing.assert_allclose([gamma["a"], gamma["b"]], [22.5, 25.0], rtol=1e-6)
    mix = topology.make("ring", 2).mixing()
    mats = _dense(mix, _weights_jit(self.PSI, mix, tuple(names), gamma, floor=_FLOOR)[0])
    # a_lk^(p) = gamma^(p) c_lk prod_{q != p} (1 + d_lk^(q)^2) / ||psi_l^(p)||^2, c_lk = 1/2
    a_10 = {"a": 22.5 * 0.5 * (1 + 10 / 25) / 36, "b": 25.0 * 0.5 * (1 + 0.25) / 25}
    a_01 = {"a": 22.5 * 0.5 * (1 + 10 / 25) / 9, "b": 25.0 * 0.5 * (1 + 1.0) / 25}
    self.assertLess(max(a_10.values()), 1 - _FLOOR)
    self.assertGreater(min(a_01.values()), 1 - _FLOOR)  # agent 1's columns saturate
    for p in ("a", "b"):
      np.testing.assert_allclose(mats[p], [[1 - a_10[p], 1 - _FLOOR], [a_10[p], _FLOOR]],
                                 atol=1e-6, err_msg=p)


class OptionsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("variant", {"variant": "drt_fancy"}, "drt_fancy"),
      ("floor_one", {"floor": 1.0}, "floor"),
      ("floor_negative", {"floor": -0.1}, "floor"),
      ("eps_zero", {"eps": 0.0}, "eps"),
      ("strength_negative", {"strength": -1.0}, "strength"),
      ("reference", {"reference": "x"}, "reference"),
  )
  def test_check_options_errors(self, kw, fragment):
    args = {"variant": "drt", "floor": 0.05, "eps": 1e-6, "strength": 1.0, "reference": "init"}
    args.update(kw)
    with self.assertRaisesRegex(ValueError, fragment):
      drt.check_options(**args)

  def test_valid_options(self):
    for variant in drt.VARIANTS:
      for reference in drt.REFERENCES:
        drt.check_options(variant, 0.0, 1e-6, 0.0, reference)  # no error

  def test_layer_matrices_rejects_bad_options(self):
    mix = _topology("ring")[1]
    with self.assertRaisesRegex(ValueError, "method"):
      drt.layer_matrices(_network("consensus"), mix, method="magic")
    with self.assertRaisesRegex(ValueError, "floor"):
      drt.layer_matrices(_network("consensus"), mix, floor=1.0)

  def test_guarded_norms(self):
    tree = {"z": {"w": jnp.zeros((_K, 3))}, "o": {"w": jnp.ones((_K, 3))}}
    names = combine.layer_names(tree)
    sq = drt.guarded_sq_norms(tree, names, eps=1e-3)
    np.testing.assert_allclose(sq["z"], 1e-6 * 3, rtol=1e-5)  # (eps sqrt(size))^2
    np.testing.assert_allclose(sq["o"], 3.0, rtol=1e-6)


class PaddingTest(parameterized.TestCase):

  @parameterized.parameters(*drt.VARIANTS)
  def test_padding_changes_nothing(self, variant):
    # The Topology's own (unpadded, D = 3) ring vs the padded Mixing used everywhere above.
    topo = topology.make("ring", _K)
    psi = _network("independent", seed=8)
    plain = drt.layer_matrices(psi, topo, variant=variant)
    padded = drt.layer_matrices(psi, _pad(topo.mixing()), variant=variant)
    for p in plain:
      np.testing.assert_allclose(plain[p], padded[p], atol=1e-7, err_msg=p)


if __name__ == "__main__":
  absltest.main()
