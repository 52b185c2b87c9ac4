"""A workdir survives damage: bad checkpoints, lost or broken side files, two runs, a full disk.

Each test copies one finished reference run (checkpoints 2, 4 and 6, rows 0, 3 and 6), damages
the copy, reruns it and compares with the reference: untimed rows and final arrays bit for bit.
"""

import errno
import functools
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data, untimed

from drt_jax import checkpoint, train
from drt_jax import workdir as workdir_lib

C = {**TINY, "algorithm": "drt", "num_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}
_TMP = tempfile.TemporaryDirectory()  # removed when the test process ends


@functools.cache
def _reference() -> str:
  """A finished run of ``C``, trained once per test process."""
  ref = os.path.join(_TMP.name, "reference")
  train.train_and_evaluate(C, ref, tiny_data(), verbose=False)
  return ref


def _rows(workdir):
  return workdir_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _files(folder):
  return [p for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)]


# Ways a checkpoint folder gets damaged: a disk that lost it, a copy cut short, flipped bits, and
# (caught by the checksum alone) arrays or a record that read back fine but are not those saved.
def _emptied(step_dir):
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _truncated(step_dir):
  for path in _files(step_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def _bytes_flipped(step_dir):
  for path in _files(step_dir):
    if f"{os.sep}d{os.sep}" in path:  # tensorstore's data files
      data = bytearray(_read(path))
      for i in range(len(data) // 2, len(data), 97):
        data[i] ^= 0xFF
      with open(path, "wb") as f:
        f.write(data)


def _arrays_swapped(step_dir):  # a whole, readable state -- of the step before
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(os.path.join(os.path.dirname(step_dir), "4", "state"),
                  os.path.join(step_dir, "state"))


def _record_edited(step_dir):
  path = os.path.join(step_dir, "host", "metadata")
  with open(path) as f:
    record = json.load(f)
  record["wall_time"] += 1.0
  with open(path, "w") as f:
    json.dump(record, f)


class _WorkdirTest(parameterized.TestCase):

  def copy(self) -> str:
    run = tempfile.mkdtemp(dir=_TMP.name)
    shutil.copytree(_reference(), run, dirs_exist_ok=True)
    return run

  def train(self, run, config=C, **kw):
    """``(history, warning lines)`` of a run in ``run``."""
    with self.assertLogs("absl", "INFO") as logs:
      history = train.train_and_evaluate(config, run, tiny_data(), verbose=False, **kw)
    return history, [r.getMessage() for r in logs.records if r.levelname == "WARNING"]

  def assert_uninterrupted(self, run, history):
    """``run`` ends where the reference ends: rows on disk and returned, and the final state."""
    ref = _reference()
    self.assertEqual(untimed(_rows(run)), untimed(_rows(ref)))
    self.assertEqual(untimed(history), untimed(_rows(ref)))
    got, want = checkpoint.load(run)[0], checkpoint.load(ref)[0]
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertTrue(np.array_equal(x, y), "final checkpoints differ")
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))

  def assert_one_line(self, ctx):
    self.assertNotIn("\n", str(ctx.exception))


class DamagedCheckpointTest(_WorkdirTest):

  @parameterized.named_parameters(("emptied", _emptied), ("truncated", _truncated),
                                  ("bytes_flipped", _bytes_flipped),
                                  ("arrays_swapped", _arrays_swapped),
                                  ("record_edited", _record_edited))
  def test_newest_damaged_resumes_from_the_one_before(self, damage):
    run = self.copy()
    damage(os.path.join(checkpoint.directory(run), "6"))
    history, warnings = self.train(run)
    damaged = [w for w in warnings if "damaged" in w]
    self.assertLen(damaged, 1, warnings)
    self.assertIn("checkpoint 6 in", damaged[0])
    self.assertIn("resuming from the checkpoint of step 4", damaged[0])
    self.assertNotIn("\n", damaged[0])
    self.assert_uninterrupted(run, history)
    self.assertEqual(checkpoint.steps(run), [2, 4, 6])
    self.assertTrue(os.path.isdir(os.path.join(run, checkpoint.DAMAGED, "6")))  # kept, aside

  def test_checksum_catches_what_orbax_reads_back_without_complaint(self):
    run = self.copy()
    _arrays_swapped(os.path.join(checkpoint.directory(run), "6"))
    with self.assertRaisesRegex(checkpoint.DamagedCheckpointError, "arrays differ"):
      checkpoint.load(run)

  def test_no_good_checkpoint_is_refused_and_none_deleted(self):
    run = self.copy()
    for step in (2, 4, 6):
      _emptied(os.path.join(checkpoint.directory(run), str(step)))
    metrics = _read(os.path.join(run, "metrics.jsonl"))
    with self.assertRaisesRegex(ValueError, r"no checkpoint in \S+checkpoints can be restored "
                                r"\(3 damaged; newest, 6: .*overwrite") as ctx:
      train.train_and_evaluate(C, run, tiny_data(), verbose=False)
    self.assert_one_line(ctx)
    self.assertEqual(checkpoint.steps(run), [2, 4, 6])
    self.assertFalse(os.path.exists(os.path.join(run, checkpoint.DAMAGED)))
    self.assertEqual(_read(os.path.join(run, "metrics.jsonl")), metrics)
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))


