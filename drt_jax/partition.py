"""Splits of a training set across K agents: IID, Dirichlet label skew, and label shards.

A partition is a list of K sorted int arrays, ``parts[k]`` holding agent k's training indices.
Every kind returns an exact partition of ``range(N)``: each training index belongs to exactly one
agent, and every agent holds at least ``min_per_agent`` examples. All randomness comes from
``np.random.default_rng(seed)``, so the same (labels, K, kind, parameters, seed) gives the same
split on any machine; the split is drawn on the host once, saved with the run (:func:`save`), and
padded for the device by :func:`drt_jax.data.pad_partition`.

Kinds (``make(kind, labels, num_agents, ...)``):

* ``iid`` — a random near-equal split (sizes ``floor(N/K)`` or ``ceil(N/K)``), via
  :func:`drt_jax.data.partition_iid`.
* ``dirichlet`` — label skew after Hsu, Qi & Brown 2019, "Measuring the effects of non-identical
  data distribution for federated visual classification" (arXiv:1909.06335), in the per-class form
  of Yurochkin et al. 2019 (arXiv:1905.12022): for every class c draw ``p_c ~ Dir(alpha * 1_K)``
  over the agents and cut c's shuffled indices at ``floor(cumsum(p_c) * n_c)``. Large ``alpha``
  gives near-IID label histograms, small ``alpha`` near single-class agents. The minimum per agent
  is enforced by redrawing all proportions (at most ``_DIRICHLET_TRIES`` draws in all, from the
  same seeded generator; the first draw that meets the minimum is kept) and, if none does, by
  keeping the first draw and moving to each short agent random examples of the currently largest
  agent's most frequent class until it reaches the minimum (a donor never drops below the
  minimum itself), so topped-up agents stay label-skewed.
* ``shards`` — label shards after McMahan et al. 2017, "Communication-efficient learning of deep
  networks from decentralized data" (arXiv:1602.05629): sort the indices by label (shuffled
  within each class), cut the sorted list into ``K * classes_per_agent`` contiguous shards in a
  random order, and give every agent ``classes_per_agent`` of them, so each agent sees about
  ``classes_per_agent`` classes. When N does not divide evenly, the ``N mod K`` leftover examples
  go one each to randomly chosen agents and each agent's share is split into shards that differ
  by at most one example; agent sizes are therefore ``floor(N/K)`` or ``ceil(N/K)``, as for
  ``iid``. A shard that straddles a class boundary carries two classes (as in the paper with
  MNIST's unequal classes); when the class sizes are multiples of the shard size every shard is
  single-class and each agent sees at most ``classes_per_agent`` classes.

The default minimum per agent is ``max(1, min(10, N // (2 * K)))``: ten examples (enough for a
small batch), lowered to half the equal share when data are scarce, and never zero, since an empty
agent cannot sample a batch.
"""

import operator
import os

import numpy as np

from drt_jax import data

KINDS = ("iid", "dirichlet", "shards")

_DIRICHLET_TRIES = 100
_KEY = "agent_{:04d}"


def default_min_per_agent(num_examples: int, num_agents: int) -> int:
  """Ten examples per agent, or half the equal share ``N // (2K)`` when smaller; at least one."""
  return max(1, min(10, num_examples // (2 * num_agents)))


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}; "
                     "pass the training labels, e.g. data.train_labels")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}; "
                     "cast them with labels.astype(np.int64)")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be non-negative class ids, found {int(labels.min())}; "
                     "map classes to 0..C-1 first")
  return labels.astype(np.int64)


