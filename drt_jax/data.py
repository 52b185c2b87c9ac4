"""In-memory datasets, partitions across agents, and per-agent sampling inside the compiled step.

The training images live on the device once (not K copies; with agents sharded over devices each
device holds only its agents' examples, :func:`drt_jax.train.device_data`). Agent k owns a list of
training indices; the lists are padded to a common length ``[K, N]`` with their true lengths
``[K]``. Each step every agent draws its batch from its own list, without replacement within a
local epoch and in a fresh random order every epoch: positions ``t = step * B + b`` of agent k's
stream map to ``perm_e[t mod n_k]`` with ``e = t // n_k`` and ``perm_e`` a seeded permutation of
its valid slots. The batch is a pure function of (key, step), so a resumed run draws the same
batches.
"""

import operator
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


class Data(NamedTuple):
  """A classification dataset in host memory, optionally already split across agents.

  Images are ``[N, H, W, C]`` (uint8 or float); labels int ``[N]``. ``agent_indices`` is one
  array of training indices per agent (``None``: an IID split is drawn).
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  agent_indices: Sequence[np.ndarray] | None = None
  num_classes: int | None = None
  name: str = "in_memory"

  @property
  def classes(self) -> int:
    if self.num_classes is not None:
      return int(self.num_classes)
    return int(max(self.train_labels.max(), self.test_labels.max())) + 1


# Without any of these there is nothing to train or evaluate; the other fields have defaults.
REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")

# Float images are scanned for non-finite values up to this many values, all of them when the
# split is smaller: a corrupt conversion is caught in milliseconds whatever the dataset's size.
FINITE_SCAN = 1 << 20


def as_data(data) -> Data:
  """Accepts a :class:`Data` or a mapping with its field names, checked by :func:`validate`."""
  if isinstance(data, Mapping):
    unknown = sorted(set(data) - set(Data._fields))
    if unknown:
      raise ValueError(f"unknown data field {unknown[0]!r}; expected some of: "
                       f"{', '.join(Data._fields)}")
    missing = [f for f in REQUIRED if f not in data]
    if missing:
      raise ValueError(f"data lacks {missing[0]!r}; give {', '.join(REQUIRED)} (agent_indices "
                       "and num_classes are optional)")
    data = Data(**data)
  elif not isinstance(data, Data):
    raise TypeError(f"data must be drt_jax.data.Data or a mapping, got {type(data).__name__}")
  return validate(data)


def validate(d: Data, *, exact_partition: bool = False) -> Data:
  """``d`` with numpy arrays, or a ValueError of one line naming the field and the fix.

  Checks, before any work is spent on them:

  * images: ``[N, ...]`` with at least one axis per example, numeric (unsigned or signed integers,
    floats; not bool, complex, strings or objects), the same example shape in both splits, at
    least one example; float images finite (a bounded scan, :func:`first_non_finite`);
  * labels: 1-D, one per image, integer-typed (floats are refused even when whole: a float label
    usually means a mix-up, and the cast is the user's to make), ``>= 0``; below ``num_classes``
    when it is given (a positive int), else no test label above the largest training label, which
    would add a model output that no training example teaches;
  * ``agent_indices``: one non-empty 1-D integer array per agent (a boolean mask or floats are
    refused), inside ``[0, len(train_labels))``, without repeats within an agent (a repeat draws
    that example twice per local epoch, almost always a ``replace=True`` slip). With
    ``exact_partition`` an example held by several agents is logged as a warning: lists may
    overlap by design, but a run's saved partition and histograms read as an exact split.

  Integer images are not scanned, so the check of a 60,000-image uint8 set takes milliseconds.
  """
  arrays = {f: _as_array(f, getattr(d, f)) for f in REQUIRED}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    _check_images(f"{split}_images", images)
    _check_labels(f"{split}_labels", labels, f"{split}_images", len(images))
  train_x, test_x = arrays["train_images"], arrays["test_images"]
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ValueError(f"data.test_images examples have shape {test_x.shape[1:]} but "
                     f"data.train_images {train_x.shape[1:]}; give both splits the same example "
                     "shape")
  _check_classes(d.num_classes, arrays["train_labels"], arrays["test_labels"])
  for field in ("train_images", "test_images"):
    bad = first_non_finite(arrays[field])
    if bad is not None:
      raise ValueError(f"data.{field}[{bad}] holds a non-finite value (NaN or inf); drop or "
                       "repair that example, e.g. keep only rows where "
                       "np.isfinite(images).reshape(len(images), -1).all(1)")
  parts = d.agent_indices
  if parts is not None:
    parts = _check_agent_indices(parts, len(arrays["train_labels"]), exact_partition)
  return d._replace(agent_indices=parts, **arrays)


def _as_array(field: str, x) -> np.ndarray:
  if x is None:
    raise ValueError(f"data.{field} is missing; give {', '.join(REQUIRED)} as arrays")
  try:
    a = np.asarray(x)
  except (TypeError, ValueError):  # numpy refuses ragged nested lists
    raise ValueError(f"data.{field} ({type(x).__name__}) is not one rectangular array; stack "
                     "its examples into one numpy array of a single shape") from None
  if a.dtype == object:
    raise ValueError(f"data.{field} has dtype object (ragged or mixed entries); stack its "
                     "examples into one numeric numpy array")
  return a


def _check_images(field: str, x: np.ndarray) -> None:
  if x.ndim < 2:
    raise ValueError(f"data.{field} has shape {x.shape}; give a batch of examples, [N, H, W, C] "
                     "images or flat [N, D] features")
  if not len(x):
    raise ValueError(f"data.{field} holds no examples; give at least one")
  if not x[0].size:
    raise ValueError(f"data.{field} examples have shape {x.shape[1:]}, with no values; give at "
                     "least one value per example")
  if x.dtype == np.bool_:
    raise ValueError(f"data.{field} are booleans; give numbers, e.g. images.astype(np.uint8)")
  if not (np.issubdtype(x.dtype, np.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"data.{field} have dtype {x.dtype}; give numeric pixels (uint8, integers "
                     "or floats), e.g. images.astype(np.float32)")


def _check_labels(field: str, y: np.ndarray, images_field: str, n: int) -> None:
  if y.ndim != 1:
    fix = ("for one-hot labels pass labels.argmax(-1)" if y.ndim == 2 and y.shape[1] > 1
           else "pass labels.reshape(-1)")
    raise ValueError(f"data.{field} has shape {y.shape}; class ids must be 1-D [N]: {fix}")
  if len(y) != n:
    raise ValueError(f"data.{field} has {len(y)} entries but data.{images_field} has {n} "
                     "examples; give exactly one label per image")
  if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"data.{field} have dtype {y.dtype}; class ids must be integers 0..C-1 "
                     "(whole-number floats too are refused), e.g. labels.astype(np.int32)")
  if y.min() < 0:
    i = int(np.argmax(y < 0))
    raise ValueError(f"data.{field}[{i}] is {int(y[i])}; class ids must be 0..C-1: map the "
                     "classes to 0..C-1 first")


def _check_classes(num_classes, train_y: np.ndarray, test_y: np.ndarray) -> None:
  if num_classes is None:
    top = int(train_y.max())
    if test_y.max() > top:
      i = int(np.argmax(test_y > top))
      raise ValueError(f"data.test_labels[{i}] is class {int(test_y[i])} but data.train_labels "
                       f"go up to {top} only, so no training example would teach that output; "
                       "set data.num_classes or fix the test labels")
    return
  try:
    c = operator.index(num_classes)
  except TypeError:
    c = None
  if c is None or isinstance(num_classes, bool) or c < 1:
    raise ValueError(f"data.num_classes={num_classes!r}; give a positive int (the model's "
                     "outputs) or None to count the classes from the labels")
  for field, y in (("train_labels", train_y), ("test_labels", test_y)):
    if y.max() >= c:
      i = int(np.argmax(y >= c))
      raise ValueError(f"data.{field}[{i}] is class {int(y[i])} but data.num_classes={c}; "
                       f"raise num_classes to >= {int(y.max()) + 1} or fix the labels")


def first_non_finite(images: np.ndarray) -> int | None:
  """The index of the first example found to hold a NaN or inf, or None (integer images: None).

  Scans every value of a split of at most :data:`FINITE_SCAN` values; of a larger one the first
  examples and a seeded random sample of the others, :data:`FINITE_SCAN` values in all, so a
  corrupt conversion (usually whole examples or whole splits) is caught at a bounded cost.
  Whatever escapes the scan is left out of :func:`normalisation`, and an agent that trains on
  it diverges with its name in the error.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    return None
  n = len(images)
  budget = max(1, FINITE_SCAN // max(1, images[0].size))
  if n <= budget:
    rows, scanned = np.arange(n), images
  else:
    head = budget // 2
    rest = np.random.default_rng(0).integers(head, n, budget - head)
    rows = np.unique(np.concatenate([np.arange(head), rest]))
    scanned = images[rows]
  finite = np.isfinite(np.asarray(scanned).reshape(len(rows), -1)).all(axis=1)
  return None if finite.all() else int(rows[np.argmin(finite)])


def _check_agent_indices(parts, num_examples: int, exact_partition: bool) -> list[np.ndarray]:
  if getattr(parts, "ndim", 2) != 2:
    raise ValueError(f"data.agent_indices is a {parts.ndim}-D array; give one 1-D index array "
                     "per agent, e.g. a list [idx_0, ..., idx_{K-1}]")
  if isinstance(parts, (str, bytes, Mapping)) or not (isinstance(parts, Sequence)
                                                       or hasattr(parts, "ndim")):
    raise ValueError(f"data.agent_indices is a {type(parts).__name__}; give a list of 1-D index "
                     "arrays, one per agent")
  arrays = []
  for k, p in enumerate(parts):
    field = f"data.agent_indices[{k}]"
    try:
      a = np.asarray(p)
    except (TypeError, ValueError):
      raise ValueError(f"{field} is not an array of indices; give a 1-D integer array per "
                       "agent") from None
    if a.ndim != 1:
      raise ValueError(f"{field} has shape {a.shape}; each agent's indices must be one 1-D "
                       "array (agent_indices takes one per agent)")
    if not a.size:
      raise ValueError(f"{field} is empty: agent {k} has no training examples; every agent "
                       "needs at least one")
    if a.dtype == np.bool_:
      raise ValueError(f"{field} is a boolean mask; give the indices it selects, "
                       "np.flatnonzero(mask)")
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{field} has dtype {a.dtype}; give integer indices into the training "
                       "split, e.g. idx.astype(np.int64)")
    arrays.append(a)
  if not arrays:
    return arrays
  # One vectorised pass over all agents: K may be in the tens of thousands.
  sizes = np.array([len(a) for a in arrays])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  owner = np.repeat(np.arange(len(arrays)), sizes)
  flat = np.concatenate([a.astype(np.int64, copy=False) for a in arrays])
  outside = (flat < 0) | (flat >= num_examples)
  if outside.any():
    i = int(np.argmax(outside))
    k = int(owner[i])
    raise ValueError(f"data.agent_indices[{k}] holds index {arrays[k][i - starts[k]]}, outside "
                     f"[0, {num_examples}); index lists must point into the training split")
  keys = np.sort(owner * np.int64(num_examples) + flat)
  repeated = keys[1:] == keys[:-1]
  if repeated.any():
    k, example = divmod(int(keys[1:][repeated][0]), num_examples)
    raise ValueError(f"data.agent_indices[{k}] lists example {example} more than once; give each "
                     "agent distinct indices, e.g. np.unique(idx)")
  if exact_partition:
    held = np.bincount(flat, minlength=num_examples)
    shared = np.flatnonzero(held > 1)
    if shared.size:
      agents = owner[flat == shared[0]].tolist()
      logging.warning("data.agent_indices: %d training examples are held by more than one agent "
                      "(example %d by agents %s); fine if the lists overlap by design, else give "
                      "each example to one agent", shared.size, shared[0], agents)
  return arrays


def synthetic(num_train: int = 4096, num_test: int = 1024, num_classes: int = 10,
              shape: tuple[int, ...] = (28, 28, 1), separation: float = 0.1,
              seed: int = 0) -> Data:
  """A seeded synthetic image task: smooth random class prototypes plus unit pixel noise (uint8).

  ``separation`` scales the prototypes against the noise: smaller is harder.

  Small and offline, for tests and the built-in demo; not a benchmark.
  """
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(num_classes, 7, 7, shape[-1]))
  reps = (shape[0] + 6) // 7, (shape[1] + 6) // 7
  protos = np.kron(coarse, np.ones((1, *reps, 1)))[:, :shape[0], :shape[1]]

  def draw(n):
    labels = rng.integers(0, num_classes, n)
    x = separation * protos[labels] + rng.normal(size=(n, *shape))
    return np.clip(127.5 + 50.0 * x, 0, 255).astype(np.uint8), labels.astype(np.int32)

  train_x, train_y = draw(num_train)
  test_x, test_y = draw(num_test)
  return Data(train_x, train_y, test_x, test_y, None, num_classes, "synthetic")