class SideFilesTest(_WorkdirTest):

  def killed_after_4(self, run):
    """As if killed after the checkpoint of step 4: checkpoint 6 never reached the disk."""
    shutil.rmtree(os.path.join(checkpoint.directory(run), "6"))

  @parameterized.named_parameters(("deleted", "deleted"), ("truncated", "truncated"),
                                  ("not_json", "not_json"))
  def test_lost_config_is_rebuilt_from_the_checkpoint_and_the_run_resumes(self, how):
    run = self.copy()
    self.killed_after_4(run)
    path = os.path.join(run, "config.json")
    if how == "deleted":
      os.remove(path)
    elif how == "truncated":
      os.truncate(path, os.path.getsize(path) // 2)
    else:
      with open(path, "w") as f:
        f.write("[]")
    with self.assertLogs("absl", "INFO") as logs:
      history = train.train_and_evaluate(C, run, tiny_data(), verbose=False)
    lines = [r.getMessage() for r in logs.records]
    self.assertLen([m for m in lines if "config.json was" in m and "rebuilt" in m], 1, lines)
    self.assertIn("resuming from the checkpoint of step 4", "\n".join(lines))
    self.assert_uninterrupted(run, history)
    self.assertEqual(_read(path), _read(os.path.join(_reference(), "config.json")))

  def test_lost_config_of_another_run_is_refused_and_the_checkpoints_kept(self):
    run = self.copy()
    os.remove(os.path.join(run, "config.json"))
    with self.assertRaisesRegex(ValueError, r"config.json is missing and checkpoint 6 in \S+ "
                                r"holds a run of a different config \(learning_rate: ") as ctx:
      train.train_and_evaluate({**C, "learning_rate": 0.1}, run, tiny_data(), verbose=False)
    self.assert_one_line(ctx)
    self.assertEqual(checkpoint.steps(run), [2, 4, 6])
    self.assertFalse(os.path.exists(os.path.join(run, "config.json")))

  def test_config_is_written_atomically_and_left_alone_when_unchanged(self):
    run = self.copy()
    path = os.path.join(run, "config.json")
    before = os.stat(path)
    train.train_and_evaluate(C, run, tiny_data(), verbose=False)  # finished: nothing to train
    self.assertEqual(os.stat(path).st_mtime_ns, before.st_mtime_ns)
    self.assertEqual([n for n in os.listdir(run) if ".tmp" in n], [])

  @parameterized.named_parameters(("deleted", 0), ("cut_to_one_row", 1))
  def test_lost_metric_rows_come_back_from_the_checkpoint(self, keep):
    run = self.copy()
    self.killed_after_4(run)
    path = os.path.join(run, "metrics.jsonl")
    if keep:
      workdir_lib.write_jsonl(path, _rows(run)[:keep])
    else:
      os.remove(path)
    history, warnings = self.train(run)
    restored = [w for w in warnings if "restored them from the checkpoint" in w]
    self.assertLen(restored, 1, warnings)
    self.assertIn(f"holds {keep} rows up to step 4, checkpoint 4 kept 2", restored[0])
    self.assert_uninterrupted(run, history)

  def test_checkpoints_path_that_is_a_file_is_refused_before_anything_is_written(self):
    run = self.copy()
    folder = checkpoint.directory(run)
    shutil.rmtree(folder)
    with open(folder, "w") as f:
      f.write("not a folder")
    before = {name: _read(os.path.join(run, name)) for name in ("metrics.jsonl", "config.json")}
    with self.assertRaisesRegex(ValueError, rf"^{folder} is a file, not the folder") as ctx:
      train.train_and_evaluate(C, run, tiny_data(), verbose=False)
    self.assert_one_line(ctx)
    self.assertEqual({name: _read(os.path.join(run, name)) for name in before}, before)
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))