def make(kind: str, labels, num_agents: int, *, seed: int = 0, alpha: float = 0.5,
         classes_per_agent: int = 2, min_per_agent: int | None = None) -> list[np.ndarray]:
  """Splits ``range(len(labels))`` across ``num_agents`` agents; one sorted index array each.

  ``alpha`` is used by ``dirichlet`` only and ``classes_per_agent`` by ``shards`` only;
  ``min_per_agent`` (default :func:`default_min_per_agent`) is honoured by every kind.

  Example::

    parts = drt_jax.partition.make("dirichlet", d.train_labels, 16, alpha=0.3, seed=0)
    hist = drt_jax.partition.label_histogram(parts, d.train_labels, 10)  # [16, 10] counts
  """
  if kind not in KINDS:
    raise ValueError(f"unknown partition kind {kind!r}; use one of: {', '.join(KINDS)}")
  labels = _check_labels(labels)
  n = labels.size
  k_count = operator.index(num_agents)
  if k_count < 1:
    raise ValueError(f"num_agents={k_count}; there must be at least one agent")
  if k_count > n:
    raise ValueError(f"K={k_count} agents but only {n} training examples; "
                     "use fewer agents or more data")
  if min_per_agent is None:
    min_per_agent = default_min_per_agent(n, k_count)
  min_per_agent = operator.index(min_per_agent)
  if min_per_agent < 1:
    raise ValueError(f"min_per_agent={min_per_agent}; every agent needs at least one example, "
                     "so use min_per_agent >= 1")
  if n < k_count * min_per_agent:
    raise ValueError(f"cannot give each of K={k_count} agents min_per_agent={min_per_agent} "
                     f"examples out of N={n}; lower min_per_agent to <= {n // k_count} or use "
                     "fewer agents")

  if kind == "dirichlet":
    alpha = float(alpha)
    if not (np.isfinite(alpha) and alpha > 0):
      raise ValueError(f"alpha={alpha} for the Dirichlet partition; use a finite alpha > 0 "
                       "(small: label skew, large: near IID)")
    return _dirichlet(labels, k_count, alpha, min_per_agent, np.random.default_rng(seed))
  if kind == "shards":
    num_classes = int(np.unique(labels).size)
    c = operator.index(classes_per_agent)
    if not 1 <= c <= num_classes:
      raise ValueError(f"classes_per_agent={c} but the labels hold {num_classes} classes; "
                       f"use 1 <= classes_per_agent <= {num_classes}")
    return _shards(labels, k_count, c, np.random.default_rng(seed))
  return data.partition_iid(n, k_count, seed)


def _parts_from_owner(owner: np.ndarray, num_agents: int) -> list[np.ndarray]:
  """``owner[i]`` = agent of example i -> per-agent sorted index arrays."""
  order = np.argsort(owner, kind="stable")  # stable: indices stay sorted within an agent
  sizes = np.bincount(owner, minlength=num_agents)
  return np.split(order, np.cumsum(sizes)[:-1])


def _dirichlet(labels, num_agents, alpha, min_per_agent, rng) -> list[np.ndarray]:
  classes = np.unique(labels)
  members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  sizes_c = np.array([m.size for m in members])

  def draw():
    counts = np.empty((classes.size, num_agents), np.int64)
    for i, n_c in enumerate(sizes_c):
      p = rng.dirichlet(np.full(num_agents, alpha))
      if not (np.all(np.isfinite(p)) and p.sum() > 0):  # guard against underflow at tiny alpha
        p = np.eye(num_agents)[rng.integers(num_agents)]
      cuts = np.clip((np.cumsum(p)[:-1] * n_c).astype(np.int64), 0, n_c)
      counts[i] = np.diff(np.concatenate([[0], np.maximum.accumulate(cuts), [n_c]]))
    return counts

  # Keep the first draw that meets the minimum, else the first draw (topped up below): choosing
  # the "least short" failing draw would bias tiny alpha towards split classes.
  first = counts = draw()
  for _ in range(_DIRICHLET_TRIES - 1):
    if counts.sum(0).min() >= min_per_agent:
      break
    counts = draw()
  best = counts if counts.sum(0).min() >= min_per_agent else first

  owner = np.empty(labels.size, np.int64)
  for m, row in zip(members, best):
    owner[m] = np.repeat(np.arange(num_agents), row)

  # Top up short agents from the largest agent, with random examples of that agent's most
  # frequent class so the recipient stays label-skewed. N >= K * min was checked, so the surplus
  # above the minimum always covers the deficit.
  sizes = np.bincount(owner, minlength=num_agents)
  for k in np.flatnonzero(sizes < min_per_agent):
    while sizes[k] < min_per_agent:
      j = int(np.argmax(sizes))
      mine = owner == j
      top = np.argmax(np.bincount(labels[mine]))
      pool = np.flatnonzero(mine & (labels == top))
      take = min(min_per_agent - sizes[k], sizes[j] - min_per_agent, pool.size)
      moved = rng.choice(pool, size=take, replace=False)
      owner[moved] = k
      sizes[j] -= take
      sizes[k] += take
  return _parts_from_owner(owner, num_agents)


