"""Tests for benchmarks/conv_grad.py: the Pallas kernel gradient equals XLA's, and lowers to Triton.

On a CPU Pallas's interpreter runs the kernel (``interpret=True``): the same grid, blocks and
products, so the values test the indexing; the default there is the same sum as XLA matrix
products. The CUDA lowering (Pallas to Triton IR, no GPU needed) tests that Triton takes the
kernel's shapes and operations; compiling that IR needs a GPU (benchmarks/gpu_bench.sh).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import conv_formulations, conv_grad
from drt_jax import models

_NHWC = ("NHWC", "HWIO", "NHWC")


def _want(x, dy, kernel_size, padding):
  """The kernel gradient as XLA computes it: the VJP of the convolution."""
  w = jnp.zeros((*kernel_size, x.shape[-1], dy.shape[-1]), jnp.float32)
  _, vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
      x.astype(jnp.float32), w, (1, 1), padding, dimension_numbers=_NHWC,
      precision="highest"), w)
  return vjp(dy.astype(jnp.float32))[0]


def _inputs(shape, d, kernel_size, padding, dtype=jnp.float32, agents=None):
  b, h, w, _ = shape
  ho = h + sum(padding[0]) - kernel_size[0] + 1
  wo = w + sum(padding[1]) - kernel_size[1] + 1
  lead = () if agents is None else (agents,)
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (*lead, *shape)).astype(dtype),
          jax.random.normal(k2, (*lead, b, ho, wo, d)).astype(dtype))


class KernelGradTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("same_3x3", (2, 8, 8, 16), 32, (3, 3), ((1, 1), (1, 1)), {}),
      ("valid_odd_sizes", (3, 7, 5, 32), 16, (3, 3), ((0, 0), (0, 0)), {}),
      ("uneven_kernel_and_padding", (2, 6, 6, 16), 16, (3, 2), ((2, 0), (0, 1)), {}),
      ("wide_input_short_blocks", (2, 5, 6, 64), 16, (3, 3), ((1, 1), (1, 1)), {}),
      # several programs share the rows and several the output channels: partial sums added
      ("split_rows_and_channels", (2, 8, 8, 16), 64, (3, 3), ((1, 1), (1, 1)),
       {"rows_per_program": 64, "d_block": 16}),
      ("rows_per_program_under_one_block", (1, 4, 4, 16), 16, (3, 3), ((1, 1), (1, 1)),
       {"rows_per_program": 5}),
  )
  def test_matches_xla(self, shape, d, kernel_size, padding, kw):
    x, dy = _inputs(shape, d, kernel_size, padding)
    for interpret in (True, None):  # the kernel, interpreted; the platform's default (XLA)
      got = jax.jit(functools.partial(conv_grad.kernel_grad, kernel_size=kernel_size,
                                      padding=padding, precision="highest",
                                      interpret=interpret, **kw))(x, dy)
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_allclose(got, _want(x, dy, kernel_size, padding), rtol=1e-5,
                                 atol=1e-4, err_msg=f"interpret={interpret}")

  def test_vmapped_over_agents_each_agent_its_own(self):
    padding = ((1, 1), (1, 1))
    x, dy = _inputs((2, 6, 6, 16), 16, (3, 3), padding, agents=3)
    got = jax.jit(jax.vmap(lambda x, dy: conv_grad.kernel_grad(
        x, dy, (3, 3), padding, "highest", interpret=True, rows_per_program=64)))(x, dy)
    for k in range(3):
      np.testing.assert_allclose(got[k], _want(x[k], dy[k], (3, 3), padding),
                                 rtol=1e-5, atol=1e-4)

  def test_bfloat16_inputs_accumulate_in_float32(self):
    padding = ((1, 1), (1, 1))
    x, dy = _inputs((4, 8, 8, 16), 16, (3, 3), padding, jnp.bfloat16)
    got = jax.jit(lambda x, dy: conv_grad.kernel_grad(x, dy, (3, 3), padding,
                                                      interpret=True))(x, dy)
    self.assertEqual(got.dtype, jnp.float32)
    # Exact products of bf16 values summed in float32: only the summation order differs.
    np.testing.assert_allclose(got, _want(x, dy, (3, 3), padding), rtol=1e-4, atol=1e-3)

  def test_bad_input_is_one_clear_error(self):
    padding = ((1, 1), (1, 1))
    x, dy = _inputs((2, 6, 6, 16), 16, (3, 3), padding)
    with self.assertRaisesRegex(ValueError, r"a 3x3 convolution from 3 to 16 channels "
                                r"\(float32\) is not supported; channels must be powers of two"):
      conv_grad.kernel_grad(jnp.zeros((2, 6, 6, 3)), dy, (3, 3), padding)
    with self.assertRaisesRegex(ValueError, "x is float32 and dy bfloat16; cast them"):
      conv_grad.kernel_grad(x, dy.astype(jnp.bfloat16), (3, 3), padding)
    with self.assertRaisesRegex(ValueError, "rows_per_program must be positive, got 0"):
      conv_grad.kernel_grad(x, dy, (3, 3), padding, rows_per_program=0)
    with self.assertRaisesRegex(ValueError, r"dy has shape \(2, 6, 6, 16\), expected "
                                r"\(2, 4, 4, 16\)"):
      conv_grad.kernel_grad(x, dy, (3, 3), ((0, 0), (0, 0)))
    with self.assertRaisesRegex(ValueError, "d_block 32 must be a power of two from 16 "
                                "dividing 16"):
      conv_grad.kernel_grad(x, dy, (3, 3), padding, d_block=32)

  def test_launch_follows_the_table_and_cuts_rows_for_larger_kernels(self):
    for (c, itemsize), config in conv_grad.LAUNCH.items():
      self.assertEqual(conv_grad.launch(9, c, itemsize), config)  # 3x3: as picked
      self.assertEqual(conv_grad.launch(6, c, itemsize), config)  # 3x2: no more
    # 5x5 in bfloat16 at 16 channels: 25 taps x 16 rows within 9 taps x the table's 64 rows.
    self.assertEqual(conv_grad.launch(25, 16, 2), (16, 2, 1))
    self.assertEqual(conv_grad.launch(9, 64, 8), conv_grad.LAUNCH[(64, 4)])  # float64: as fp32

  def test_supported(self):
    self.assertTrue(conv_grad.supported(16, 64))
    self.assertFalse(conv_grad.supported(3, 16))  # ResNet-20's first convolution
    self.assertFalse(conv_grad.supported(16, 48))
    self.assertFalse(conv_grad.supported(8, 8))
    # Every 3x3 up to 64 input channels; a 5x5 only where the table has rows to spare.
    self.assertFalse(conv_grad.supported(128, 16))
    self.assertTrue(conv_grad.supported(64, 64, (3, 3), 4))
    self.assertTrue(conv_grad.supported(16, 64, (5, 5), 2))
    self.assertFalse(conv_grad.supported(16, 64, (5, 5), 4))


# Pallas reads the GPU it lowers for from the abstract mesh's device (newer JAX has no fallback
# without a GPU present): an H100, for lowering only.
_GPU = jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", None, "gpu")


def _cuda_module(fn, *args, mesh=None) -> str:
  """``fn`` lowered for CUDA on this machine: Pallas emits Triton IR, nothing is compiled."""
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  mesh = mesh or jax.sharding.AbstractMesh((1,), ("one",), abstract_device=_GPU)
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
        *args).mlir_module()


class CudaLoweringTest(parameterized.TestCase):

  @parameterized.product(channels=((16, 16), (32, 32), (64, 64), (16, 32)),
                         dtype=("float32", "bfloat16"))
  def test_lowers_to_one_triton_kernel_for_all_agents(self, channels, dtype):
    """ResNet-20's stride-1 layers, 64 agents: one Triton call, the agents on its grid."""
    c, d = channels
    h = {16: 32, 32: 16, 64: 8}[c]
    x = jax.ShapeDtypeStruct((64, 32, h, h, c), jnp.dtype(dtype))
    dy = jax.ShapeDtypeStruct((64, 32, h, h, d), jnp.dtype(dtype))
    text = _cuda_module(jax.vmap(lambda x, dy: conv_grad.kernel_grad(
        x, dy, (3, 3), ((1, 1), (1, 1)), interpret=False)), x, dy)
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 1)
    self.assertIn("grid_z = 64", text)  # the agent axis

  def test_lowers_inside_shard_map(self):
    """The shard back-end's program: agents split over a mesh, each device vmapping its own.
    The mesh is abstract, of GPUs (see _GPU)."""
    mesh = jax.sharding.AbstractMesh((4,), ("agents",), abstract_device=_GPU)
    f = jax.shard_map(jax.vmap(lambda x, dy: conv_grad.kernel_grad(
        x, dy, (3, 3), ((1, 1), (1, 1)))), mesh=mesh, in_specs=(P("agents"), P("agents")),
        out_specs=P("agents"))
    sharded = NamedSharding(mesh, P("agents"))
    x = jax.ShapeDtypeStruct((8, 2, 8, 8, 16), jnp.float32, sharding=sharded)
    self.assertEqual(_cuda_module(f, x, x, mesh=mesh).count("__gpu$xla.gpu.triton"), 1)

  def test_the_model_step_has_no_grouped_kernel_gradient(self):
    """A small ResNet-20's vmapped gradient lowers for CUDA with the lab's 'xla_dw_pallas': every
    stride-1 kernel gradient with power-of-two channels is a Triton kernel."""
    model = models.make("resnet20", conv=conv_formulations.conv_fn("xla_dw_pallas"),
                        stage_sizes=(1, 1, 1), input_shape=(8, 8, 3))
    variables = jax.eval_shape(jax.vmap(model.init), jax.random.split(jax.random.key(0), 4))
    x = jax.ShapeDtypeStruct((4, 2, 8, 8, 3), jnp.float32)

    def loss(params, rest, x):
      return jnp.sum(model.apply({**rest, "params": params}, x, True)[0] ** 2)

    rest = {k: v for k, v in variables.items() if k != "params"}
    text = _cuda_module(jax.vmap(jax.grad(loss)), variables["params"], rest, x)
    # Stride-1 3x3 layers: the stem (3 input channels: per-tap products instead), two in the
    # first block and one in each later block (whose first is strided): 4 Triton kernels.
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 4)


if __name__ == "__main__":
  absltest.main()
