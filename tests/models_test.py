"""Tests for drt_jax.models: shapes, dtypes, sizes, BatchNorm state and per-agent isolation."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from fixtures import assert_conv_matches_xla

from drt_jax import models

# (test name, make() name, make() kwargs)
_MODELS = (
    ("resnet20", "resnet20", {}),
    ("resnet20_28x28x1", "resnet20", {"input_shape": (28, 28, 1)}),
    ("cnn", "cnn", {}),
    ("cnn_bn", "cnn", {"batch_norm": True}),
    ("convnet", "convnet", {}),
    ("mlp", "mlp", {}),
)
_STATEFUL = ("resnet20", "cnn_bn", "convnet")


def _make(test_name):
  _, name, kw = next(m for m in _MODELS if m[0] == test_name)
  return models.make(name, **kw)


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _batch(model, n=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, *model.input_shape))


class ModelsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_MODELS)
  def test_apply_shapes_and_dtypes(self, name, kw):
    model = models.make(name, num_classes=7, **kw)
    variables = model.init(jax.random.key(0))
    x = _batch(model)
    for train in (False, True):
      logits, new_state = self.variant(functools.partial(model.apply, train=train))(variables, x)
      chex.assert_shape(logits, (2, 7))
      chex.assert_type(logits, jnp.float32)
      self.assertEqual(set(new_state), set(variables) - {"params"})

  @parameterized.named_parameters(
      ("resnet20", "resnet20", 260_000, 280_000),
      ("cnn", "cnn", 250_000, 350_000),
      ("mlp", "mlp", 200_000, 300_000),
  )
  def test_param_count(self, name, low, high):
    self.assertBetween(_num_params(models.make(name).init(jax.random.key(0))), low, high)

  def test_convnet_spreads_its_parameters(self):
    # The study's "layer-wise can matter" network: no layer holds more than half the parameters.
    from drt_jax import combine  # noqa: PLC0415

    params = models.make("convnet").init(jax.random.key(0))["params"]
    sizes = combine.layer_sizes(params, combine.layer_names(params), stacked=False)
    self.assertEqual(sum(sizes.values()), 9_346)
    self.assertLess(max(sizes.values()) / sum(sizes.values()), 0.5)
    self.assertLen([n for n in sizes if n.startswith("BatchNorm")], 4)

  def test_convnet_needs_one_stride_per_conv(self):
    model = models.make("convnet", features=(4, 4), strides=(2,))
    with self.assertRaisesRegex(ValueError, "one stride per conv"):
      model.init(jax.random.key(0))

  def test_default_input_shapes(self):
    self.assertEqual(models.make("resnet20").input_shape, (32, 32, 3))
    self.assertEqual(models.make("cnn").input_shape, (28, 28, 1))
    self.assertEqual(models.make("mlp", num_classes=3).num_classes, 3)

  def test_uint8_input_matches_float(self):
    model = models.make("cnn")
    variables = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, *model.input_shape), 0, 256).astype(jnp.uint8)
    chex.assert_trees_all_close(model.apply(variables, x, False)[0],
                                model.apply(variables, x.astype(jnp.float32), False)[0])

  @parameterized.named_parameters(("cnn_bn", "cnn", {"batch_norm": True}), ("mlp", "mlp", {}))
  def test_bfloat16_compute_keeps_float32_params_and_logits(self, name, kw):
    model = models.make(name, dtype=jnp.bfloat16, **kw)
    variables = model.init(jax.random.key(0))
    chex.assert_trees_all_equal_dtypes(variables, jax.tree.map(jnp.float32, variables))
    logits, _ = model.apply(variables, _batch(model), True)
    chex.assert_type(logits, jnp.float32)

  @parameterized.parameters(*_STATEFUL)
  def test_train_updates_batch_stats(self, name):
    model = _make(name)
    variables = model.init(jax.random.key(0))
    _, new_state = model.apply(variables, _batch(model), True)
    chex.assert_trees_all_equal_shapes(new_state["batch_stats"], variables["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                           new_state["batch_stats"], variables["batch_stats"])
    self.assertTrue(all(jax.tree.leaves(changed)))

  @parameterized.parameters(*_STATEFUL)
  def test_eval_returns_state_unchanged(self, name):
    model = _make(name)
    variables = model.init(jax.random.key(0))
    _, new_state = model.apply(variables, _batch(model), False)
    chex.assert_trees_all_equal(new_state, {"batch_stats": variables["batch_stats"]})

  @parameterized.parameters("cnn", "mlp")
  def test_stateless_models_return_empty_state(self, name):
    model = models.make(name)
    variables = model.init(jax.random.key(0))
    self.assertEqual(set(variables), {"params"})
    self.assertEqual(model.apply(variables, _batch(model), True)[1], {})

  def test_names(self):
    self.assertEqual(models.NAMES, ("cnn", "convnet", "mlp", "resnet20"))

  def test_unknown_name(self):
    with self.assertRaisesWithLiteralMatch(
        ValueError, "unknown model 'foo'; expected one of: cnn, convnet, mlp, resnet20"):
      models.make("foo")


class ConvFormulationTest(parameterized.TestCase):
  """conv='taps', or any function in the place of lax.conv_general_dilated, is the same function
  of the same parameters as 'xla'. (The lab's formulations: tests/conv_formulations_test.py.)"""

  @parameterized.parameters(
      ((9, 9, 3), (3, 3), (1, 1), "SAME"), ((8, 8, 4), (3, 3), (2, 2), "SAME"),
      ((7, 6, 2), (1, 1), (2, 2), "SAME"), ((8, 8, 2), (3, 3), (1, 2), "VALID"),
      ((8, 8, 2), (3, 3), (1, 1), ((2, 0), (1, 1))))
  def test_shifted_matmul_conv_matches_lax(self, shape, kernel, strides, padding):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (2, *shape))
    w = jax.random.normal(k2, (*kernel, shape[-1], 5))
    want = jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = models.shifted_matmul_conv(x, w, strides, padding)
    self.assertEqual(got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

  # Small versions: the strided convolutions and 1x1 shortcuts are there, the compile time not.
  @parameterized.parameters(
      ("resnet20", {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8), "input_shape": (12, 12, 3)}),
      ("cnn", {"features": (4, 8), "hidden": 16, "input_shape": (12, 12, 1)}))
  def test_same_parameters_outputs_and_gradients_vmapped(self, name, kw):
    assert_conv_matches_xla(name, kw, "taps")

  def test_a_function_computes_every_convolution(self):
    """conv may be a conv_general_dilated: every nn.Conv of the model calls it."""
    calls = []

    def counted(*args, **kw):
      calls.append(args[1].shape)  # the kernel
      return jax.lax.conv_general_dilated(*args, **kw)

    model = models.make("resnet20", conv=counted, stage_sizes=(1, 1, 1), widths=(4, 8, 8),
                        input_shape=(12, 12, 3))
    jax.eval_shape(model.init, jax.random.key(0))  # traced, not compiled
    # The stem, two per block, and the 1x1 shortcuts of the two blocks that change shape.
    self.assertLen(calls, 1 + 2 * 3 + 2)
    self.assertIn((1, 1, 4, 8), calls)

  def test_other_convolutions_fall_back_to_lax(self):
    x = jax.random.normal(jax.random.key(0), (2, 9, 3))
    one_d = nn.Conv(4, (3,), conv_general_dilated=models.shifted_matmul_conv)
    plain = nn.Conv(4, (3,))
    v = plain.init(jax.random.key(1), x)
    np.testing.assert_allclose(one_d.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-5)

  def test_unknown_conv(self):
    with self.assertRaisesWithLiteralMatch(
        ValueError, "unknown conv 'xla_dw_matmul'; expected one of: xla, taps, or a function "
        "like lax.conv_general_dilated"):
      models.make("cnn", conv="xla_dw_matmul").init(jax.random.key(0))