def _shards(labels, num_agents, classes_per_agent, rng) -> list[np.ndarray]:
  n = labels.size
  perm = rng.permutation(n)
  by_label = perm[np.argsort(labels[perm], kind="stable")]  # sorted by label, shuffled within
  share = np.full(num_agents, n // num_agents)
  share[rng.permutation(num_agents)[:n % num_agents]] += 1  # leftover: one each, random agents
  # Agent k's share in classes_per_agent near-equal shards; shard s belongs to agent s // c.
  shard_size = (share[:, None] // classes_per_agent
                + (np.arange(classes_per_agent) < share[:, None] % classes_per_agent))
  shard_owner = np.repeat(np.arange(num_agents), classes_per_agent)
  order = rng.permutation(num_agents * classes_per_agent)  # where each shard sits in by_label
  owner = np.empty(n, np.int64)
  owner[by_label] = np.repeat(shard_owner[order], shard_size.ravel()[order])
  return _parts_from_owner(owner, num_agents)


def label_histogram(parts, labels, num_classes: int) -> np.ndarray:
  """Per-agent label counts ``int64[K, C]``: ``hist[k, c]`` examples of class c at agent k."""
  labels = _check_labels(labels)
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"label {int(labels.max())} is outside num_classes={num_classes}; "
                     f"pass num_classes >= {int(labels.max()) + 1}")
  return np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes)
                   for p in parts]).astype(np.int64)


def plot_histogram(hist, path, title: str | None = None):
  """Stacked bars of each agent's label counts, one colour per class; writes a PNG to ``path``.

  The legend lists the classes when there are at most 20 of them (beyond that colours come from a
  continuous map and a colour bar stands in for the legend).
  """
  import matplotlib  # noqa: PLC0415 -- plotting is optional, loaded on use
  from matplotlib.figure import Figure  # noqa: PLC0415

  hist = np.asarray(hist)
  if hist.ndim != 2:
    raise ValueError(f"hist must be [K, C] label counts, got shape {hist.shape}; "
                     "build it with label_histogram(parts, labels, num_classes)")
  k_count, num_classes = hist.shape
  if num_classes <= 10:
    colours = matplotlib.colormaps["tab10"].colors[:num_classes]
  elif num_classes <= 20:
    colours = matplotlib.colormaps["tab20"].colors[:num_classes]
  else:
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 1, num_classes))
  fig = Figure(figsize=(min(12.0, 4.0 + 0.12 * k_count), 3.6))
  ax = fig.subplots()
  x = np.arange(k_count)
  bottom = np.zeros(k_count)
  width = 0.8 if k_count <= 64 else 1.0
  for c in range(num_classes):
    ax.bar(x, hist[:, c], width, bottom=bottom, color=colours[c], label=str(c), linewidth=0)
    bottom = bottom + hist[:, c]
  ax.set_xlabel("agent")
  ax.set_ylabel("examples")
  ax.set_xlim(-0.6, k_count - 0.4)
  ax.set_ylim(0, 1.05 * max(1, bottom.max()))
  ax.set_title(title or f"label histogram per agent (K={k_count}, C={num_classes})", fontsize=10)
  if num_classes <= 20:
    ax.legend(title="class", fontsize=7, title_fontsize=8, ncols=1 if num_classes <= 10 else 2,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  else:
    mappable = matplotlib.cm.ScalarMappable(cmap="viridis",
                                            norm=matplotlib.colors.Normalize(0, num_classes - 1))
    fig.colorbar(mappable, ax=ax, label="class")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def save(parts, path):
  """Writes the partition to ``path`` (compressed npz, keys ``agent_0000``, ...); returns path."""
  arrays = {}
  for k, p in enumerate(parts):
    p = np.asarray(p)
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
      raise ValueError(f"agent {k}'s entry is not a 1-D integer index array (shape {p.shape}, "
                       f"dtype {p.dtype}); save the list returned by partition.make")
    arrays[_KEY.format(k)] = p
  with open(os.fspath(path), "wb") as f:  # a file object: numpy must not append ".npz"
    np.savez_compressed(f, **arrays)
  return path


def load(path) -> list[np.ndarray]:
  """Reads a partition written by :func:`save`, in agent order."""
  with np.load(os.fspath(path)) as z:
    keys = list(z.files)
    bad = [key for key in keys if not (key.startswith("agent_") and key[6:].isdigit())]
    if bad:
      raise ValueError(f"{os.fspath(path)} holds {bad[0]!r}, not a partition key like "
                       "'agent_0000'; pass a file written by partition.save")
    keys.sort(key=lambda key: int(key[6:]))
    if [int(key[6:]) for key in keys] != list(range(len(keys))):
      raise ValueError(f"{os.fspath(path)} lacks some agents (keys {keys[:3]}...); pass a "
                       "complete file written by partition.save")
    return [z[key] for key in keys]
