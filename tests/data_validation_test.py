"""In-memory data are checked before any work: each malformed field is refused in one line."""

import time

import numpy as np
from absl import logging
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data

from drt_jax import config, data, inputs, train


def _with(**changes):
  """tiny_data as a mapping with ``changes``; a change of ``None`` drops the field."""
  d = {**tiny_data()._asdict(), **changes}
  return {k: v for k, v in d.items() if v is not None}


def _floats(nan_at=None, split="train", value=np.nan):
  images = getattr(tiny_data(), f"{split}_images").astype(np.float32)
  if nan_at is not None:
    images[nan_at, 3, 2, 0] = value
  return images


def _parts(*changed):
  """Four disjoint lists of 64 training indices, the first ones replaced by ``changed``."""
  parts = [np.arange(k * 64, (k + 1) * 64) for k in range(4)]
  return [*changed, *parts[len(changed):]]


_D = tiny_data()
_N = len(_D.train_labels)

# (name, the data given to train_and_evaluate, what the one-line refusal must say)
MALFORMED = (
    ("missing_field", lambda: _with(train_labels=None), "data lacks 'train_labels'"),
    ("images_none", lambda: {**_with(), "train_images": None}, "data.train_images is missing"),
    ("images_ragged", lambda: _with(train_images=[np.zeros((8, 8, 1)), np.zeros((4, 4, 1))]),
     "data.train_images (list) is not one rectangular array"),
    ("images_object", lambda: _with(test_images=np.array([None] * 64)),
     "data.test_images has dtype object"),
    ("images_one_axis", lambda: _with(train_images=np.zeros(_N, np.uint8)),
     "data.train_images has shape (256,); give a batch of examples"),
    ("images_bool", lambda: _with(train_images=_D.train_images > 127),
     "data.train_images are booleans"),
    ("images_strings", lambda: _with(test_images=np.full((64, 8, 8, 1), "x")),
     "data.test_images have dtype <U1; give numeric pixels"),
    ("images_complex", lambda: _with(train_images=_D.train_images.astype(np.complex64)),
     "data.train_images have dtype complex64"),
    ("images_empty", lambda: _with(train_images=_D.train_images[:0],
                                   train_labels=_D.train_labels[:0]),
     "data.train_images holds no examples"),
    ("test_shape_differs", lambda: _with(test_images=np.zeros((64, 8, 8, 3), np.uint8)),
     "data.test_images examples have shape (8, 8, 3) but data.train_images (8, 8, 1)"),
    ("extra_train_images", lambda: _with(train_labels=_D.train_labels[:200]),
     "data.train_labels has 200 entries but data.train_images has 256 examples"),
    ("extra_test_labels", lambda: _with(test_labels=np.concatenate([_D.test_labels, [0]])),
     "data.test_labels has 65 entries but data.test_images has 64"),
    ("labels_one_hot", lambda: _with(train_labels=np.eye(10, dtype=np.int32)[_D.train_labels]),
     "data.train_labels has shape (256, 10); class ids must be 1-D [N]: for one-hot labels pass "
     "labels.argmax(-1)"),
    ("labels_column", lambda: _with(test_labels=_D.test_labels[:, None]),
     "data.test_labels has shape (64, 1); class ids must be 1-D [N]: pass labels.reshape(-1)"),
    ("labels_whole_floats", lambda: _with(train_labels=_D.train_labels.astype(np.float32)),
     "data.train_labels have dtype float32; class ids must be integers"),
    ("labels_bool", lambda: _with(test_labels=_D.test_labels > 4),
     "data.test_labels have dtype bool"),
    ("labels_negative", lambda: _with(train_labels=np.where(np.arange(_N) == 7, -1,
                                                            _D.train_labels)),
     "data.train_labels[7] is -1; class ids must be 0..C-1"),
    ("train_label_beyond_classes", lambda: _with(train_labels=np.where(np.arange(_N) == 3, 10,
                                                                       _D.train_labels)),
     "data.train_labels[3] is class 10 but data.num_classes=10"),
    ("test_label_beyond_classes", lambda: _with(test_labels=np.full(64, 12)),
     "data.test_labels[0] is class 12 but data.num_classes=10; raise num_classes to >= 13"),
    ("test_class_not_in_training", lambda: _with(num_classes=None, test_labels=np.full(64, 11)),
     "data.test_labels[0] is class 11 but data.train_labels go up to 9 only"),
    ("num_classes_zero", lambda: _with(num_classes=0), "data.num_classes=0; give a positive int"),
    ("num_classes_float", lambda: {**_with(), "num_classes": 10.0}, "data.num_classes=10.0"),
    ("num_classes_bool", lambda: {**_with(), "num_classes": True}, "data.num_classes=True"),
    ("nan_train_image", lambda: _with(train_images=_floats(nan_at=37)),
     "data.train_images[37] holds a non-finite value (NaN or inf)"),
    ("inf_test_image", lambda: _with(train_images=_floats(),
                                     test_images=_floats(nan_at=5, split="test", value=np.inf)),
     "data.test_images[5] holds a non-finite value"),
    ("indices_mask", lambda: _with(agent_indices=_parts(np.arange(_N) < 64)),
     "data.agent_indices[0] is a boolean mask; give the indices it selects, "
     "np.flatnonzero(mask)"),
    ("indices_float", lambda: _with(agent_indices=_parts(np.arange(64.0))),
     "data.agent_indices[0] has dtype float64; give integer indices"),
    ("indices_beyond_split", lambda: _with(agent_indices=_parts(np.arange(64),
                                                                np.arange(200, 300))),
     "data.agent_indices[1] holds index 256, outside [0, 256)"),
    ("indices_negative", lambda: _with(agent_indices=_parts(np.arange(-1, 63))),
     "data.agent_indices[0] holds index -1, outside [0, 256)"),
    ("indices_empty_agent", lambda: _with(agent_indices=_parts(np.arange(64), np.arange(0))),
     "data.agent_indices[1] is empty: agent 1 has no training examples"),
    ("indices_two_dimensional", lambda: _with(agent_indices=_parts(np.arange(64).reshape(8, 8))),
     "data.agent_indices[0] has shape (8, 8); each agent's indices must be one 1-D array"),
    ("indices_repeated", lambda: _with(agent_indices=_parts(np.r_[np.arange(63), 5])),
     "data.agent_indices[0] lists example 5 more than once; give each agent distinct indices, "
     "e.g. np.unique(idx)"),
    ("indices_one_list", lambda: _with(agent_indices=np.arange(_N)),
     "data.agent_indices is a 1-D array; give one 1-D index array per agent"),
    ("indices_mapping", lambda: _with(agent_indices={0: np.arange(64)}),
     "data.agent_indices is a dict; give a list of 1-D index arrays"),
    ("indices_ragged", lambda: _with(agent_indices=_parts([np.arange(3), 4])),
     "data.agent_indices[0] is not an array of indices"),
)


