"""Tests for drt_jax.combine: sparse == dense, consensus, averages, layers, contraction rate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from drt_jax import combine, topology
from drt_jax.types import Mixing

_K = 8
_STATIC = (
    ("ring", "ring", {}),
    ("torus", "torus", {}),
    ("star", "star", {}),
    ("full", "full", {}),
    ("exponential", "exponential", {}),
    ("erdos_renyi", "erdos_renyi", {"seed": 1}),
    ("star_uniform", "star", {"weights": "uniform"}),
    ("ring_lazy", "ring", {"lazy": 0.5}),
)


def _tree(k_count=_K, seed=0):
  """A stacked tree with mixed leaf shapes, an agent-only leaf and a bfloat16 leaf."""
  rng = np.random.default_rng(seed)
  return {
      "a": _normal(rng, k_count, 3),
      "b": {"c": _normal(rng, k_count, 2, 2), "d": _normal(rng, k_count, 4).astype(jnp.bfloat16)},
      "e": _normal(rng, k_count),
  }


def _normal(rng, *shape):
  # numpy draws: jax.random would compile a sampler for every shape
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _reference(tree, a):
  """float64 numpy ``x_k = sum_l A[l, k] x_l``."""
  return jax.tree.map(
      lambda x: np.einsum("lk,l...->k...", a, np.asarray(x, np.float64)), tree)


def _assert_close_to(tree, expected):
  """float32 leaves to 1e-6; the bfloat16 leaf keeps its dtype and is close at bf16 precision."""
  for x, want in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
    ref = np.asarray(want, np.float64)
    if x.dtype == jnp.bfloat16:
      np.testing.assert_allclose(np.asarray(x, np.float64), ref, atol=3e-2, rtol=1e-2)
    else:
      np.testing.assert_allclose(np.asarray(x, np.float64), ref, atol=1e-6, rtol=1e-6)


class CombineTest(chex.TestCase):

  @parameterized.named_parameters(*_STATIC)
  def test_sparse_equals_dense(self, kind, kw):
    topo = topology.make(kind, _K, **kw)
    tree = _tree()
    sparse = combine.combine(tree, topo)
    dense = combine.combine_dense(tree, topo.dense())
    chex.assert_trees_all_equal_shapes_and_dtypes(sparse, tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(dense, tree)
    self.assertEqual(sparse["b"]["d"].dtype, jnp.bfloat16)
    _assert_close_to(sparse, dense)
    _assert_close_to(sparse, _reference(tree, topo.dense()))
    # and combining actually mixed something
    self.assertGreater(float(jnp.max(jnp.abs(sparse["a"] - tree["a"]))), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("one_peer_exponential", "one_peer_exponential"), ("random_matching", "random_matching"))
  def test_time_varying_sparse_equals_dense(self, kind):
    topo = topology.make(kind, _K)
    tree = _tree(seed=1)
    fn = self.variant(combine.combine)  # with jit, topology and step are traced arguments
    for step in (0, 1, 2, 5, 17):
      out = fn(tree, topo, step)
      self.assertEqual(out["b"]["d"].dtype, jnp.bfloat16)
      _assert_close_to(out, combine.combine_dense(tree, topo.dense(step)))
      _assert_close_to(out, _reference(tree, topo.dense(step)))
    # steps a period apart use the same matrix; neighbouring steps do not
    chex.assert_trees_all_close(fn(tree, topo, 1), fn(tree, topo, 1 + topo.period))
    self.assertFalse(np.allclose(fn(tree, topo, 0)["a"], fn(tree, topo, 1)["a"]))

  def test_mixing_and_topology_agree(self):
    topo = topology.make("random_matching", _K)
    tree = _tree()
    chex.assert_trees_all_equal(combine.combine(tree, topo, 3),
                                combine.combine(tree, topo.mixing(3)))
    with self.assertRaises(TypeError):
      combine.as_mixing(topo.dense())

  @parameterized.named_parameters(
      ("ring", "ring", 0), ("exponential", "exponential", 0), ("star_uniform", "star", 0),
      ("one_peer_exponential", "one_peer_exponential", 2),
      ("random_matching", "random_matching", 5))
  def test_consensus_is_fixed_point(self, kind, step):
    weights = "uniform" if kind == "star" else "metropolis"
    topo = topology.make(kind, _K, weights=weights)
    one = jax.tree.map(lambda x: x[:1], _tree())
    tree = jax.tree.map(lambda x: jnp.repeat(x, _K, axis=0), one)
    out = combine.combine(tree, topo, step)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), out),
                                jax.tree.map(lambda x: x.astype(jnp.float32), tree),
                                atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(
      ("ring", "ring", 0), ("torus", "torus", 0), ("star", "star", 0),
      ("erdos_renyi", "erdos_renyi", 0), ("exponential", "exponential", 0),
      ("random_matching", "random_matching", 3))
  def test_doubly_stochastic_preserves_average(self, kind, step):
    topo = topology.make(kind, _K, seed=1)
    np.testing.assert_allclose(topo.dense(step).sum(axis=1), 1.0, atol=1e-6)  # doubly stochastic
    x = {"a": _normal(np.random.default_rng(3), _K, 5), "b": jnp.arange(_K, dtype=jnp.float32)}
    out = combine.combine(x, topo, step)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v.mean(axis=0), out),
                                jax.tree.map(lambda v: v.mean(axis=0), x), atol=1e-6)

  def test_column_only_stochastic_moves_average(self):
    # Control for the test above: uniform weights on a star are not doubly stochastic.
    topo = topology.make("star", _K, weights="uniform")
    x = jnp.arange(_K, dtype=jnp.float32)
    self.assertGreater(abs(float(combine.combine(x, topo).mean() - x.mean())), 0.1)


class LayersTest(parameterized.TestCase):

  def _flax_like(self, k_count=_K):
    rng = np.random.default_rng(7)
    dense = lambda i, o: {"kernel": _normal(rng, k_count, i, o),  # noqa: E731
                          "bias": _normal(rng, k_count, o)}
    return {"params": {"Dense_0": dense(3, 4), "Dense_1": dense(4, 2),
                       "BatchNorm_0": {"scale": _normal(rng, k_count, 4),
                                       "bias": _normal(rng, k_count, 4)}}}

  def test_layer_names_module_and_leaf(self):
    tree = self._flax_like()
    self.assertEqual(combine.leaf_paths(tree), [
        "params/BatchNorm_0/bias", "params/BatchNorm_0/scale", "params/Dense_0/bias",
        "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"])
    module = combine.layer_names(tree)
    self.assertEqual(module, ["params/BatchNorm_0"] * 2 + ["params/Dense_0"] * 2
                     + ["params/Dense_1"] * 2)
    self.assertEqual(combine.unique_layers(module),
                     ["params/BatchNorm_0", "params/Dense_0", "params/Dense_1"])
    self.assertEqual(combine.layer_names(tree, "leaf"), combine.leaf_paths(tree))
    self.assertEqual(combine.layer_names({"w": jnp.ones(2), "b": [jnp.ones(2)]}), ["b", "w"])
    with self.assertRaisesRegex(ValueError, "granularity"):
      combine.layer_names(tree, "block")

  def test_layer_norms_and_sizes(self):
    tree = self._flax_like()
    names = combine.layer_names(tree)
    sq = combine.layer_sq_norms(tree, names)
    dense0 = tree["params"]["Dense_0"]
    expected = (jnp.sum(dense0["kernel"] ** 2, axis=(1, 2)) + jnp.sum(dense0["bias"] ** 2, axis=1))
    np.testing.assert_allclose(sq["params/Dense_0"], expected, rtol=1e-6)
    self.assertEqual(combine.layer_sizes(tree, names),
                     {"params/BatchNorm_0": 8, "params/Dense_0": 16, "params/Dense_1": 10})
    unstacked = jax.tree.map(lambda x: x[0], tree)
    self.assertEqual(combine.layer_sizes(unstacked, names, stacked=False)["params/Dense_1"], 10)

  @parameterized.parameters("module", "leaf")
  def test_combine_layers_equals_dense(self, granularity):
    tree = self._flax_like()
    names = combine.layer_names(tree, granularity)
    idx = jnp.asarray(topology.make("ring", _K).nbr_idx[0])
    rng = np.random.default_rng(0)
    layer_w, layer_a = {}, {}
    for name in combine.unique_layers(names):
      w = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
      w /= w.sum(axis=1, keepdims=True)  # column k of A sums to one
      layer_w[name] = jnp.asarray(w)
      layer_a[name] = topology.to_dense(np.asarray(idx), w)
      np.testing.assert_allclose(layer_a[name].sum(axis=0), 1.0, atol=1e-6)
    sparse = combine.combine_layers(tree, idx, layer_w, names)
    dense = combine.combine_layers_dense(tree, layer_a, names)
    chex.assert_trees_all_close(sparse, dense, atol=1e-6, rtol=1e-6)
    leaves = jax.tree.leaves(tree)
    for x, name, out in zip(leaves, names, jax.tree.leaves(sparse), strict=True):
      np.testing.assert_allclose(out, np.einsum("lk,l...->k...", layer_a[name], np.asarray(x)),
                                 atol=1e-5)
    # per-layer: the first leaf combined with another layer's weights would differ
    other = combine.unique_layers(names)[-1]
    wrong = combine.combine(leaves[0], Mixing(idx, layer_w[other]))
    self.assertFalse(np.allclose(wrong, jax.tree.leaves(sparse)[0], atol=1e-3))


class ContractionTest(absltest.TestCase):

  def test_pure_averaging_contracts_at_slem(self):
    # lr 0: repeated combining on a ring shrinks ||X - mean|| by slem() per step asymptotically.
    topo = topology.make("ring", _K)
    x = _normal(np.random.default_rng(0), _K, 6)
    x = x - x.mean(axis=0)  # zero mean keeps float32 relative precision as X shrinks

    def disagreement(v):
      return jnp.linalg.norm(v - v.mean(axis=0))

    @jax.jit
    def run(v, topo):
      def body(_, carry):
        v, _ = carry
        new = combine.combine(v, topo)
        return new, disagreement(new) / disagreement(v)
      return jax.lax.fori_loop(0, 45, body, (v, jnp.zeros(())))

    out, last_ratio = run(x, topo)
    slem = topo.slem()
    self.assertAlmostEqual(slem, 1 / 3 + 2 / 3 * np.cos(2 * np.pi / _K), delta=1e-6)
    self.assertAlmostEqual(float(last_ratio) / slem, 1.0, delta=1e-3)
    self.assertLess(float(disagreement(out)), slem ** 40 * float(disagreement(x)))


if __name__ == "__main__":
  absltest.main()
