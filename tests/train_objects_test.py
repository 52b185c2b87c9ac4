"""``train_and_evaluate`` with objects in: optimizers, topologies, algorithms, callbacks, and what a
workdir records of them (TensorBoard included)."""

import glob
import io
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple
from unittest import mock

import jax
import numpy as np
import optax
from absl.testing import absltest
from fixtures import TINY, tiny_data, untimed
from tensorboardX.proto import event_pb2

from drt_jax import build, checkpoint, combine, config, step, topology, train

# Plain SGD and a hidden width of its own: the programs here are not shared with other modules.
BASE = {**TINY, "algorithm": "atc", "optimizer": "sgd", "model_options": {"hidden": (12,)},
        "num_steps": 4, "eval_every": 2}


def _params(workdir, step_=None):
  return checkpoint.load(workdir, step_)[0]["params"]


def _initial_params(c):
  c = config.resolve(c)
  model = build.model(c, tiny_data())
  state = build.init_state(c, model, build.algorithm(c), build.topology(c))
  return jax.tree.map(np.asarray, state.params)


def _events(workdir) -> dict:
  """tag -> {step: value} from the TensorBoard event files of ``workdir`` (TFRecord framing:
  length, its CRC, the record, its CRC)."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      raw = f.read()
    pos = 0
    while pos < len(raw):
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


class UserATC(NamedTuple):
  """A user's own algorithm: only init and step, no diagnostics."""

  init: Callable[..., Any]
  step: Callable[..., Any]


def user_atc(learning_rate: float) -> UserATC:
  def init(params):
    del params
    return ()

  def step_fn(params, grads, state, topology):
    psi = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return combine.combine(psi, topology), state

  return UserATC(init, step_fn)


class ObjectsInTest(absltest.TestCase):

  def test_a_zero_learning_rate_optimizer_leaves_every_parameter_unchanged(self):
    # Local steps alone: bit for bit. ATC on a ring: agents that agree stay where they are, up to
    # the rounding of sum_l a_lk w with weights of 1/3.
    for algorithm, exact in (("local", True), ("atc", False)):
      c = {**BASE, "algorithm": algorithm, "checkpoint_every": 4,
           "learning_rate": 0.5}  # the object wins over the field
      with tempfile.TemporaryDirectory() as workdir:
        history = train.train_and_evaluate(c, workdir, tiny_data(), optimizer=optax.sgd(0.0))
        after = _params(workdir)
        with open(os.path.join(workdir, "config.json")) as f:
          recorded = json.load(f)
      for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(_initial_params(c))):
        if exact:
          np.testing.assert_array_equal(got, want)
        else:
          np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
      self.assertEqual(history[-1]["consensus_distance"], 0.0)
      self.assertEqual(recorded["optimizer"], "custom")
      self.assertIn("optax", recorded["custom"]["optimizer"])

  def test_a_schedule_is_followed(self):
    # Learning rate 0.1 for the first two steps, then 0: the parameters move, then freeze (local
    # steps alone, as combining agents that disagree would move them on).
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.0})
    c = {**BASE, "algorithm": "local", "num_steps": 4, "checkpoint_every": 2,
         "keep_checkpoints": 3}
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(c, workdir, tiny_data(), optimizer=optax.sgd(schedule))
      at = {s: _params(workdir, s) for s in (2, 4)}
    initial = _initial_params(c)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at[2]),
                                                      jax.tree.leaves(initial))]
    self.assertTrue(all(moved))
    for a, b in zip(jax.tree.leaves(at[2]), jax.tree.leaves(at[4])):
      np.testing.assert_array_equal(a, b)

  def test_a_topology_object_wins_over_the_config_field(self):
    k_count = BASE["num_agents"]
    from_object = train.train_and_evaluate({**BASE, "topology": "ring"}, data=tiny_data(),
                                           topology=topology.make("full", k_count))
    from_config = train.train_and_evaluate({**BASE, "topology": "full"}, data=tiny_data())
    self.assertEqual(untimed(from_object), untimed(from_config))
    ring = train.train_and_evaluate({**BASE, "topology": "ring"}, data=tiny_data())
    self.assertNotEqual(untimed(ring), untimed(from_config))

  def test_two_optimizer_objects_get_their_own_programs(self):
    frozen = train.train_and_evaluate(BASE, data=tiny_data(), optimizer=optax.sgd(0.0))
    moving = train.train_and_evaluate(BASE, data=tiny_data(), optimizer=optax.sgd(0.1))
    self.assertEqual(frozen[-1]["test_acc_per_agent"], frozen[0]["test_acc_per_agent"])
    self.assertNotEqual(moving[-1]["train_loss"], frozen[-1]["train_loss"])
    self.assertGreater(moving[-1]["consensus_distance"], 0.0)
    # The same objects again reuse theirs: no new entry in the program cache.
    opt = optax.sgd(0.1)
    train.train_and_evaluate(BASE, data=tiny_data(), optimizer=opt)
    size = len(step._PROGRAMS)
    train.train_and_evaluate(BASE, data=tiny_data(), optimizer=opt)
    self.assertLen(step._PROGRAMS, size)

  def test_a_user_written_algorithm_trains_like_its_library_twin(self):
    mine = train.train_and_evaluate(BASE, data=tiny_data(), algorithm=user_atc(0.1))
    library = train.train_and_evaluate(BASE, data=tiny_data(), optimizer=optax.sgd(0.1))
    self.assertLess(mine[-1]["train_loss"], mine[0]["train_loss"] or np.inf)
    for a, b in zip(mine, library):
      for key in ("train_loss", "consensus_distance", "test_loss_mean"):
        if a[key] is not None:
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
      np.testing.assert_allclose(a["test_acc_per_agent"], b["test_acc_per_agent"])
    self.assertNotIn("self_weight_mean", mine[-1])  # it reports no diagnostics of its own

  def test_bad_objects_are_refused_in_one_line(self):
    cases = [({"optimizer": "sgd"}, "optimizer='sgd' is not an optax GradientTransformation"),
             ({"algorithm": object()}, "has no init and step functions"),
             ({"algorithm": user_atc(0.1), "optimizer": optax.sgd(0.1)}, "pass one of them"),
             ({"topology": topology.make("ring", 6)}, "the topology has 6 agents"),
             ({"topology": np.eye(4)}, "is not a drt_jax.topology.Topology"),
             ({"model": object()}, "is not a drt_jax.models.Model")]
    for kw, message in cases:
      with self.assertRaisesRegex(ValueError, message) as e:
        train.train_and_evaluate(BASE, data=tiny_data(), **kw)
      self.assertNotIn("\n", str(e.exception))

  def test_a_config_recording_a_custom_object_asks_for_it_again(self):
    with self.assertRaisesRegex(ValueError, r"config.algorithm='custom'.*pass that object again"):
      config.resolve({"algorithm": "custom"})
    c = config.resolve({"algorithm": "custom", "custom": {"algorithm": "UserATC (user)"}})
    self.assertEqual(c.custom.algorithm, "UserATC (user)")


