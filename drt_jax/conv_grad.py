r"""A stride-1 convolution's kernel gradient as one Pallas kernel (GPU: Triton).

Vmapped over K agents, XLA computes a convolution's kernel gradient as a convolution grouped
over the agents, which cuDNN ran as one launch per agent on an H200 (docs/performance.md).
:func:`kernel_grad` is one kernel for all agents instead: each program reads a stretch of one
agent's input and output gradient once and accumulates every kernel tap's product on chip.

The flat-shift form. Pad ``x`` by the convolution's padding to ``[B, Hp, Wp, C]`` and place
``dy`` (``[B, Ho, Wo, D]``, ``Ho = Hp - kh + 1``) in the top-left corner of the same
``Hp × Wp`` grid, zeros elsewhere; number the grid's rows ``q = (b·Hp + i)·Wp + j``. Output row
``q`` meets input row ``q + u·Wp + v`` through tap ``(u, v)``, inside the same image wherever
``dy`` is not zero, so

.. math:: \partial W[u, v] = \sum_q X[q + u W_p + v]^\top\, DY[q]

is a sum over contiguous blocks of rows: a program walks blocks of ``DY`` rows, loads the
``kh·kw`` shifted blocks of ``X`` that meet them and keeps ``kh·kw`` float32 ``[C, D]``
accumulators. Rows are split among programs (their partial sums are added afterwards) so that
even one agent fills the GPU; output channels are split into blocks so the accumulators fit in
registers.

On a GPU the kernel is compiled by Triton; on any other platform Pallas interprets it (the same
arithmetic, slowly), which is what the tests run on a CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_BLOCK_ROWS = 64  # rows of X and DY per product: the contraction length of one step
TAP_BYTES = 36 * 1024  # one step's kh·kw blocks of X (Triton stages them in shared memory)
ROWS_PER_PROGRAM = 4096  # rows one program sums over (fewer when an agent has fewer)
MAX_ACCUMULATOR = 1024  # C × (D block) floats per tap kept in registers
NUM_WARPS = 4
NUM_STAGES = 2


def supported(in_channels: int, out_channels: int) -> bool:
  """Whether :func:`kernel_grad` takes these channel counts: powers of two from 16 (Triton's
  smallest matrix-product side; its blocks are powers of two)."""
  return all(n >= 16 and n & (n - 1) == 0 for n in (in_channels, out_channels))


def _d_block(c: int, d: int) -> int:
  return min(d, max(16, MAX_ACCUMULATOR // c))


def block_rows(taps: int, c: int, itemsize: int) -> int:
  """Rows per step: a power of two in [16, MAX_BLOCK_ROWS] whose ``taps`` blocks of ``c``
  channels fit ``TAP_BYTES``, so that ``NUM_STAGES`` steps in flight fit an SM's shared memory
  (float32, 3x3: 64 rows at 16 channels, 32 at 32, 16 at 64)."""
  rows = MAX_BLOCK_ROWS
  while rows > 16 and taps * rows * c * itemsize > TAP_BYTES:
    rows //= 2
  return rows


def kernel_grad(x, dy, kernel_size, padding, precision=None, *, interpret=None,
                rows_per_program: int = ROWS_PER_PROGRAM, d_block: int | None = None):
  """``dW[u, v, c, d] = Σ_{b,i,j} x_pad[b, i + u, j + v, c] · dy[b, i, j, d]``, float32.

  Args:
    x: the convolution's input, ``[B, H, W, C]`` (one agent; ``vmap`` adds the agent axis to
      the kernel's grid).
    dy: the gradient of its stride-1 output, ``[B, Ho, Wo, D]``, same dtype as ``x``.
    kernel_size: ``(kh, kw)``.
    padding: explicit ``((top, bottom), (left, right))``.
    precision: passed to the products (``None``: the platform's default; TF32 for float32 on a
      GPU, as XLA's convolutions).
    interpret: run Pallas's interpreter; default (``None``): compile with Triton where the
      program is lowered for an NVIDIA GPU, interpret on every other platform.
    rows_per_program: how many grid rows one program sums over (rounded up to whole blocks).
    d_block: output channels per program (a power of two from 16 dividing ``D``); default: as
      many as keep ``C × d_block`` within ``MAX_ACCUMULATOR``.

  Returns:
    ``float32[kh, kw, C, D]``.
  """
  kh, kw = kernel_size
  (top, bottom), (left, right) = padding
  b, h, w, c = x.shape
  d = dy.shape[-1]
  hp, wp = h + top + bottom, w + left + right
  ho, wo = hp - kh + 1, wp - kw + 1
  if dy.shape != (b, ho, wo, d):
    raise ValueError(f"kernel_grad: dy has shape {dy.shape}, expected {(b, ho, wo, d)} for a "
                     f"stride-1 {kh}x{kw} convolution of {x.shape} padded by {padding}")
  if not supported(c, d):
    raise ValueError(f"kernel_grad: channels {c} -> {d} not supported; both must be powers of "
                     "two from 16 (use models.matmul_grad_conv's per-tap form for others)")
  rows = b * hp * wp
  bd = d_block or _d_block(c, d)
  if not (supported(c, bd) and d % bd == 0):
    raise ValueError(f"kernel_grad: d_block {bd} must be a power of two from 16 dividing {d}")
  programs = pl.cdiv(rows, rows_per_program)
  offsets = [u * wp + v for u in range(kh) for v in range(kw)]
  br = block_rows(len(offsets), c, x.dtype.itemsize)
  per_program = pl.cdiv(pl.cdiv(rows, programs), br) * br
  steps, n = per_program // br, programs * per_program
  reach = pl.cdiv(offsets[-1], br) * br  # rows read past the last output row
  xs = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).reshape(rows, c)
  xs = jnp.pad(xs, ((0, n + reach - rows), (0, 0)))
  gs = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, d)
  gs = jnp.pad(gs, ((0, n - rows), (0, 0)))

  def kernel(x_ref, g_ref, o_ref):
    start = pl.program_id(0) * per_program

    def accumulate(i, accs):
      row = pl.multiple_of(start + i * br, br)
      g = g_ref[pl.ds(row, br), :]
      return tuple(
          acc + jax.lax.dot_general(x_ref[pl.ds(row + off, br), :], g,
                                    (((0,), (0,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)
          for acc, off in zip(accs, offsets))

    zeros = tuple(jnp.zeros((c, bd), jnp.float32) for _ in offsets)
    for t, acc in enumerate(jax.lax.fori_loop(0, steps, accumulate, zeros)):
      o_ref[t] = acc

  call = functools.partial(
      pl.pallas_call,
      kernel,
      out_shape=jax.ShapeDtypeStruct((programs, kh * kw, c, d), jnp.float32),
      grid=(programs, d // bd),
      in_specs=[pl.BlockSpec(xs.shape, lambda s, j: (0, 0)),
                pl.BlockSpec((n, bd), lambda s, j: (0, j))],
      out_specs=pl.BlockSpec((None, kh * kw, c, bd), lambda s, j: (s, 0, 0, j)),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      name="conv_kernel_grad")
  if interpret is None:  # decided when lowered, for the platform lowered for
    partial_sums = jax.lax.platform_dependent(
        xs, gs, cuda=call(interpret=False), default=call(interpret=True))
  else:
    partial_sums = call(interpret=interpret)(xs, gs)
  return partial_sums.sum(0).reshape(kh, kw, c, d)
