"""The data of one run: loaded, held out, split over the agents and placed on the devices.

``load_data`` reads ``config.dataset``; ``prepare_data`` holds out the validation split and
partitions the rest (:class:`Prepared`, on the host); ``device_data`` places the training examples
and the agents' padded index lists where the compiled step reads them (:class:`DeviceData`);
``eval_set`` pads a held-out split into fixed-size batches (:class:`EvalSet`).
"""

import hashlib
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from drt_jax import backends, datasets, partition
from drt_jax import data as data_lib


class DeviceData(NamedTuple):
  """The training examples on device, and the agents' padded index lists into them.

  With the ``shard`` back-end each device holds only the examples of its own agents: ``images``
  and ``labels`` stack one block of M rows per device (split over the agents mesh) and ``idx``
  holds positions within the agent's device block. Otherwise they hold the whole training split
  once (M = N) and ``idx`` its example indices. Build it with :func:`device_data` for the
  back-end of the step that reads it: the two layouts have the same shapes on one device.
  """

  images: jax.Array  # [n_blocks * M, ...] as stored (uint8 or float)
  labels: jax.Array  # int32[n_blocks * M]
  idx: jax.Array  # int32[K, Nmax]
  counts: jax.Array  # int32[K]
  mean: jax.Array  # per-channel normalisation
  std: jax.Array


class EvalSet(NamedTuple):
  """A held-out split in fixed-size batches, the last one padded (``mask`` says what counts)."""

  images: jax.Array  # [num_batches, batch, ...]
  labels: jax.Array  # int32[num_batches, batch]
  mask: jax.Array  # bool[num_batches, batch]


