"""Tests for drt_jax.partition: cover, seeding, minimum, skew, plot, save/load and errors."""

import os
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from drt_jax import data, partition

_NUM_CLASSES = 10
_SIZES = (1, 4, 16, 64)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(n: int = 6000, seed: int = 0) -> np.ndarray:
  """Unbalanced synthetic labels: class c is drawn with probability proportional to 1 + c/9."""
  w = np.linspace(1.0, 2.0, _NUM_CLASSES)
  return np.random.default_rng(seed).choice(_NUM_CLASSES, n, p=w / w.sum())


def _kind_size_cases():
  return [(f"{kind}_{k}", kind, k) for kind in partition.KINDS for k in _SIZES]


def _dominant_share(hist: np.ndarray) -> np.ndarray:
  return hist.max(axis=1) / hist.sum(axis=1)


class PartitionTest(parameterized.TestCase):

  @parameterized.named_parameters(*_kind_size_cases())
  def test_exact_cover_sorted_and_minimum(self, kind, k_count):
    labels = _labels()
    parts = partition.make(kind, labels, k_count, seed=1)
    self.assertLen(parts, k_count)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    for p in parts:
      self.assertTrue(np.issubdtype(p.dtype, np.integer))
      self.assertTrue(np.all(np.diff(p) > 0))
    minimum = partition.default_min_per_agent(labels.size, k_count)
    self.assertGreaterEqual(min(len(p) for p in parts), minimum)
    data.pad_partition(parts, labels.size)  # the device path accepts it

  def test_pad_partition_refuses_a_width_too_small(self):
    parts = [np.arange(5), np.arange(5, 8)]
    with self.assertRaisesRegex(ValueError, "agent 0 has 5 examples, more than the index width 4"):
      data.pad_partition(parts, 8, width=4)

  @parameterized.named_parameters(*_kind_size_cases())
  def test_seeded(self, kind, k_count):
    labels = _labels()
    a = partition.make(kind, labels, k_count, seed=3)
    b = partition.make(kind, labels, k_count, seed=3)
    for pa, pb in zip(a, b, strict=True):
      np.testing.assert_array_equal(pa, pb)
    if k_count > 1:
      c = partition.make(kind, labels, k_count, seed=4)
      self.assertFalse(all(np.array_equal(pa, pc) for pa, pc in zip(a, c)))

  @parameterized.named_parameters(("redraw", 0.5, 16, 200), ("top_up", 1e-3, 64, 60),
                                  ("top_up_few_agents", 1e-3, 16, 300))
  def test_dirichlet_minimum_per_agent(self, alpha, k_count, minimum):
    labels = _labels()
    for seed in range(3):
      parts = partition.make("dirichlet", labels, k_count, alpha=alpha, seed=seed,
                             min_per_agent=minimum)
      np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
      self.assertGreaterEqual(min(len(p) for p in parts), minimum)

  def test_minimum_met_exactly(self):
    labels = _labels(640)
    for kind in partition.KINDS:
      parts = partition.make(kind, labels, 64, min_per_agent=10, alpha=0.1)
      self.assertEqual([len(p) for p in parts], [10] * 64)

  def test_dirichlet_huge_alpha_is_near_iid(self):
    labels = _labels(20000)
    global_dist = np.bincount(labels, minlength=_NUM_CLASSES) / labels.size
    parts = partition.make("dirichlet", labels, 8, alpha=1e4, seed=0)
    hist = partition.label_histogram(parts, labels, _NUM_CLASSES)
    tv = 0.5 * np.abs(hist / hist.sum(1, keepdims=True) - global_dist).sum(1)
    self.assertLess(tv.max(), 0.1)

  @parameterized.parameters(16, 32)
  def test_dirichlet_tiny_alpha_is_near_single_class(self, k_count):
    # K >= C: with fewer agents than classes some agent must hold several classes.
    labels = _labels(20000)
    shares = []
    for seed in range(4):
      parts = partition.make("dirichlet", labels, k_count, alpha=1e-3, seed=seed)
      shares.append(_dominant_share(partition.label_histogram(parts, labels, _NUM_CLASSES)))
    self.assertGreaterEqual(np.mean(shares), 0.9)

  def test_dirichlet_skew_grows_as_alpha_shrinks(self):
    labels = _labels(20000)
    means = []
    for alpha in (100.0, 1.0, 0.01):
      parts = partition.make("dirichlet", labels, 8, alpha=alpha, seed=0)
      means.append(_dominant_share(partition.label_histogram(parts, labels, _NUM_CLASSES)).mean())
    self.assertLess(means[0], means[1])
    self.assertLess(means[1], means[2])

  @parameterized.parameters(5, 10, 20, 30)
  def test_shards_divisible_gives_at_most_c_classes(self, k_count):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(_NUM_CLASSES), 600))
    for seed in range(3):
      parts = partition.make("shards", labels, k_count, classes_per_agent=2, seed=seed)
      hist = partition.label_histogram(parts, labels, _NUM_CLASSES)
      self.assertLessEqual((hist > 0).sum(1).max(), 2)
      np.testing.assert_array_equal(hist.sum(1), 6000 // k_count)

  @parameterized.parameters((16, 1), (16, 2), (64, 2), (64, 3))
  def test_shards_uneven_classes(self, k_count, c):
    # Shards no larger than the smallest class straddle at most one class boundary each.
    labels = _labels()
    parts = partition.make("shards", labels, k_count, classes_per_agent=c, seed=2)
    hist = partition.label_histogram(parts, labels, _NUM_CLASSES)
    self.assertLessEqual(6000 / (k_count * c), np.bincount(labels).min())
    distinct = (hist > 0).sum(1)
    self.assertLessEqual(distinct.max(), 2 * c)
    self.assertLessEqual(distinct.mean(), c + 1)
    sizes = hist.sum(1)
    self.assertLessEqual(sizes.max() - sizes.min(), 1)

  def test_iid_matches_data_module(self):
    parts = partition.make("iid", _labels(), 16, seed=5)
    for a, b in zip(parts, data.partition_iid(6000, 16, 5), strict=True):
      np.testing.assert_array_equal(a, b)

  def test_label_histogram_sums_to_counts(self):
    labels = _labels()
    parts = partition.make("dirichlet", labels, 16, alpha=0.3, seed=0)
    hist = partition.label_histogram(parts, labels, _NUM_CLASSES)
    self.assertEqual(hist.shape, (16, _NUM_CLASSES))
    np.testing.assert_array_equal(hist.sum(1), [len(p) for p in parts])
    np.testing.assert_array_equal(hist.sum(0), np.bincount(labels, minlength=_NUM_CLASSES))

  @parameterized.parameters((16, 10), (64, 10), (8, 100))
  def test_plot_histogram_writes_small_png(self, k_count, num_classes):
    labels = np.random.default_rng(0).integers(0, num_classes, 6000)
    hist = partition.label_histogram(partition.make("dirichlet", labels, k_count), labels,
                                     num_classes)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "hist.png")
      self.assertEqual(partition.plot_histogram(hist, path, title="test"), path)
      with open(path, "rb") as f:
        png = f.read()
    self.assertTrue(png.startswith(_PNG_MAGIC))
    self.assertLess(len(png), 100_000)

  @parameterized.parameters("iid", "shards", "dirichlet")
  def test_save_load_round_trip(self, kind):
    parts = partition.make(kind, _labels(), 16, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "partition")  # no ".npz": save must write exactly this path
      self.assertEqual(partition.save(parts, path), path)
      self.assertTrue(os.path.exists(path))
      with np.load(path) as z:
        self.assertEqual(sorted(z.files), [f"agent_{k:04d}" for k in range(16)])
      loaded = partition.load(path)
    self.assertLen(loaded, 16)
    for a, b in zip(parts, loaded, strict=True):
      self.assertEqual(a.dtype, b.dtype)
      np.testing.assert_array_equal(a, b)

  def test_load_rejects_other_npz(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "other.npz")
      np.savez(path, weights=np.zeros(3))
      with self.assertRaisesRegex(ValueError, "partition.save"):
        partition.load(path)

  @parameterized.named_parameters(
      ("unknown_kind", dict(kind="pathological"), "unknown partition kind.*iid, dirichlet"),
      ("alpha_zero", dict(kind="dirichlet", alpha=0.0), "alpha=0.0"),
      ("alpha_negative", dict(kind="dirichlet", alpha=-1.0), "alpha > 0"),
      ("alpha_nan", dict(kind="dirichlet", alpha=float("nan")), "alpha"),
      ("classes_zero", dict(kind="shards", classes_per_agent=0), "classes_per_agent=0"),
      ("classes_too_many", dict(kind="shards", classes_per_agent=11), "<= 10"),
      ("no_agents", dict(num_agents=0), "at least one agent"),
      ("negative_agents", dict(num_agents=-3), "num_agents=-3"),
      ("more_agents_than_examples", dict(num_agents=6001), "only 6000 training examples"),
      ("minimum_unmet", dict(num_agents=64, min_per_agent=100), "lower min_per_agent to <= 93"),
      ("minimum_zero", dict(min_per_agent=0), "at least one example"),
      ("labels_2d", dict(labels=np.zeros((10, 2), int)), "1-D"),
      ("labels_float", dict(labels=np.zeros(10)), "integer class ids"),
      ("labels_negative", dict(labels=-np.ones(10, int)), "non-negative"),
  )
  def test_bad_input_raises_one_line(self, overrides, pattern):
    args = dict(kind="iid", labels=_labels(), num_agents=4)
    args.update(overrides)
    kind, labels, k_count = args.pop("kind"), args.pop("labels"), args.pop("num_agents")
    with self.assertRaisesRegex(ValueError, pattern) as cm:
      partition.make(kind, labels, k_count, **args)
    self.assertNotIn("\n", str(cm.exception))

  def test_bad_histogram_inputs_raise_one_line(self):
    labels = _labels()
    parts = partition.make("iid", labels, 4)
    with self.assertRaisesRegex(ValueError, "num_classes >= 10") as cm:
      partition.label_histogram(parts, labels, 5)
    self.assertNotIn("\n", str(cm.exception))
    with self.assertRaisesRegex(ValueError, r"\[K, C\]") as cm:
      partition.plot_histogram(np.zeros(4), os.path.join(tempfile.gettempdir(), "never.png"))
    self.assertNotIn("\n", str(cm.exception))

  def test_save_rejects_non_partition_before_writing(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "bad.npz")
      with self.assertRaisesRegex(ValueError, "agent 1") as cm:
        partition.save([np.arange(3), np.zeros((2, 2))], path)
      self.assertNotIn("\n", str(cm.exception))
      self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
  absltest.main()