class _WithTrain(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


class _WithoutTrain(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, dtype=jnp.bfloat16)(x.reshape(x.shape[0], -1))


class FromFlaxTest(absltest.TestCase):

  def test_module_with_train(self):
    model = models.from_flax(_WithTrain(), (4, 2), 3)
    variables = model.init(jax.random.key(0))
    x = _batch(model, n=5)
    logits, new_state = model.apply(variables, x, True)
    chex.assert_shape(logits, (5, 3))
    self.assertFalse(np.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0))
    _, eval_state = model.apply(variables, x, False)
    chex.assert_trees_all_equal(eval_state, {"batch_stats": variables["batch_stats"]})

  def test_module_without_train(self):
    model = models.from_flax(_WithoutTrain(), (4, 2), 3)
    self.assertEqual((model.input_shape, model.num_classes), ((4, 2), 3))
    variables = model.init(jax.random.key(0))
    for train in (False, True):
      logits, new_state = model.apply(variables, _batch(model, n=5), train)
      chex.assert_shape(logits, (5, 3))
      chex.assert_type(logits, jnp.float32)
      self.assertEqual(new_state, {})


class BatchNormIsolationTest(parameterized.TestCase):
  """Agents vmapped over a leading axis must not share BatchNorm statistics."""

  @parameterized.parameters(*_STATEFUL)
  def test_perturbing_one_agent_leaves_the_others_bitwise_unchanged(self, name):
    num_agents = 3
    model = _make(name)
    # A loop, not vmap(init): eager init reuses compiled ops, vmap(init) compiles anew (slow).
    keys = jax.random.split(jax.random.key(0), num_agents)
    variables = jax.tree.map(lambda *a: jnp.stack(a), *[model.init(k) for k in keys])
    chex.assert_tree_shape_prefix(variables, (num_agents,))
    # Independent initialisation: agents start from different parameters.
    kernels = jax.tree.leaves(variables["params"])[-1]
    self.assertFalse(np.array_equal(kernels[0], kernels[1]))

    x = jax.random.normal(jax.random.key(1), (num_agents, 4, *model.input_shape))
    apply = jax.jit(jax.vmap(lambda v, x: model.apply(v, x, True)))
    logits, state = apply(variables, x)
    noise = jax.random.normal(jax.random.key(2), x.shape[1:])
    logits_p, state_p = apply(variables, x.at[0].add(noise))

    chex.assert_shape(logits, (num_agents, 4, model.num_classes))
    chex.assert_tree_shape_prefix(state, (num_agents,))
    for k in range(1, num_agents):
      chex.assert_trees_all_equal((logits[k], jax.tree.map(lambda a: a[k], state)),
                                  (logits_p[k], jax.tree.map(lambda a: a[k], state_p)))
    self.assertFalse(np.array_equal(logits[0], logits_p[0]))
    stats_0 = [jax.tree.map(lambda a: a[0], s["batch_stats"]) for s in (state, state_p)]
    self.assertTrue(all(jax.tree.leaves(jax.tree.map(
        lambda a, b: not np.array_equal(a, b), *stats_0))))


if __name__ == "__main__":
  absltest.main()