def partition_iid(num_examples: int, num_agents: int, seed: int = 0) -> list[np.ndarray]:
  """A seeded random split of ``range(num_examples)`` into K near-equal parts."""
  if num_agents > num_examples:
    raise ValueError(f"K={num_agents} agents but only {num_examples} training examples; "
                     "use fewer agents or more data")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(p) for p in np.array_split(perm, num_agents)]


def pad_partition(parts: Sequence[np.ndarray], num_examples: int,
                  width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-agent index lists -> ``(idx int32[K, W], counts int32[K])``, padding with index 0.

  The width W (default :func:`padded_width`) is the largest list's length rounded up to a power of
  two (at most ``num_examples``), so that partitions drawn with other seeds usually share the
  padded shape and a sweep over seeds reuses the compiled step. A process that builds only some
  agents' rows passes those agents' lists and the width of all of them.
  """
  if width is None:
    width, _ = padded_width(parts, num_examples)
  counts = np.array([len(p) for p in parts], np.int32)
  if len(counts) and counts.max() > width:
    k = int(counts.argmax())
    raise ValueError(f"agent {k} has {counts[k]} examples, more than the index width {width}; "
                     "pass the width of the longest list (padded_width)")
  idx = np.zeros((len(parts), width), np.int32)
  for k, p in enumerate(parts):
    idx[k, :len(p)] = p
  return idx, counts


def padded_width(parts: Sequence[np.ndarray], num_examples: int) -> tuple[int, np.ndarray]:
  """``(W, counts int32[K])`` of :func:`pad_partition`, checking every list (one-line errors)."""
  counts = np.array([len(p) for p in parts], np.int32)
  if counts.min(initial=1) < 1:
    raise ValueError(f"agent {int(np.argmin(counts))} has no training examples; every agent "
                     "needs at least one")
  for k, p in enumerate(parts):
    p = np.asarray(p)
    if p.size and (p.min() < 0 or p.max() >= num_examples):
      raise ValueError(f"agent {k}'s indices fall outside [0, {num_examples}); index lists "
                       "must point into the training split")
  width = min(max(int(num_examples), int(counts.max())), 1 << int(counts.max() - 1).bit_length())
  return width, counts


def check_batch(counts: np.ndarray, batch_size: int) -> None:
  small = np.flatnonzero(counts < batch_size)
  if small.size:
    k = int(small[0])
    raise ValueError(f"batch_size={batch_size} exceeds agent {k}'s partition of {counts[k]} "
                     f"examples; lower batch_size to <= {int(counts.min())} or use fewer agents")


def _mix32(x):
  """MurmurHash3's 32-bit finaliser: a fast bijective scrambling of uint32 words."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


# Feistel rounds of the sampling permutation. Four left small domains strongly biased (n = 5:
# some orders ~9x as likely as others, chi-square p ~ 1e-117 over 20,000 epochs); ten, as
# NIST's FF1 format-preserving encryption uses, pass a uniformity test (tests/pipeline_test.py).
ROUNDS = 10


def permute(i, n, round_keys):
  """Position ``i`` of a keyed pseudo-random permutation of ``[0, n)``, in O(1) per position.

  A balanced Feistel network on ``2h`` bits (``4^h >= n``) whose round function is a keyed
  ``_mix32``, restricted to ``[0, n)`` by cycle walking (re-encrypting until the value falls in
  range; fewer than four passes on average since ``4^h < 4n``). Every ``(n, round_keys)`` gives a
  bijection of ``[0, n)``, so an epoch visits each slot exactly once without sorting all ``n``.

  Args:
    i: uint32 positions in ``[0, n)``.
    n: the domain size (a traced scalar is fine), ``1 <= n < 2**31``.
    round_keys: uint32 ``[R]``, one key per Feistel round (:data:`ROUNDS` for uniform orders
      on small domains).
  """
  n = jnp.asarray(n, jnp.uint32)
  bits = jnp.uint32(32) - jax.lax.clz(jnp.maximum(n - 1, 1))  # bits to write n - 1
  half = (bits + 1) // 2
  mask = (jnp.uint32(1) << half) - 1

  def encrypt(x):
    left, right = x >> half, x & mask
    for r in range(round_keys.shape[0]):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  y = encrypt(i.astype(jnp.uint32))
  y = jax.lax.while_loop(lambda y: jnp.any(y >= n),
                         lambda y: jnp.where(y >= n, encrypt(y), y), y)
  return y.astype(jnp.int32)


def sample_indices(key, step, idx_KxN, counts_K, batch_size: int):
  """Each agent's batch of training indices at ``step``: ``int32[K, batch_size]``.

  Agent k's stream position ``t = step * B + b`` is slot ``perm_e(t mod n_k)`` of its list, with
  ``e = t // n_k`` its local epoch and ``perm_e`` a keyed permutation of ``[0, n_k)``
  (:func:`permute`, keyed by ``(key, k, e)``): without replacement within an epoch, a fresh order
  every epoch, O(B) work per step whatever the partition size. Requires ``batch_size <= counts``
  (checked on the host by :func:`check_batch`).
  """
  keys = jax.random.split(key, idx_KxN.shape[0])

  def one(key_k, idx, count):
    t = step * batch_size + jnp.arange(batch_size)
    epoch, offset = t // count, t % count
    round_keys = jax.vmap(lambda e: jax.random.bits(jax.random.fold_in(key_k, e), (ROUNDS,),
                                                    jnp.uint32))(epoch)
    slot = jax.vmap(lambda o, rk: permute(o, count, rk))(offset, round_keys)
    return idx[slot]

  return jax.vmap(one)(keys, idx_KxN, counts_K)


AUGMENTATIONS = ("none", "crop_flip")


def augmentation_for(name: str, dataset: str) -> str:
  """The concrete augmentation ``name`` stands for: ``auto`` is ``crop_flip`` for CIFAR only.

  SVHN and the MNIST family are not flipped: a mirrored digit is another symbol.
  """
  if name != "auto":
    return name
  return "crop_flip" if dataset.split("/", 1)[0] in ("cifar10", "cifar100") else "none"


def crop_flip(key, images, pad: int = 4):
  """Random crop after zero padding by ``pad`` pixels, and a random horizontal flip.

  The standard CIFAR augmentation (He et al. 2016, "Deep residual learning for image
  recognition", arXiv:1512.03385, Sec. 4.2), done on the device inside the compiled step.
  ``images`` is ``[K, B, H, W, C]`` in storage scale (padding is black); ``key`` is split into one
  key per agent and image, so every agent draws its own crops.
  """
  k_count, batch, height, width = images.shape[:4]
  keys = jax.random.split(key, (k_count, batch))

  def one(key, image):
    k_y, k_x, k_f = jax.random.split(key, 3)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k_y, (), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (), 0, 2 * pad + 1)
    out = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    return jnp.where(jax.random.bernoulli(k_f), out[:, ::-1], out)

  del height, width
  return jax.vmap(jax.vmap(one))(keys, images)


def augment(kind: str, key, images):
  """Applies augmentation ``kind`` (one of :data:`AUGMENTATIONS`) to ``[K, B, H, W, C]`` images."""
  if kind == "none":
    return images
  if kind == "crop_flip":
    return crop_flip(key, images)
  raise ValueError(f"unknown augmentation {kind!r}; expected one of: {', '.join(AUGMENTATIONS)}")


def normalisation(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (in the images' own scale) of a training set.

  Non-finite pixels of float images (those that escape :func:`validate`'s bounded scan) are left
  out: a corrupt example then shows up as the divergence of the agent holding it (the trainer
  names it) instead of NaN statistics for all.
  """
  flat = images.reshape(-1, images.shape[-1]).astype(np.float64)
  mean, std = np.mean, np.std
  if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(flat)):
    flat = np.where(np.isfinite(flat), flat, np.nan)
    mean, std = np.nanmean, np.nanstd
  return mean(flat, axis=0).astype(np.float32), np.maximum(std(flat, axis=0), 1e-6).astype(
      np.float32)


def normalise(x, mean, std):
  """Images in float32 with the training set's per-channel statistics (:func:`normalisation`)."""
  return (x.astype(jnp.float32) - mean) / std
