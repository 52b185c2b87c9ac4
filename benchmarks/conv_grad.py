r"""A stride-1 convolution's kernel gradient as one Pallas kernel (GPU: Triton).

Vmapped over K agents, XLA computes a convolution's kernel gradient as a convolution grouped
over the agents, which cuDNN ran as one launch per agent on an H200 (docs/performance.md).
:func:`kernel_grad` is one kernel for all agents instead: each program walks a stretch of one
agent's input and output gradient and accumulates every kernel tap's product on chip.

The flat-shift form. Pad ``x`` by the convolution's padding to ``[B, Hp, Wp, C]`` and place
``dy`` (``[B, Ho, Wo, D]``, ``Ho = Hp - kh + 1``) in the top-left corner of the same
``Hp × Wp`` grid, zeros elsewhere; number the grid's rows ``q = (b·Hp + i)·Wp + j``. Output row
``q`` meets input row ``q + u·Wp + v`` through tap ``(u, v)``, inside the same image wherever
``dy`` is not zero, so

.. math:: \partial W[u, v] = \sum_q X[q + u W_p + v]^\top\, DY[q]

is a sum over contiguous blocks of rows: a program walks blocks of ``DY`` rows, loads the
``kh·kw`` shifted blocks of ``X`` that meet them (overlapping reads, mostly served by the
cache) and keeps ``kh·kw`` float32 ``[C, 16]`` accumulators in registers. The grid is
agents (under ``vmap``) × stretches of rows × blocks of output channels; each block of output
channels reads ``X`` again. Partial sums of the stretches are added afterwards, so the
stretches are as many as keep those sums small beside the inputs.

Where the program is lowered for an NVIDIA GPU the kernel is compiled by Triton; on every other
platform the same sum runs as ``kh·kw`` XLA matrix products of the shifted rows (Pallas's
interpreter, ``interpret=True``, runs the kernel itself anywhere, slowly: the tests use it).
"""

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

D_BLOCK = 16  # output channels per program: C x 16 accumulators per tap stay in registers
ROWS_PER_PROGRAM = 1024  # rows a program sums over, at least (fewer programs: see _programs)
# (rows per step, warps, pipeline stages) for a 3x3 kernel, by (input channels, bytes per
# element), picked from Triton 3.9's compilation for sm_90a (no GPU needed; see
# benchmarks/kernel_resources.py and docs/performance.md) by one rule: no register spills, at
# least 14 warps per SM, then the most rows of X in flight per SM (programs per SM x rows x
# stages where Triton stages X asynchronously); ties to more warps, fewer registers, more rows.
# Not yet timed.
LAUNCH = {(16, 4): (16, 1, 2), (16, 2): (64, 2, 1),
          (32, 4): (32, 4, 2), (32, 2): (64, 2, 1),
          (64, 4): (64, 4, 1), (64, 2): (32, 8, 2)}


