"""benchmarks/conv_formulations.py: the lab's kernel-gradient formulations ('xla_dw_matmul',
'xla_dw_taps', 'xla_dw_pallas') are the same function of the same parameters as 'xla'."""

import functools

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from fixtures import assert_conv_matches_xla

from benchmarks import conv_formulations
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import models


class MatmulGradConvTest(parameterized.TestCase):

  @parameterized.product(
      case=(((9, 9, 3), (3, 3), (1, 1), "SAME"), ((8, 8, 4), (3, 3), (2, 2), "SAME"),
            ((7, 6, 2), (1, 1), (2, 2), "SAME"), ((8, 8, 2), (3, 3), (1, 2), "VALID"),
            ((8, 8, 2), (3, 3), (1, 1), ((2, 0), (1, 1))),
            # channels the Pallas kernel takes (the others fall back to per-tap products)
            ((6, 6, 16), (3, 3), (1, 1), "SAME"), ((6, 5, 16), (3, 3), (1, 1), "VALID")),
      kernel_grad=conv_formulations.KERNEL_GRADS)
  def test_matmul_grad_conv_matches_lax_vmapped(self, case, kernel_grad):
    shape, kernel, strides, padding = case
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (3, 2, *shape))  # 3 agents
    w = jax.random.normal(k2, (3, *kernel, shape[-1], 16 if shape[-1] == 16 else 5))

    def value_and_grads(conv):
      def fn(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y) * jax.random.normal(k3, y.shape))
      return jax.jit(jax.vmap(jax.value_and_grad(fn, argnums=(0, 1))))(x, w)

    want = value_and_grads(jax.lax.conv_general_dilated)
    got = value_and_grads(functools.partial(conv_formulations.matmul_grad_conv,
                                            kernel_grad=kernel_grad))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)

  def test_unknown_kernel_grad(self):
    with self.assertRaisesWithLiteralMatch(
        ValueError, "unknown kernel_grad 'fft'; expected one of: patches, taps, pallas"):
      conv_formulations.matmul_grad_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1),
                                         "SAME", kernel_grad="fft")

  @parameterized.parameters("patches", "taps")
  def test_matmul_grad_conv_kernel_gradient_is_a_dot(self, kernel_grad):
    """The point of it: vmapped, the kernel gradient is a dot, not a grouped convolution."""
    x, w = jnp.ones((4, 2, 8, 8, 3)), jnp.ones((4, 3, 3, 3, 5))

    def compiled_grad_w(conv):
      def fn(x, w):
        return jnp.sum(conv(x, w, (1, 1), "SAME",
                            dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
      return jax.jit(jax.vmap(jax.grad(fn, argnums=1))).lower(x, w).compile().as_text()

    # Forward and kernel gradient are both grouped convolutions over the 4 agents ...
    self.assertEqual(compiled_grad_w(jax.lax.conv_general_dilated).count(" convolution("), 2)
    text = compiled_grad_w(functools.partial(conv_formulations.matmul_grad_conv,
                                             kernel_grad=kernel_grad))
    self.assertEqual(text.count(" convolution("), 1)  # ... here only the forward one is,
    # and the kernel gradient is batched matrix products: one of patches, or one per tap
    # (XLA may merge some of those).
    dots = text.count(" dot(")
    self.assertTrue(dots > 1 if kernel_grad == "taps" else dots == 1, dots)


class ModelsTest(parameterized.TestCase):
  """The models computing with a lab formulation (their ``conv`` option takes a function)."""

  # Small versions: the strided convolutions and 1x1 shortcuts are there, the compile time not.
  @parameterized.parameters(
      ("resnet20", {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8), "input_shape": (12, 12, 3)}),
      ("cnn", {"features": (4, 8), "hidden": 16, "input_shape": (12, 12, 1)}))
  def test_same_parameters_outputs_and_gradients_vmapped(self, name, kw):
    for conv in ("xla_dw_matmul", "xla_dw_taps"):
      with self.subTest(conv):
        assert_conv_matches_xla(name, kw, conv_formulations.conv_fn(conv))

  @parameterized.parameters(
      ("resnet20", {"stage_sizes": (1,), "widths": (16,), "input_shape": (6, 6, 3)}),
      ("cnn", {"features": (16, 16), "hidden": 16, "input_shape": (8, 8, 1)}))
  def test_pallas_kernel_gradients_vmapped(self, name, kw):
    """Channels from 16 up, so the stride-1 kernel gradients take conv_grad's path (on a CPU its
    XLA products; the kernel itself: conv_grad_test)."""
    assert_conv_matches_xla(name, kw, conv_formulations.conv_fn("xla_dw_pallas"))

  def test_unknown_lab_conv(self):
    with self.assertRaisesWithLiteralMatch(
        ValueError, "unknown lab conv 'taps'; expected one of: xla_dw_matmul, xla_dw_taps, "
        "xla_dw_pallas"):
      conv_formulations.conv_fn("taps")

  def test_the_library_offers_none_of_them(self):
    self.assertEmpty(set(conv_formulations.NAMES) & set(models.CONVS))
    for name in conv_formulations.NAMES:
      with self.assertRaisesRegex(ValueError, "config.conv='xla_dw"):
        config_lib.resolve({"conv": name})

  def test_build_model_as_the_library_builds_it(self):
    """The lab's model is the config's model (precision, options), with the lab's convolutions;
    without a lab formulation it is the library's own."""
    data = data_lib.synthetic(num_train=8, num_test=4, shape=(12, 12, 1), seed=0)
    c = config_lib.resolve({"model": "cnn", "precision": "bfloat16", "conv": "xla",
                            "model_options": {"features": (4, 8), "hidden": 16}})
    lab = conv_formulations.build_model(c, data, "xla_dw_taps")
    own = conv_formulations.build_model(c, data)
    x = jnp.zeros((2, *own.input_shape))
    self.assertEqual(lab.input_shape, own.input_shape)
    variables = own.init(jax.random.key(0))
    chex.assert_trees_all_equal_shapes(variables, lab.init(jax.random.key(0)))
    logits, _ = lab.apply(variables, x, True)
    chex.assert_trees_all_close(logits, own.apply(variables, x, True)[0], rtol=1e-2, atol=1e-2)


if __name__ == "__main__":
  absltest.main()
