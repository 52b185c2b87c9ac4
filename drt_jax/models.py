"""Networks behind two pure functions, so nothing outside this module knows they are flax.

A :class:`Model` is ``init(key) -> variables`` and ``apply(variables, x, train) -> (logits,
new_state)`` plus the example shape and class count:

* ``variables`` is a dict ``{'params': ..., <other collections>...}``; everything but ``'params'``
  (e.g. ``'batch_stats'``) is *model state*, updated by the forward pass rather than by gradients.
* ``x`` is a batch ``[B, *input_shape]``, NHWC for images, uint8 or float; models do not normalise
  (the data pipeline does). Logits are ``float32[B, num_classes]`` whatever the compute dtype.
* ``train`` is a Python bool (static under ``jit``). With ``train=True`` BatchNorm uses batch
  statistics and ``new_state`` holds the updated collections; with ``train=False`` it uses the
  running averages and ``new_state`` is the state passed in. ``new_state`` is ``{}`` for a model
  without state.

These functions see one agent. The system vmaps them over the leading agent axis of stacked trees
(see :mod:`drt_jax.types`), so BatchNorm never sets ``axis_name``: each agent keeps its own
statistics and one agent's batch never touches another's.

``dtype`` (e.g. ``jnp.bfloat16``) sets the compute dtype; parameters stay float32.

``conv`` chooses how the convolutional models compute a convolution, with the same parameters
and the same function every way: ``'xla'`` (``lax.conv_general_dilated``; vmapped over agents it
becomes a grouped convolution) or ``'taps'`` (:func:`shifted_matmul_conv`; vmapped, batched matrix
products). It may also be a function with the signature of ``lax.conv_general_dilated``, which
every ``nn.Conv`` of the model then calls (``nn.Conv(conv_general_dilated=...)``): how the
performance lab (``benchmarks/conv_formulations.py``) runs formulations the library does not
offer.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# Formulations of a convolution by name (see the module docstring).
CONVS = ("xla", "taps")


def shifted_matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1, precision=None,
                        preferred_element_type=None):
  r"""A 2-D convolution as one matrix product per kernel tap, a drop-in for flax's ``nn.Conv``.

  .. math:: y[b, i, j, :] = \sum_{u, v} x_{\mathrm{pad}}[b, s_h i + u, s_w j + v, :]\, W[u, v]

  With ``x`` NHWC and ``W`` HWIO (flax's layout). One agent's convolution this way is the same
  function as ``lax.conv_general_dilated``; K agents' (under ``vmap``) become
  ``kh·kw`` batched matrix products ``[K, B·H·W, C] × [K, C, D]`` instead of a grouped
  convolution. Products accumulate in float32. Dilated or grouped convolutions, which the models
  here do not use, go to ``lax.conv_general_dilated``.

  Example::

    conv = nn.Conv(16, (3, 3), conv_general_dilated=shifted_matmul_conv)
  """
  if not _plain_2d(lhs, lhs_dilation, rhs_dilation, feature_group_count):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision, preferred_element_type=preferred_element_type)
  # 2-D: flax passes channels-last numbers (NHWC, HWIO), which is what the taps compute.
  kh, kw = rhs.shape[:2]
  padding = _explicit(padding, lhs, rhs, window_strides)
  out = 0.0
  for view, tap in zip(_tap_views(lhs, kh, kw, window_strides, padding),
                       rhs.reshape(kh * kw, *rhs.shape[2:])):
    out = out + jnp.einsum("bhwc,cd->bhwd", view, tap, precision=precision,
                           preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def _plain_2d(lhs, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
  """Whether a convolution is 2-D, undilated and ungrouped: the ones the matmul forms compute."""
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  return lhs.ndim == 4 and feature_group_count == 1 and not dilated


def _explicit(padding, lhs, rhs, strides) -> tuple:
  """``padding`` as ``((top, bottom), (left, right))`` ints ('SAME'/'VALID' resolved)."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def _tap_views(x, kh: int, kw: int, strides, padding) -> list:
  """The ``kh·kw`` shifted, strided views of NHWC ``x`` (explicit ``padding``) that kernel taps
  ``(u, v)`` meet, tap-major (the order of ``W.reshape(kh * kw, C, D)``), each
  ``[B, Ho, Wo, C]``."""
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  (sh, sw), (b, hp, wp, c) = strides, x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  return [jax.lax.slice(x, (0, u, v, 0), (b, u + sh * (ho - 1) + 1, v + sw * (wo - 1) + 1, c),
                        (1, sh, sw, 1)) for u in range(kh) for v in range(kw)]


def _conv_cls(conv: str | Callable):
  """``nn.Conv``, or a partial of it computing with formulation ``conv`` (a name or a function)."""
  if callable(conv):
    return functools.partial(nn.Conv, conv_general_dilated=conv)
  if conv not in CONVS:
    raise ValueError(f"unknown conv {conv!r}; expected one of: {', '.join(CONVS)}, or a "
                     "function like lax.conv_general_dilated")
  if conv == "xla":
    return nn.Conv
  return functools.partial(nn.Conv, conv_general_dilated=shifted_matmul_conv)


class Model(NamedTuple):
  """A network as two pure functions; nothing outside this module knows it is flax."""

  init: Callable[[jax.Array], dict]  # key -> variables
  apply: Callable[[dict, jax.Array, bool], tuple[jax.Array, dict]]  # -> (logits, new_state)
  input_shape: tuple[int, ...]  # one example, e.g. (28, 28, 1)
  num_classes: int
  name: str = ""  # the wrapped module's class, for records


def _takes_train(module: nn.Module) -> bool:
  return "train" in inspect.signature(module.__call__).parameters


def from_flax(module: nn.Module, input_shape: Sequence[int], num_classes: int) -> Model:
  """Wraps a linen module whose ``__call__(x[, train])`` returns logits.

  Modules without a ``train`` argument are called as ``module(x)``. Every collection other than
  ``'params'`` is treated as state: mutable when ``train=True``, returned as given otherwise.
  There is no rng argument, so stochastic layers (dropout) are not supported.
  """
  input_shape = tuple(input_shape)
  takes_train = _takes_train(module)

  def call(variables, x, train, **kw):
    if takes_train:
      return module.apply(variables, x, train=train, **kw)
    return module.apply(variables, x, **kw)

  def init(key):
    x = jnp.zeros((1, *input_shape), jnp.float32)
    kw = {"train": False} if takes_train else {}
    return dict(module.init(key, x, **kw))

  def apply(variables, x, train):
    state = {k: v for k, v in variables.items() if k != "params"}
    if not (train and state):
      logits = call(variables, x, train)
      return logits.astype(jnp.float32), state
    logits, new_state = call(variables, x, train, mutable=list(state))
    return logits.astype(jnp.float32), dict(new_state)

  return Model(init, apply, input_shape, num_classes, type(module).__name__)


def _as_input(x, dtype):
  return jnp.asarray(x, dtype or jnp.float32)


def _batch_norm(train, dtype):
  # No axis_name, on purpose: statistics are per agent (see the module docstring).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)


class _BasicBlock(nn.Module):
  """Two 3x3 convs with an identity shortcut, or 1x1 conv + BN when the shape changes."""

  features: int
  strides: int = 1
  dtype: Dtype | None = None
  conv: str | Callable = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv_cls(self.conv), use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.kaiming_normal())
    bn = functools.partial(_batch_norm, train, self.dtype)
    y = conv(self.features, (3, 3), self.strides)(x)
    y = nn.relu(bn()(y))
    y = conv(self.features, (3, 3))(y)
    y = bn()(y)
    if x.shape != y.shape:
      x = bn()(conv(self.features, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """CIFAR ResNet-20 (He et al. 2016, arXiv:1512.03385 sec. 4.2): 272,474 params on 32x32x3.

  3x3 conv 16, then 3 stages of 3 basic blocks with 16/32/64 channels (stride 2 entering stages
  2 and 3), global average pool, dense. Shortcuts on a shape change are 1x1 conv + BN (option B).
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  dtype: Dtype | None = None
  conv: str | Callable = "xla"  # one of CONVS, or a conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool):
    x = _as_input(x, self.dtype)
    x = _conv_cls(self.conv)(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype,
                kernel_init=nn.initializers.kaiming_normal())(x)
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(width, strides, self.dtype, self.conv)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
  """Small CNN for 28x28x1, about 0.33M params: deliberately large for MNIST, cheap to run.

  conv 16 -> maxpool -> conv 32 -> maxpool -> conv 64 -> dense 96 -> dense classes, 3x3 SAME
  convs and relu. Pooling early keeps it at about 2.3M multiply-adds per 28x28 image (the
  parameters sit mostly in the first dense layer), so K agents train on a 2-core CPU.
  ``batch_norm=True`` puts BatchNorm (in place of the conv bias) after each conv.
  """

  num_classes: int = 10
  features: Sequence[int] = (16, 32, 64)
  hidden: int = 96
  batch_norm: bool = False
  dtype: Dtype | None = None
  conv: str | Callable = "xla"  # one of CONVS, or a conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool):
    x = _as_input(x, self.dtype)
    for i, width in enumerate(self.features):
      x = _conv_cls(self.conv)(width, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = _batch_norm(train, self.dtype)(x)
      x = nn.relu(x)
      if i < len(self.features) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ConvNet(nn.Module):
  """All-convolutional net with BatchNorm and global average pooling, for 28x28x1: parameters
  spread over its layers (none holds half of them), the shape of a ResNet without its depth.

  3x3 SAME convs without bias, each followed by BatchNorm and relu, with the given strides (default
  8, 16, 24, 20 channels at strides 2, 1, 2, 1: 14x14, then 7x7 maps), global average pool,
  dense classes. At the default: 9,346 parameters, the largest layer (the last conv) holding 46 %
  of them, and about 0.6M multiply-adds per 28x28 image.
  """

  num_classes: int = 10
  features: Sequence[int] = (8, 16, 24, 20)
  strides: Sequence[int] = (2, 1, 2, 1)
  dtype: Dtype | None = None
  conv: str | Callable = "xla"  # one of CONVS, or a conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool):
    if len(self.strides) != len(self.features):
      raise ValueError(f"ConvNet has {len(self.features)} features but {len(self.strides)} "
                       "strides: give one stride per conv")
    x = _as_input(x, self.dtype)
    for width, stride in zip(self.features, self.strides, strict=True):
      x = _conv_cls(self.conv)(width, (3, 3), stride, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(_batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class MLP(nn.Module):
  """Flatten, relu hidden layers (default 256, 256), dense; 269,322 params on 28x28x1."""

  num_classes: int = 10
  hidden: Sequence[int] = (256, 256)
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _as_input(x, self.dtype).reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


# name -> (module class, default input shape)
_MODELS = {
    "resnet20": (ResNet20, (32, 32, 3)),
    "cnn": (CNN, (28, 28, 1)),
    "convnet": (ConvNet, (28, 28, 1)),
    "mlp": (MLP, (28, 28, 1)),
}
NAMES = tuple(sorted(_MODELS))  # the names make() accepts
CONV_MODELS = ("cnn", "convnet", "resnet20")  # those with a ``conv`` option


def options(name: str) -> tuple[str, ...]:
  """The options :func:`make` passes to the named model's module (``config.model_options``)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(NAMES)}")
  return tuple(f.name for f in dataclasses.fields(_MODELS[name][0])
               if f.init and f.name not in ("num_classes", "parent", "name"))


def make(name: str, num_classes: int = 10, input_shape: Sequence[int] | None = None,
         **kw) -> Model:
  """The named model (``resnet20``, ``cnn``, ``convnet``, ``mlp``); ``kw`` go to its module
  constructor.

  Example::

    model = drt_jax.models.make("cnn", 10, input_shape=(28, 28, 1), dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0))           # float32 parameters
    logits, new_state = model.apply(variables, x, True)  # float32 logits [B, 10]
  """
  unknown = sorted(set(kw) - set(options(name)))
  if unknown:
    raise ValueError(f"model {name!r} takes no option {unknown[0]!r}; its options: "
                     f"{', '.join(options(name))}")
  cls, default_shape = _MODELS[name]
  module = cls(num_classes=num_classes, **kw)
  return from_flax(module, input_shape or default_shape, num_classes)