def _power_of_two(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def _table_key(c: int, itemsize: int) -> tuple[int, int]:
  return c, 4 if itemsize >= 4 else 2


def launch(taps: int, c: int, itemsize: int) -> tuple[int, int, int]:
  """``(rows per step, warps, stages)`` for ``taps`` kernel taps and ``c`` input channels
  (:func:`supported`): :data:`LAUNCH`'s, with rows cut in proportion for kernels with more taps
  than 3x3 (a step's registers and shared memory grow with taps x rows); inside
  :func:`pinned_launch`, its settings."""
  if _PINNED[0] is not None:
    return _PINNED[0]
  table_rows, warps, stages = LAUNCH[_table_key(c, itemsize)]
  rows = table_rows
  while rows > 16 and taps * rows > 9 * table_rows:
    rows //= 2
  return rows, warps, stages


_PINNED = [None]  # settings in force inside pinned_launch


@contextlib.contextmanager
def pinned_launch(settings: tuple[int, int, int] | None):
  """Within the block, kernels traced use ``(rows per step, warps, stages)`` = ``settings``
  instead of :func:`launch`'s (None: as they are). For timing or compiling alternatives; a
  kernel's backward pass is traced at the first call of a jitted gradient, so call it inside."""
  before, _PINNED[0] = _PINNED[0], settings
  try:
    yield
  finally:
    _PINNED[0] = before


def supported(in_channels: int, out_channels: int, kernel_size=(3, 3), itemsize: int = 4) -> bool:
  """Whether :func:`kernel_grad` takes a convolution: channels powers of two from 16 (Triton's
  blocks are powers of two, its smallest matrix product 16 wide), at most 64 in (those
  :data:`LAUNCH` knows), and a kernel whose taps x 16 rows are no more than a 3x3's taps x the
  table's rows (3x3 and smaller: all of them)."""
  if not (_power_of_two(in_channels) and _power_of_two(out_channels) and in_channels <= 64):
    return False
  rows, _, _ = LAUNCH[_table_key(in_channels, itemsize)]
  return kernel_size[0] * kernel_size[1] * 16 <= 9 * rows


def _programs(rows: int, taps: int, c: int, d: int) -> int:
  """Stretches of rows per agent: one per ``ROWS_PER_PROGRAM`` rows (many programs for the GPU),
  but no more than keep their float32 partial sums within a quarter of the inputs' elements."""
  return max(1, min(pl.cdiv(rows, ROWS_PER_PROGRAM), rows * (c + d) // (4 * taps * c * d)))


def kernel_grad(x, dy, kernel_size, padding, precision=None, *, interpret=None,
                rows_per_program: int | None = None, d_block: int | None = None):
  """``dW[u, v, c, d] = Σ_{b,i,j} x_pad[b, i + u, j + v, c] · dy[b, i, j, d]``, float32.

  Args:
    x: the convolution's input, ``[B, H, W, C]`` (one agent; ``vmap`` adds the agent axis to
      the kernel's grid).
    dy: the gradient of its stride-1 output, ``[B, Ho, Wo, D]``, same dtype as ``x``.
    kernel_size: ``(kh, kw)``.
    padding: explicit ``((top, bottom), (left, right))``, non-negative.
    precision: passed to the products (``None``: the platform's default; TF32 for float32 on a
      GPU, as XLA's convolutions).
    interpret: ``None``: the Triton kernel where the program is lowered for an NVIDIA GPU,
      XLA's matrix products elsewhere; ``True``: Pallas's interpreter runs the kernel (any
      platform); ``False``: the compiled kernel (NVIDIA GPUs only).
    rows_per_program: rows of the grid one program sums over (rounded up to whole steps);
      default: see ``_programs``.
    d_block: output channels per program (a power of two from 16 dividing ``D``; default
      ``D_BLOCK``: larger blocks spilled registers in Triton's compilation).

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
  if x.dtype != dy.dtype:
    raise ValueError(f"kernel_grad: x is {x.dtype} and dy {dy.dtype}; cast them to one dtype")
  if not supported(c, d, kernel_size, x.dtype.itemsize):
    raise ValueError(f"kernel_grad: a {kh}x{kw} convolution from {c} to {d} channels "
                     f"({x.dtype}) is not supported; channels must be powers of two from 16, "
                     "the input's at most what supported() allows (use "
                     "conv_formulations.matmul_grad_conv's per-tap form for others)")
  bd = D_BLOCK if d_block is None else d_block
  if not (_power_of_two(bd) and d % bd == 0):
    raise ValueError(f"kernel_grad: d_block {bd} must be a power of two from 16 dividing {d}")

  rows = b * hp * wp
  offsets = [u * wp + v for u in range(kh) for v in range(kw)]
  br, num_warps, num_stages = launch(len(offsets), c, x.dtype.itemsize)
  if rows_per_program is None:
    programs = _programs(rows, len(offsets), c, d)
  elif rows_per_program < 1:
    raise ValueError(f"kernel_grad: rows_per_program must be positive, got {rows_per_program}")
  else:
    programs = pl.cdiv(rows, rows_per_program)
  per_program = pl.cdiv(pl.cdiv(rows, programs), br) * br
  programs = pl.cdiv(rows, per_program)  # none left with padding only
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

  def pallas(interpret: bool):
    def run(xs, gs):
      # Under shard_map the output varies over the same mesh axes as the inputs (the
      # attribute is absent in JAX versions that name it otherwise; only shard_map needs it).
      mat = getattr(jax.typeof(xs), "mat", None)
      out = jax.ShapeDtypeStruct((programs, kh * kw, c, d), jnp.float32,
                                 **({} if mat is None else {"manual_axis_type": mat}))
      return pl.pallas_call(
          kernel,
          out_shape=out,
          grid=(programs, d // bd),
          in_specs=[pl.BlockSpec(xs.shape, lambda s, j: (0, 0)),
                    pl.BlockSpec((n, bd), lambda s, j: (0, j))],
          out_specs=pl.BlockSpec((pl.squeezed, kh * kw, c, bd), lambda s, j: (s, 0, 0, j)),
          interpret=interpret,
          compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
          name="conv_kernel_grad",
      )(xs, gs).sum(0)
    return run

  def xla(xs, gs):  # the same sum as kh·kw matrix products of the shifted rows
    return jnp.stack([jnp.einsum("nc,nd->cd", jax.lax.slice_in_dim(xs, off, off + n), gs,
                                 precision=precision, preferred_element_type=jnp.float32)
                      for off in offsets])

  if interpret is None:  # decided when lowered, for the platform lowered for
    dw = jax.lax.platform_dependent(xs, gs, cuda=pallas(False), default=xla)
  else:
    dw = pallas(interpret)(xs, gs)
  return dw.reshape(kh, kw, c, d)
