"""Kernel-gradient formulations of a convolution, kept in the lab until a GPU measurement
promotes one into the library (docs/performance.md, "Closing the gap").

On an H200 the profile of K vmapped ResNet-20s found cuDNN running the kernel gradients of the
grouped convolutions (and the strided layers in every direction) as one launch per agent. The
formulations here keep XLA's convolution for the forward pass and the input gradient and compute
the kernel gradient otherwise:

* ``'xla_dw_matmul'``: one matrix product of image patches (:func:`matmul_grad_conv`);
* ``'xla_dw_taps'``: one matrix product per kernel tap, no patch matrix;
* ``'xla_dw_pallas'``: one Pallas kernel for all agents (:mod:`benchmarks.conv_grad`; Triton on
  NVIDIA GPUs, elsewhere the same sum as XLA matrix products).

Strided and 1x1 convolutions are matrix products throughout (the library's
``models.shifted_matmul_conv``). Every one is the same function, with the same parameters and
gradients, as ``lax.conv_general_dilated``. A model computes with one through the models'
``conv`` option, which takes a function as well as a library name::

  model = drt_jax.models.make("resnet20", conv=conv_formulations.conv_fn("xla_dw_pallas"))
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import conv_grad
from drt_jax import build, models
from drt_jax import data as data_lib

NAMES = ("xla_dw_matmul", "xla_dw_taps", "xla_dw_pallas")  # the lab's formulations
# How matmul_grad_conv computes a stride-1 kernel gradient.
KERNEL_GRADS = ("patches", "taps", "pallas")

_NHWC = ("NHWC", "HWIO", "NHWC")
# The library's taps and these formulations read the same shifted views of the input.
_explicit, _plain_2d, _tap_views = models._explicit, models._plain_2d, models._tap_views


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_dw_matmul(x, w, strides, padding, precision, kernel_grad):
  del kernel_grad  # how the kernel gradient is computed
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                      precision=precision)


def _conv_dw_matmul_fwd(x, w, strides, padding, precision, kernel_grad):
  return _conv_dw_matmul(x, w, strides, padding, precision, kernel_grad), (x, w)


def _conv_dw_matmul_bwd(strides, padding, precision, kernel_grad, residuals, g):
  x, w = residuals
  _, x_vjp = jax.vjp(lambda x: jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC, precision=precision), x)
  kh, kw, c, d = w.shape
  g = g.astype(x.dtype)
  if kernel_grad == "pallas" and conv_grad.supported(c, d, (kh, kw), x.dtype.itemsize):
    # one kernel for every tap, accumulated on chip
    dw = conv_grad.kernel_grad(x, g, (kh, kw), padding, precision)
  elif kernel_grad == "patches":  # one product of the patch matrix (im2col)
    views = _tap_views(x, kh, kw, strides, padding)
    dw = jnp.einsum("bhwk,bhwd->kd", jnp.concatenate(views, axis=-1), g, precision=precision,
                    preferred_element_type=jnp.float32)
  else:  # dW[u, v] = view_uv^T @ dy: kh·kw products, no patch matrix
    dw = jnp.stack([jnp.einsum("bhwc,bhwd->cd", view, g, precision=precision,
                               preferred_element_type=jnp.float32)
                    for view in _tap_views(x, kh, kw, strides, padding)])
  return x_vjp(g)[0], dw.reshape(kh, kw, c, d).astype(w.dtype)


_conv_dw_matmul.defvjp(_conv_dw_matmul_fwd, _conv_dw_matmul_bwd)


def matmul_grad_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, precision=None,
                     preferred_element_type=None, *, kernel_grad: str = "patches"):
  """A 2-D convolution whose gradients avoid per-agent cuDNN loops, a drop-in for ``nn.Conv``.

  Stride-1 convolutions keep ``lax.conv_general_dilated`` for the forward pass and the input
  gradient; their kernel gradient is ``patches(x)^T @ dy`` with ``patches`` the ``kh·kw``
  shifted views of ``x`` side by side (im2col), accumulated in float32. Vmapped over K agents
  that is one batched matrix product ``[K, kh·kw·C, B·Ho·Wo] × [K, B·Ho·Wo, D]`` where XLA
  would emit a convolution grouped over the agents. Strided and 1x1 convolutions are matrix
  products both ways (``models.shifted_matmul_conv``). On an H200 cuDNN ran those grouped
  convolutions (kernel gradients; strided convolutions in every direction) as one launch per
  agent (docs/performance.md). Same function and gradients as ``lax.conv_general_dilated``;
  dilated, grouped or non-2-D convolutions, which the models do not use, go to it unchanged.

  ``kernel_grad`` (one of :data:`KERNEL_GRADS`) chooses the kernel gradient's form:
  ``'patches'`` as above; ``'taps'``, ``kh·kw`` products ``view_uv^T @ dy``, one per tap
  (vmapped: ``[K, C, B·Ho·Wo] × [K, B·Ho·Wo, D]``), which reads each shifted view where it lies
  instead of writing the ``kh·kw`` times larger patch matrix first; ``'pallas'``, one kernel for
  all agents that walks ``x`` and ``dy`` in blocks of rows and keeps every tap's sum on chip
  (:func:`conv_grad.kernel_grad`), for the convolutions it takes (:func:`conv_grad.supported`),
  ``'taps'`` for the others.
  """
  if kernel_grad not in KERNEL_GRADS:
    raise ValueError(f"unknown kernel_grad {kernel_grad!r}; expected one of: "
                     f"{', '.join(KERNEL_GRADS)}")
  if (not _plain_2d(lhs, lhs_dilation, rhs_dilation, feature_group_count)
      or preferred_element_type is not None):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision, preferred_element_type=preferred_element_type)
  if rhs.shape[:2] == (1, 1) or any(st != 1 for st in window_strides):
    return models.shifted_matmul_conv(lhs, rhs, window_strides, padding, precision=precision)
  return _conv_dw_matmul(lhs, rhs, tuple(window_strides),
                         _explicit(padding, lhs, rhs, window_strides), precision, kernel_grad)


def conv_fn(name: str) -> Callable:
  """The ``conv_general_dilated`` of the lab formulation ``name`` (one of :data:`NAMES`), for a
  model's ``conv`` option."""
  kernel_grads = dict(zip(NAMES, ("patches", "taps", "pallas"), strict=True))
  if name not in kernel_grads:
    raise ValueError(f"unknown lab conv {name!r}; expected one of: {', '.join(NAMES)}")
  return functools.partial(matmul_grad_conv, kernel_grad=kernel_grads[name])


def build_model(c: ml_collections.ConfigDict, data: data_lib.Data,
                lab_conv: str | None = None) -> models.Model:
  """``drt_jax.build.model(c, data)``, its convolutions computed by the lab formulation
  ``lab_conv`` (one of :data:`NAMES`) when given, by ``c.conv`` otherwise."""
  if lab_conv is None:
    return build.model(c, data)
  options = dict(c.model_options)
  if c.precision != "float32":  # as build.model: parameters stay float32
    options.setdefault("dtype", jnp.dtype(c.precision))
  if c.model in models.CONV_MODELS:
    options["conv"] = conv_fn(lab_conv)
  return models.make(c.model, data.classes, input_shape=data.train_images.shape[1:], **options)