class CallbacksAndRecordsTest(absltest.TestCase):

  def test_callbacks_receive_every_row_and_tensorboard_holds_them(self):
    seen = []
    with tempfile.TemporaryDirectory() as workdir:
      history = train.train_and_evaluate(BASE, workdir, tiny_data(), callbacks=[seen.append],
                                         verbose=False)
      events = _events(workdir)
    self.assertEqual(seen, history)
    self.assertEqual([r["step"] for r in seen], [0, 2, 4])
    self.assertEqual(set(events["test_acc_mean"]), {0, 2, 4})
    for row in history:
      for tag in ("test_acc_mean", "consensus_distance", "self_weight_mean"):
        self.assertAlmostEqual(events[tag][row["step"]], row[tag], places=5)
    self.assertNotIn("test_acc_per_agent", events)  # lists are not scalars

  def test_the_bar_shows_in_a_terminal_and_stays_out_of_logs(self):
    class Terminal(io.StringIO):
      def isatty(self):
        return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
      with mock.patch.object(sys, "stderr", stream):
        progress = train._Progress(10, enabled=True)
        progress.start(0)
        progress.advance()
        progress.close()
      self.assertEqual(progress.bar is not None, shown)
      self.assertEqual("step/s" in stream.getvalue() or "1/10" in stream.getvalue(), shown)

  def test_the_rate_leaves_out_the_compiling_step(self):
    history = train.train_and_evaluate({**BASE, "eval_every": 1}, data=tiny_data(),
                                       verbose=False)
    self.assertIsNone(history[0]["steps_per_sec"])  # nothing run yet
    self.assertIsNone(history[1]["steps_per_sec"])  # only the step that compiled
    self.assertTrue(all(r["steps_per_sec"] > 0 for r in history[2:]))


if __name__ == "__main__":
  absltest.main()