def eval_set(images, labels, n: int, batch: int, seed: int) -> EvalSet:
  if n and n < len(labels):
    pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    images, labels = images[pick], labels[pick]
  batch = min(batch, len(labels))
  num_batches = -(-len(labels) // batch)
  pad = num_batches * batch - len(labels)
  mask = np.concatenate([np.ones(len(labels), bool), np.zeros(pad, bool)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  shape = (num_batches, batch)
  return EvalSet(images.reshape(shape + images.shape[1:]), labels.reshape(shape).astype(np.int32),
                 mask.reshape(shape))


def load_data(c: ml_collections.ConfigDict) -> data_lib.Data:
  """The dataset ``config.dataset`` names, in host memory (``synthetic`` or a tfds name)."""
  if c.dataset == "synthetic":
    return data_lib.synthetic(seed=c.seed)
  return datasets.load(c.dataset, data_dir=c.data_dir or None, download=c.download,
                       source=c.data_source)


class Prepared(NamedTuple):
  """The data of one run, on the host: what trains, who holds what, and the held-out split."""

  data: data_lib.Data  # training split without the validation examples
  parts: list  # one sorted index array into data.train_labels per agent
  validation: tuple | None  # (images, labels) or None


def prepare_data(c: ml_collections.ConfigDict, d: data_lib.Data) -> Prepared:
  """Holds out the validation split and partitions the rest across the agents (config fields
  ``validation_fraction``, ``partition``, ``dirichlet_alpha``, ``classes_per_agent``,
  ``min_per_agent``), unless ``d`` brings its own ``agent_indices``. Checks the data first
  (:func:`drt_jax.data.validate`; loaded data meet it here, in-memory data in ``as_data`` too, and
  agents' own lists that share examples are logged as a warning) and then that every agent can
  fill a batch. Raises ValueError with one line naming the problem.
  """
  d = data_lib.validate(d, exact_partition=True)
  validation = None
  if c.validation_fraction > 0:
    if d.agent_indices is not None:
      raise ValueError("config.validation_fraction > 0 but the data bring their own "
                       "agent_indices (into the full training split); hold out the validation "
                       "examples before partitioning, or set validation_fraction=0")
    d, validation = datasets.validation_split(d, c.validation_fraction, seed=c.seed)
  parts = d.agent_indices
  if parts is None:
    n = len(d.train_labels)
    if c.num_agents > n:
      raise ValueError(f"num_agents={c.num_agents} but {d.name} has only {n} training examples; "
                       "use fewer agents or more data")
    minimum = c.min_per_agent or max(partition.default_min_per_agent(n, c.num_agents),
                                     min(c.batch_size, n // c.num_agents))
    parts = partition.make(c.partition, d.train_labels, c.num_agents, seed=c.seed,
                           alpha=c.dirichlet_alpha, classes_per_agent=c.classes_per_agent,
                           min_per_agent=minimum)
  parts = [np.asarray(p) for p in parts]
  if len(parts) != c.num_agents:
    raise ValueError(f"data has index lists for {len(parts)} agents but config.num_agents="
                     f"{c.num_agents}; give one index array per agent")
  counts = np.array([len(p) for p in parts])
  data_lib.check_batch(counts, c.batch_size)
  return Prepared(d, parts, validation)


def device_data(d: data_lib.Data, parts, backend: str = "vmap") -> DeviceData:
  """The training examples on the device with the agents' padded index lists (:class:`DeviceData`).

  With the ``shard`` back-end each device holds only the union of its agents' examples, padded to
  the largest device's count, and each process builds only its own devices' blocks and agents'
  lists; the normalisation (of the whole split, so results do not depend on the devices) is
  replicated. Otherwise the whole split is on the device once.
  """
  k_count, n_examples = len(parts), len(d.train_labels)
  width, counts = data_lib.padded_width(parts, n_examples)
  groups = backends.agent_blocks(backend, k_count)
  if len(groups) == 1:
    held = [np.arange(n_examples)]
  else:
    held = [np.unique(np.concatenate([np.asarray(p) for p in parts[a:b]])) for a, b in groups]
  m = max(len(h) for h in held)
  per = groups[0][1] - groups[0][0]
  labels = np.asarray(d.train_labels, np.int32)

  def rows(start, stop):
    local = [np.searchsorted(held[start // per], p) for p in parts[start:stop]]
    return data_lib.pad_partition(local, m, width=width)[0]

  def block(array):
    def one(j):
      if len(groups) == 1:
        return array
      pad = np.zeros((m - len(held[j]), *array.shape[1:]), array.dtype)
      return np.concatenate([array[held[j]], pad])

    return backends.device_blocks(one, (m, *array.shape[1:]), backend, k_count)

  mean, std = data_lib.normalisation(d.train_images)
  stats = backends.place(dict(mean=mean, std=std), backend, k_count, stacked=False)
  return DeviceData(images=block(d.train_images), labels=block(labels),
                    idx=backends.from_agent_rows(rows, (k_count, width), backend, k_count),
                    counts=backends.from_agent_rows(lambda a, b: counts[a:b], (k_count,),
                                                    backend, k_count),
                    **stats)


def data_digest(prepared: Prepared) -> str:
  """Names the training data, its shapes and a hash of its images, labels and agents' lists."""
  d = prepared.data
  h = hashlib.sha256()
  for a in (d.train_images, d.test_images, d.train_labels, d.test_labels, *prepared.parts):
    h.update(np.ascontiguousarray(a).tobytes())
  return f"{d.name} {d.train_images.shape} {d.test_images.shape} {h.hexdigest()}"


def device_bytes(tree) -> int:
  """Bytes that the arrays of ``tree`` occupy on this process's devices (every replica counted)."""
  return sum(bytes_per_device(tree).values())


def bytes_per_device(tree) -> dict:
  """Bytes that the arrays of ``tree`` occupy on each of this process's devices."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out




def eval_sets(c: ml_collections.ConfigDict, prepared: Prepared) -> dict[str, EvalSet]:
  """The held-out sets a run evaluates: ``test``, a fixed ``train`` subset (for the
  generalization gap), ``val`` when a validation split is held out, and ``test_full`` (the whole
  test split, at the last step only) with ``config.final_full_test``."""
  d = prepared.data
  sets = {"test": eval_set(d.test_images, d.test_labels, c.eval_examples, c.eval_batch_size,
                           c.seed),
          "train": eval_set(d.train_images, d.train_labels, c.train_eval_examples,
                            c.eval_batch_size, c.seed + 1)}
  if prepared.validation is not None:
    sets["val"] = eval_set(*prepared.validation, c.eval_examples, c.eval_batch_size, c.seed + 2)
  if c.final_full_test:  # evaluated at the last step only (see FINAL_SETS)
    sets["test_full"] = eval_set(d.test_images, d.test_labels, 0, c.eval_batch_size, c.seed)
  return sets


FINAL_SETS = ("test_full",)  # the evaluation sets of the last step only


def sets_at(c: ml_collections.ConfigDict, step: int, names) -> list[str]:
  """The evaluation sets of ``names`` that an evaluation at ``step`` computes."""
  return [n for n in names if n not in FINAL_SETS or step == c.num_steps]