class RefusedTest(parameterized.TestCase):

  @parameterized.named_parameters(*MALFORMED)
  def test_refused_in_one_line_naming_the_field(self, given, message):
    with self.assertRaises(ValueError) as ctx:
      train.train_and_evaluate(TINY, data=given(), verbose=False)
    text = str(ctx.exception)
    self.assertIn(message, text)
    self.assertNotIn("\n", text)

  def test_table_covers_every_class_of_check(self):
    self.assertGreaterEqual(len(MALFORMED), 20)

  def test_prepare_data_checks_data_that_skipped_as_data(self):
    # Loaded datasets reach prepare_data directly, so the checks must be there too.
    d = tiny_data()._replace(train_images=_floats(nan_at=2))
    with self.assertRaisesRegex(ValueError, r"data.train_images\[2\] holds a non-finite"):
      inputs.prepare_data(config.resolve(TINY), d)

  def test_not_data_at_all(self):
    with self.assertRaisesRegex(TypeError, "data must be drt_jax.data.Data or a mapping"):
      data.as_data([1, 2, 3])


class OverlapTest(absltest.TestCase):

  def test_examples_shared_by_agents_are_a_warning_when_the_run_partitions(self):
    d = tiny_data()
    parts = [np.arange(0, 70), np.arange(60, 130), np.arange(130, 190), np.arange(190, 256)]
    with self.assertLogs(logging.get_absl_logger(), "WARNING") as logs:
      prepared = inputs.prepare_data(config.resolve(TINY), d._replace(agent_indices=parts))
    self.assertLen(prepared.parts, 4)  # not refused: lists may overlap by design
    text = "\n".join(logs.output)
    self.assertIn("10 training examples are held by more than one agent", text)
    self.assertIn("example 60 by agents [0, 1]", text)

  def test_no_warning_for_disjoint_lists_or_outside_a_run(self):
    d = tiny_data()
    overlapping = [np.arange(0, 70)] * 4
    with self.assertNoLogs(logging.get_absl_logger(), "WARNING"):
      inputs.prepare_data(config.resolve(TINY), d._replace(agent_indices=_parts()))
      data.as_data(d._replace(agent_indices=overlapping))