class LockTest(_WorkdirTest):

  def write_lock(self, run, pid, host=None):
    with open(os.path.join(run, workdir_lib.LOCK), "w") as f:
      json.dump({"pid": pid, "host": host or socket.gethostname()}, f)

  def test_a_second_run_is_refused_while_the_first_runs_which_ends_intact(self):
    run = os.path.join(tempfile.mkdtemp(dir=_TMP.name), "run")
    refusals = []

    def second_start(row):  # the first run holds the lock while it calls back
      if row["step"] == 3:
        try:
          train.train_and_evaluate(C, run, tiny_data(), verbose=False)
        except ValueError as e:
          refusals.append(str(e))

    history = train.train_and_evaluate(C, run, tiny_data(), verbose=False,
                                       callbacks=[second_start])
    self.assertLen(refusals, 1)
    self.assertRegex(refusals[0], rf"^workdir {run} is in use by another run \(pid {os.getpid()} "
                                  rf"on .*lock file {run}/\.lock\)")
    self.assertNotIn("\n", refusals[0])
    self.assert_uninterrupted(run, history)

  def test_live_lock_of_another_process_is_refused_and_left_alone(self):
    run = self.copy()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
      self.write_lock(run, sleeper.pid)
      lock = _read(os.path.join(run, workdir_lib.LOCK))
      metrics = _read(os.path.join(run, "metrics.jsonl"))
      with self.assertRaisesRegex(ValueError, rf"in use by another run \(pid {sleeper.pid} on "
                                  rf"{socket.gethostname()}, lock file ") as ctx:
        train.train_and_evaluate(C, run, tiny_data(), verbose=False)
      self.assert_one_line(ctx)
      self.assertEqual(_read(os.path.join(run, workdir_lib.LOCK)), lock)
      self.assertEqual(_read(os.path.join(run, "metrics.jsonl")), metrics)
    finally:
      sleeper.kill()
      sleeper.wait()

  def test_lock_of_another_host_is_refused(self):
    run = self.copy()
    self.write_lock(run, 1, host="elsewhere.example")
    with self.assertRaisesRegex(ValueError, r"pid 1 on elsewhere.example"):
      train.train_and_evaluate(C, run, tiny_data(), verbose=False)

  @parameterized.named_parameters(("dead_pid", "dead"), ("unreadable", "unreadable"))
  def test_stale_lock_is_taken_over(self, how):
    run = self.copy()
    shutil.rmtree(os.path.join(checkpoint.directory(run), "6"))
    if how == "dead":
      gone = subprocess.Popen([sys.executable, "-c", "pass"])
      gone.wait()
      self.write_lock(run, gone.pid)
    else:
      open(os.path.join(run, workdir_lib.LOCK), "w").close()  # killed before writing it
    history, warnings = self.train(run)
    self.assertLen([w for w in warnings if "taking over the lock" in w], 1, warnings)
    self.assert_uninterrupted(run, history)

  def test_lock_is_released_when_the_run_fails(self):
    run = os.path.join(tempfile.mkdtemp(dir=_TMP.name), "run")

    def fail(row):
      raise RuntimeError(f"stop at {row['step']}")

    with self.assertRaisesRegex(RuntimeError, "stop at 0"):
      train.train_and_evaluate(C, run, tiny_data(), verbose=False, callbacks=[fail])
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))
    with self.assertRaisesRegex(ValueError, "different config"):
      train.train_and_evaluate({**C, "seed": 1}, run, tiny_data(), verbose=False)
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))


class FullDiskTest(_WorkdirTest):

  def test_failed_checkpoint_write_is_one_line_and_the_rerun_resumes(self):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    run = os.path.join(tempfile.mkdtemp(dir=_TMP.name), "run")
    save = ocp.CheckpointManager.save

    def full_at_4(manager, step, *args, **kw):
      if step == 4:
        raise OSError(errno.ENOSPC, "No space left on device")
      return save(manager, step, *args, **kw)

    with mock.patch.object(ocp.CheckpointManager, "save", full_at_4):
      with self.assertRaisesRegex(OSError, rf"^could not save checkpoint 4 into "
                                  rf"{checkpoint.directory(run)} \(OSError: \[Errno 28\] No space"
                                  ) as ctx:
        train.train_and_evaluate(C, run, tiny_data(), verbose=False)
    self.assert_one_line(ctx)
    self.assertEqual(checkpoint.steps(run), [2])
    self.assertEqual([r["step"] for r in _rows(run)], [0, 3])
    self.assertFalse(os.path.exists(os.path.join(run, workdir_lib.LOCK)))
    history, _ = self.train(run)
    self.assert_uninterrupted(run, history)

  def test_failed_metrics_append_names_the_file(self):
    run = os.path.join(tempfile.mkdtemp(dir=_TMP.name), "run")
    append = workdir_lib.append_jsonl

    def full_at_3(path, row, **kw):
      if row["step"] == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
      return append(path, row, **kw)

    with mock.patch.object(workdir_lib, "append_jsonl", full_at_3):
      with self.assertRaisesRegex(OSError, rf"^could not append to {run}/metrics.jsonl \(No space"
                                  ) as ctx:
        train.train_and_evaluate(C, run, tiny_data(), verbose=False)
    self.assert_one_line(ctx)
    self.assertEqual([r["step"] for r in _rows(run)], [0])
    history, _ = self.train(run)
    self.assert_uninterrupted(run, history)

  def test_replacing_a_file_keeps_the_old_one_when_writing_fails(self):
    folder = tempfile.mkdtemp(dir=_TMP.name)
    path = os.path.join(folder, "config.json")
    workdir_lib.write_text(path, "old")

    def half_then_full(tmp):
      with open(tmp, "w") as f:
        f.write("ne")
      raise OSError(errno.ENOSPC, "No space left on device")

    with self.assertRaisesRegex(OSError, rf"^could not write {path} \(No space left"):
      workdir_lib.replace_file(path, half_then_full)
    self.assertEqual(_read(path), b"old")
    self.assertEqual(os.listdir(folder), ["config.json"])


if __name__ == "__main__":
  absltest.main()
