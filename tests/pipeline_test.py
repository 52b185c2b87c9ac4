"""The data path of a run: config, dataset, validation split, partition, device, batches."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from drt_jax import config, data, datasets, inputs, partition, train
from drt_jax import step as step_lib

TINY = {
    "num_agents": 4, "model": "mlp", "model_options": {"hidden": (16,)}, "batch_size": 8,
    "num_steps": 2, "eval_every": 0, "eval_examples": 32, "train_eval_examples": 32,
    "eval_batch_size": 32, "backend": "vmap", "learning_rate": 0.05, "dataset": "synthetic",
}


def labelled_by_index(n=120, shape=(4, 4, 1)):
  """Labels equal to the example's index, so a drawn batch's labels are its indices."""
  images = np.zeros((n, *shape), np.uint8)
  return data.Data(images, np.arange(n, dtype=np.int32), images[:8], np.zeros(8, np.int32),
                   num_classes=n, name="indexed")


class DrawBatchTest(absltest.TestCase):

  def test_agents_draw_only_their_own_indices_and_visit_all_of_them_each_epoch(self):
    d = labelled_by_index()
    labels = np.arange(120) % 3
    parts = partition.make("dirichlet", labels, 4, alpha=0.3, min_per_agent=12, seed=1)
    dev = inputs.device_data(d, parts)
    batch = 4
    draw = jax.jit(lambda step: step_lib.draw_batch(jax.random.key(0), step, dev, batch)[1])
    n_max = max(len(p) for p in parts)
    steps = 2 * (n_max // batch + 1)
    drawn = np.stack([np.asarray(draw(s)) for s in range(steps)], 1).reshape(4, -1)
    for k, part in enumerate(parts):
      self.assertTrue(set(drawn[k].tolist()) <= set(part.tolist()), f"agent {k}")
      n = len(part)
      for e in range(drawn.shape[1] // n):
        self.assertCountEqual(drawn[k, e * n:(e + 1) * n].tolist(), part.tolist(),
                              f"agent {k} epoch {e}")

  def test_permute_is_a_bijection_that_depends_on_the_key(self):
    perm = jax.jit(data.permute)
    for n in (1, 2, 3, 5, 64, 1000, 8921):
      i = jnp.arange(n, dtype=jnp.uint32)
      a = np.asarray(perm(i, n, jnp.array([1, 2, 3, 4], jnp.uint32)))
      np.testing.assert_array_equal(np.sort(a), np.arange(n), f"n={n}")
      if n >= 64:
        b = np.asarray(perm(i, n, jnp.array([5, 6, 7, 8], jnp.uint32)))
        self.assertLess(np.mean(a == b), 0.1)
        self.assertLess(abs(np.corrcoef(np.arange(n), a)[0, 1]), 0.3)  # not near the identity

  def test_permute_orders_small_domains_uniformly(self):
    # Over 20,000 epochs each position takes each value ~E/n times: chi-square within ~6 sigma
    # of its degrees of freedom (four Feistel rounds gave 714 against a limit of 50 at n = 5).
    epochs = 20_000
    keys = jax.vmap(lambda e: jax.random.bits(jax.random.fold_in(jax.random.key(0), e),
                                              (data.ROUNDS,), jnp.uint32))(jnp.arange(epochs))
    for n in (3, 5, 10):
      perms = np.asarray(jax.jit(jax.vmap(lambda rk, n=n: data.permute(
          jnp.arange(n, dtype=jnp.uint32), n, rk)))(keys))
      counts = np.stack([np.bincount(perms[:, i], minlength=n) for i in range(n)])
      chi2 = ((counts - epochs / n) ** 2 / (epochs / n)).sum()
      dof = (n - 1) ** 2
      self.assertLess(chi2, dof + 6 * np.sqrt(2 * dof), f"n={n}")

  def test_crop_flip_is_a_shift_or_mirror_of_each_image_and_differs_by_agent(self):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(1, 255, (2, 64, 8, 8, 3)), jnp.uint8)
    images = images.at[1].set(images[0])  # two agents with the same images
    out = np.asarray(jax.jit(data.crop_flip)(jax.random.key(1), images))
    self.assertEqual(out.shape, images.shape)
    self.assertEqual(out.dtype, np.uint8)
    flips = 0
    for k in range(2):
      for b in range(64):
        padded = np.pad(np.asarray(images[k, b]), ((4, 4), (4, 4), (0, 0)))
        views = {(dy, dx, f): padded[dy:dy + 8, dx:dx + 8][:, ::-1 if f else 1]
                 for dy in range(9) for dx in range(9) for f in (0, 1)}
        crops = {key for key, view in views.items() if np.array_equal(view, out[k, b])}
        self.assertTrue(crops, f"agent {k} image {b} is no crop of its input")
        flips += min(f for _, _, f in crops)
    self.assertBetween(flips, 40, 88)  # ~half of 128 flipped
    self.assertFalse(np.array_equal(out[0], out[1]))  # per-agent randomness

  def test_augmentation_auto_is_crop_flip_for_cifar_only(self):
    self.assertEqual(data.augmentation_for("auto", "cifar10"), "crop_flip")
    self.assertEqual(data.augmentation_for("auto", "cifar100"), "crop_flip")
    self.assertEqual(data.augmentation_for("auto", "svhn_cropped"), "none")
    self.assertEqual(data.augmentation_for("auto", "mnist"), "none")
    self.assertEqual(data.augmentation_for("crop_flip", "mnist"), "crop_flip")


class PrepareDataTest(parameterized.TestCase):

  @parameterized.parameters("iid", "dirichlet", "shards")
  def test_partition_kinds_cover_every_index_once(self, kind):
    d = data.synthetic(num_train=400, num_test=16, shape=(4, 4, 1), seed=0)
    c = config.resolve({**TINY, "num_agents": 8, "partition": kind, "dirichlet_alpha": 0.2})
    prepared = inputs.prepare_data(c, d)
    every = np.sort(np.concatenate(prepared.parts))
    np.testing.assert_array_equal(every, np.arange(400))
    self.assertGreaterEqual(min(len(p) for p in prepared.parts), c.batch_size)

  def test_validation_split_is_held_out_of_the_training_split(self):
    d = data.synthetic(num_train=400, num_test=16, shape=(4, 4, 1), seed=0)
    c = config.resolve({**TINY, "validation_fraction": 0.25})
    prepared = inputs.prepare_data(c, d)
    self.assertLen(prepared.data.train_labels, 300)
    self.assertLen(prepared.validation[1], 100)
    np.testing.assert_array_equal(np.sort(np.concatenate(prepared.parts)), np.arange(300))
    train_rows = {x.tobytes() for x in prepared.data.train_images}
    self.assertFalse(any(x.tobytes() in train_rows for x in prepared.validation[0]))

  @parameterized.named_parameters(
      ("alpha", {"partition": "dirichlet", "dirichlet_alpha": 0.0}, "dirichlet_alpha=0.0"),
      ("alpha_negative", {"dirichlet_alpha": -1.0}, "finite number > 0"),
      ("partition", {"partition": "pathological"}, "iid, dirichlet, shards"),
      ("augment", {"augment": "mixup"}, "auto, none, crop_flip"),
      ("validation", {"validation_fraction": 1.0}, "[0, 1)"),
      ("source", {"data_source": "web"}, "auto, embedded, tfds"),
  )
  def test_bad_config_is_one_line(self, override, expected):
    with self.assertRaisesRegex(ValueError, "config") as e:
      config.resolve({**TINY, **override})
    self.assertIn(expected, str(e.exception))
    self.assertNotIn("\n", str(e.exception))

  def test_processes_must_share_everything_but_where_their_data_lives(self):
    base = config.shared_json(config.resolve(TINY))
    elsewhere = config.resolve({**TINY, "data_dir": "/mnt/other", "download": True,
                                "data_source": "tfds"})
    self.assertEqual(config.shared_json(elsewhere), base)
    self.assertNotEqual(config.shared_json(config.resolve({**TINY, "seed": 1})), base)

  def test_data_digest_sees_a_changed_image(self):
    d = data.synthetic(num_train=64, num_test=16, shape=(4, 4, 1), seed=0)
    c = config.resolve({**TINY, "num_agents": 4})
    before = inputs.data_digest(inputs.prepare_data(c, d))
    images = np.array(d.train_images)
    images[7, 0, 0, 0] += 1
    changed = d._replace(train_images=images)
    self.assertNotEqual(inputs.data_digest(inputs.prepare_data(c, changed)), before)

  def test_more_agents_than_examples(self):
    d = data.synthetic(num_train=6, num_test=4, shape=(4, 4, 1), seed=0)
    with self.assertRaisesRegex(ValueError, r"num_agents=8 but synthetic has only 6 training"):
      inputs.prepare_data(config.resolve({**TINY, "num_agents": 8, "batch_size": 1}), d)

  def test_batch_larger_than_a_partition_names_the_agent(self):
    d = data.synthetic(num_train=40, num_test=4, shape=(4, 4, 1), seed=0)
    parts = [np.arange(0, 30), np.arange(30, 34), np.arange(34, 40)]
    c = config.resolve({**TINY, "num_agents": 3})
    with self.assertRaisesRegex(ValueError, r"batch_size=8 exceeds agent 1's partition of 4 "
                                r"examples; lower batch_size to <= 4"):
      inputs.prepare_data(c, d._replace(agent_indices=parts))

  def test_data_reaching_prepare_data_directly_are_checked_first(self):
    # Loaded datasets do not pass through as_data: prepare_data refuses them in one line too.
    d = data.synthetic(num_train=40, num_test=8, shape=(4, 4, 1), seed=0)
    c = config.resolve({**TINY, "num_agents": 2, "batch_size": 4})
    mask = np.arange(40) < 20
    for bad, message in (
        (d._replace(train_labels=d.train_labels[:30]), "data.train_labels has 30 entries"),
        (d._replace(agent_indices=[mask, ~mask]), "np.flatnonzero(mask)"),
        (d._replace(test_labels=d.test_labels + 10), "data.num_classes=10"),
    ):
      with self.assertRaises(ValueError) as e:
        inputs.prepare_data(c, bad)
      self.assertIn(message, str(e.exception))
      self.assertNotIn("\n", str(e.exception))

  def test_bad_input_writes_nothing(self):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, "run")
      d = data.synthetic(num_train=20, num_test=4, shape=(4, 4, 1), seed=0)
      with self.assertRaisesRegex(ValueError, "batch_size=8 exceeds"):
        train.train_and_evaluate({**TINY, "num_agents": 4}, workdir, d._replace(
            agent_indices=[np.arange(0, 17), np.arange(17, 18), np.arange(18, 19),
                           np.arange(19, 20)]))
      with self.assertRaisesRegex(ValueError, "unknown dataset 'no_such_set'.*supported: mnist"):
        train.train_and_evaluate({**TINY, "dataset": "no_such_set"}, workdir)
      with self.assertRaisesRegex(datasets.DatasetUnavailableError, "download=False"):
        train.train_and_evaluate({**TINY, "dataset": "cifar10", "data_dir": tmp}, workdir)
      self.assertFalse(os.path.exists(workdir))


class RunDataTest(absltest.TestCase):

  def test_run_saves_partition_and_histogram_and_reports_validation(self):
    d = data.synthetic(num_train=400, num_test=64, shape=(4, 4, 1), seed=0)
    c = {**TINY, "partition": "shards", "classes_per_agent": 2, "validation_fraction": 0.2}
    with tempfile.TemporaryDirectory() as workdir:
      history = train.train_and_evaluate(c, workdir, d)
      parts = partition.load(os.path.join(workdir, "partition.npz"))
      self.assertEqual(sum(len(p) for p in parts), 320)
      with open(os.path.join(workdir, "partition.png"), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    expected = inputs.prepare_data(config.resolve(c), d).parts
    for saved, again in zip(parts, expected, strict=True):
      np.testing.assert_array_equal(saved, again)
    self.assertBetween(history[-1]["val_acc_mean"], 0.0, 1.0)
    self.assertIn("centroid_val_acc", history[-1])

  def test_cifar10_through_tfds_mock_data_with_augmentation(self):
    c = {**TINY, "dataset": "cifar10", "batch_size": 4, "num_agents": 2}
    with tfds.testing.mock_data(num_examples=16):
      history = train.train_and_evaluate(c)
    self.assertEqual(history[-1]["step"], 2)
    self.assertTrue(np.isfinite(history[-1]["train_loss"]))

  def test_default_dataset_is_embedded_mnist(self):
    if datasets.embedded_dir("mnist") is None:
      message = "embedded MNIST not installed (python -m drt_jax.install_data)"
      if os.environ.get("DRT_JAX_REQUIRE_DATA") == "1":
        self.fail(message)
      self.skipTest(message)
    self.assertEqual(config.default_config().dataset, "mnist")
    d = inputs.load_data(config.resolve({}))
    self.assertEqual((len(d.train_labels), len(d.test_labels)), (60_000, 10_000))
    c = config.resolve({**TINY, "dataset": "mnist", "num_agents": 64})
    dev = inputs.device_data(d, inputs.prepare_data(c, d).parts)
    # One copy of the images on the device plus [K, N/K] indices, not K copies.
    self.assertLess(inputs.device_bytes(dev), d.train_images.nbytes + 2_000_000)
    self.assertGreaterEqual(inputs.device_bytes(dev), d.train_images.nbytes)


if __name__ == "__main__":
  absltest.main()