class ValidTest(absltest.TestCase):

  def test_tiny_data_passes_unchanged(self):
    d = tiny_data()
    checked = data.validate(d, exact_partition=True)
    for field in data.REQUIRED:
      self.assertIs(getattr(checked, field), getattr(d, field))
    self.assertEqual(checked.classes, 10)

  def test_lists_and_other_integer_dtypes_pass_as_arrays(self):
    d = tiny_data()
    checked = data.as_data({**d._asdict(), "num_classes": None,
                            "train_labels": d.train_labels.tolist(),
                            "test_labels": d.test_labels.astype(np.uint8),
                            "train_images": d.train_images.astype(np.int16),
                            "test_images": d.test_images.astype(np.int16),
                            "agent_indices": [p.astype(np.uint32).tolist() for p in _parts()]})
    self.assertIsInstance(checked.train_labels, np.ndarray)
    self.assertTrue(all(isinstance(p, np.ndarray) for p in checked.agent_indices))
    self.assertEqual(checked.classes, 10)

  def test_float_images_train(self):
    d = tiny_data()
    history = train.train_and_evaluate(
        {**TINY, "num_steps": 2, "eval_every": 2},
        data=d._replace(train_images=_floats() / 255, test_images=_floats(split="test") / 255,
                        agent_indices=_parts()), verbose=False)
    self.assertTrue(np.isfinite(history[-1]["train_loss"]))

  def test_flat_features_pass(self):
    d = tiny_data()
    data.validate(d._replace(train_images=d.train_images.reshape(_N, -1),
                             test_images=d.test_images.reshape(64, -1)))

  def test_mnist_sized_data_check_in_well_under_a_second(self):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 60_000).astype(np.int64)
    uint8 = data.Data(np.zeros((60_000, 28, 28, 1), np.uint8), labels,
                      np.zeros((10_000, 28, 28, 1), np.uint8), labels[:10_000],
                      data.partition_iid(60_000, 100), 10)
    floats = uint8._replace(train_images=np.zeros((60_000, 28, 28, 1), np.float32))
    for d in (uint8, floats):
      start = time.perf_counter()
      data.validate(d, exact_partition=True)
      self.assertLess(time.perf_counter() - start, 0.5)

  def test_scan_of_a_large_split_is_bounded_but_finds_a_corrupt_head(self):
    images = np.zeros((20_000, 28, 28, 1), np.float32)
    images[3] = np.nan
    self.assertEqual(data.first_non_finite(images), 3)
    images[:] = np.inf
    self.assertEqual(data.first_non_finite(images), 0)
    self.assertIsNone(data.first_non_finite(np.zeros((4, 2), np.uint8)))


if __name__ == "__main__":
  absltest.main()
