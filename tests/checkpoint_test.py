"""Checkpoints, automatic resume (in-process and after SIGKILL), and the divergence check."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import resume_worker
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data, untimed

from drt_jax import backends, build, checkpoint, config, data, train

TINY = {**TINY, "algorithm": "drt"}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_trees_equal(test, a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(la, lb):
    test.assertTrue(np.array_equal(np.asarray(x), np.asarray(y)), "checkpoints differ")


def _template(c, backend_place=True):
  c = config.resolve(c)
  model = build.model(c, tiny_data())
  alg = build.algorithm(c)
  state = build.init_state(c, model, alg, build.topology(c))
  return backends.place(state, c.backend, c.num_agents) if backend_place else state


class CheckpointsTest(absltest.TestCase):

  def test_save_restore_keeps_the_latest_and_rebuilds_typed_keys(self):
    state = _template(TINY)
    with tempfile.TemporaryDirectory() as workdir:
      ckpt = checkpoint.Checkpoints(workdir, keep=2)
      for step in (2, 4, 6):
        ckpt.save(step, state._replace(step=jnp.asarray(step, jnp.int32)), {"step": step})
      self.assertEqual(ckpt.all_steps(), [4, 6])
      self.assertEqual(checkpoint.latest_step(workdir), 6)
      restored, host = ckpt.restore(state)
      ckpt.close()
    self.assertEqual(host, {"step": 6})
    self.assertEqual(int(restored.step), 6)
    self.assertTrue(jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key))
    _assert_trees_equal(self, checkpoint.to_arrays(restored._replace(step=state.step)),
                        checkpoint.to_arrays(state))

  def test_restore_gives_the_shard_backend_its_shardings(self):
    if jax.local_device_count() < 2:
      self.skipTest("needs several devices")
    state = _template({**TINY, "num_agents": 8, "backend": "shard"})
    with tempfile.TemporaryDirectory() as workdir:
      ckpt = checkpoint.Checkpoints(workdir)
      ckpt.save(1, state)
      restored, _ = ckpt.restore(state)
      ckpt.close()
    for new, old in zip(jax.tree.leaves(checkpoint.to_arrays(restored)),
                        jax.tree.leaves(checkpoint.to_arrays(state))):
      self.assertTrue(new.sharding.is_equivalent_to(old.sharding, new.ndim), new.sharding)
    self.assertGreater(len(restored.params["Dense_0"]["kernel"].sharding.device_set), 1)

  def test_restore_verifies_the_checksum_and_restore_newest_skips_a_damaged_one(self):
    state = _template(TINY)
    other = state._replace(params=jax.tree.map(lambda x: x + 1, state.params))
    with tempfile.TemporaryDirectory() as workdir:
      ckpt = checkpoint.Checkpoints(workdir, keep=3, config={"seed": 0})
      ckpt.save(2, state, {"step": 2})
      ckpt.save(4, other, {"step": 4})
      restored, host = ckpt.restore(state, 4)
      self.assertEqual(host, {"step": 4, "config": {"seed": 0}})  # the digests stay inside
      self.assertEqual(checkpoint.stored_config(workdir), (4, {"seed": 0}))
      # Checkpoint 4 with the arrays of 2: orbax reads it back without complaint.
      folder = checkpoint.directory(workdir)
      shutil.rmtree(os.path.join(folder, "4", "state"))
      shutil.copytree(os.path.join(folder, "2", "state"), os.path.join(folder, "4", "state"))
      with self.assertRaisesRegex(checkpoint.DamagedCheckpointError, "arrays differ"):
        ckpt.restore(state, 4)
      with self.assertRaisesRegex(checkpoint.DamagedCheckpointError, "checkpoint 4 .* damaged"):
        checkpoint.load(workdir)
      with self.assertLogs("absl", "WARNING") as logs:
        restored, host, step = ckpt.restore_newest(state, [2, 4])
      self.assertEqual(step, 2)
      self.assertLen(logs.records, 1)
      self.assertIn("checkpoint 4 in", logs.records[0].getMessage())
      self.assertEqual(checkpoint.steps(workdir), [2])
      self.assertEqual(os.listdir(os.path.join(workdir, checkpoint.DAMAGED)), ["4"])
      ckpt.save(4, other, {"step": 4})  # the damaged step can be saved again
      self.assertEqual(ckpt.all_steps(), [2, 4])
      ckpt.close()
    _assert_trees_equal(self, checkpoint.to_arrays(restored), checkpoint.to_arrays(state))

  def test_no_checkpoint_is_written_when_off(self):
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate({**TINY, "num_steps": 2, "eval_every": 0}, workdir, tiny_data())
      self.assertIsNone(checkpoint.latest_step(workdir))
      self.assertFalse(os.path.exists(checkpoint.directory(workdir)))


class ResumeTest(parameterized.TestCase):

  @parameterized.named_parameters(("vmap", "vmap", 4), ("shard", "shard", 8))
  def test_resume_continues_bitwise_and_keeps_the_metrics_consistent(self, backend, k_count):
    if backend == "shard" and jax.local_device_count() < 2:
      self.skipTest("needs several devices")
    c = {**TINY, "num_steps": 8, "checkpoint_every": 2, "eval_every": 3, "keep_checkpoints": 3,
         "backend": backend, "num_agents": k_count}
    with tempfile.TemporaryDirectory() as ref, tempfile.TemporaryDirectory() as run:
      full = train.train_and_evaluate(c, ref, tiny_data())
      train.train_and_evaluate(c, run, tiny_data())
      # A crash just before the checkpoint of step 8: its checkpoints 6 and 8 never reached the
      # disk, the row of step 6 did, and the last line was torn.
      for step in (6, 8):
        shutil.rmtree(os.path.join(checkpoint.directory(run), str(step)))
      rows = _rows(run)
      with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 6)
        f.write('{"step": 7, "train_lo')
      self.assertEqual(checkpoint.latest_step(run), 4)
      resumed = train.train_and_evaluate(c, run, tiny_data())
      self.assertEqual([r["step"] for r in _rows(run)], [0, 3, 6, 8])
      self.assertEqual(untimed(_rows(run)), untimed(_rows(ref)))
      self.assertEqual(untimed(resumed), untimed(full))
      _assert_trees_equal(self, checkpoint.load(run)[0], checkpoint.load(ref)[0])
      # A finished run is not trained again: its history comes back from the workdir.
      again = train.train_and_evaluate(c, run, tiny_data())
      self.assertEqual(untimed(again), untimed(full))

  def test_overwrite_starts_afresh_and_another_config_is_refused(self):
    c = {**TINY, "num_steps": 4, "checkpoint_every": 2}
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(c, workdir, tiny_data())
      self.assertEqual(checkpoint.latest_step(workdir), 4)
      other = data.synthetic(num_train=256, num_test=64, shape=(8, 8, 1), seed=1)
      with self.assertRaisesRegex(ValueError, "checkpoint 4 in .* was trained on other data"):
        train.train_and_evaluate(c, workdir, other)  # same config, other data: refused
      self.assertEqual(len(_rows(workdir)), 3)  # untouched on refusal
      with self.assertRaisesRegex(ValueError, "different config"):
        train.train_and_evaluate({**c, "num_steps": 2}, workdir, tiny_data())
      self.assertEqual(checkpoint.latest_step(workdir), 4)  # untouched on refusal
      history = train.train_and_evaluate({**c, "num_steps": 2, "eval_every": 1}, workdir,
                                         tiny_data(), overwrite=True)
      self.assertEqual([r["step"] for r in history], [0, 1, 2])
      self.assertEqual(sorted(os.listdir(checkpoint.directory(workdir))), ["2"])
      self.assertEqual([r["step"] for r in _rows(workdir)], [0, 1, 2])

  def test_killed_process_resumes_bitwise(self):
    """SIGKILL at a random step after the first checkpoint, rerun, compare with a clean run."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_worker.py")
    seed = random.randrange(2**31)
    delay = random.Random(seed).uniform(0.0, 0.6)
    num_steps = resume_worker.CONFIG["num_steps"]

    def run(workdir, *extra):
      out = subprocess.run([sys.executable, worker, workdir, *extra], env=env, check=False,
                           capture_output=True, text=True, timeout=120)
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])

    with tempfile.TemporaryDirectory() as ref, tempfile.TemporaryDirectory() as run_dir:
      run(ref)
      proc = subprocess.Popen([sys.executable, worker, run_dir, "0.03"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      try:
        deadline = time.monotonic() + 90
        while checkpoint.latest_step(run_dir) is None and proc.poll() is None:
          self.assertLess(time.monotonic(), deadline, "no checkpoint appeared")
          time.sleep(0.01)
        time.sleep(delay)
        self.assertIsNone(proc.poll(), f"the run finished before the kill (seed {seed})")
        proc.send_signal(signal.SIGKILL)
      finally:
        proc.kill()
        proc.wait()
      killed_at = checkpoint.latest_step(run_dir)
      self.assertLess(killed_at, num_steps, f"seed {seed}")
      run(run_dir)
      rows = _rows(run_dir)
      steps = [r["step"] for r in rows]
      self.assertEqual(steps, [0, 5, 10, 15, 20, 24], f"seed {seed}, killed after {killed_at}")
      self.assertEqual(untimed(rows), untimed(_rows(ref)), f"seed {seed}")
      final, _ = checkpoint.load(run_dir)
      _assert_trees_equal(self, final, checkpoint.load(ref)[0])
      self.assertEqual(int(final["step"]), num_steps)


class DivergenceTest(absltest.TestCase):

  def test_nan_names_the_step_and_agent_and_the_last_checkpoint_stays_finite(self):
    d = tiny_data()
    parts = [np.arange(k * 64, (k + 1) * 64) for k in range(4)]
    c = config.resolve({**TINY, "algorithm": "atc", "num_steps": 8, "checkpoint_every": 2,
                        "eval_every": 3})
    # The example agent 2 draws at step 5 (sample step 4) and at no earlier step (one local
    # epoch is 8 steps) becomes NaN.
    idx, counts = data.pad_partition(parts, len(d.train_labels))
    k_sample = jax.random.fold_in(jax.random.key(c.seed), 1)
    drawn = data.sample_indices(jax.random.fold_in(k_sample, 0), 4, jnp.asarray(idx),
                                jnp.asarray(counts), c.batch_size)
    images = d.train_images.astype(np.float32)
    images[int(drawn[2, 0])] = np.nan
    bad = {**d._asdict(), "train_images": images, "agent_indices": parts}
    # As if the pixel had escaped the bounded scan for non-finite images (data.validate): the
    # trainer's own check is the one under test.
    unchecked = mock.patch.object(data, "first_non_finite", return_value=None)
    with tempfile.TemporaryDirectory() as workdir, unchecked:
      with self.assertRaises(FloatingPointError) as ctx:
        train.train_and_evaluate(c, workdir, bad)
      self.assertEqual(checkpoint.latest_step(workdir), 4)
      state, _ = checkpoint.load(workdir)
      self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
                          if np.issubdtype(x.dtype, np.floating)))
      self.assertEqual([r["step"] for r in _rows(workdir)], [0, 3])
    message = str(ctx.exception)
    self.assertIn("training loss on agents [2]", message)
    self.assertIn("at step 5", message)
    self.assertIn("parameters on agents [1, 2, 3]", message)  # ATC spread it to the ring
    self.assertNotIn("\n", message)

  def test_huge_learning_rate_stops_the_run(self):
    with self.assertRaisesRegex(FloatingPointError, r"^non-finite .* at step \d+; "):
      train.train_and_evaluate({**TINY, "algorithm": "atc", "learning_rate": 1e30},
                               data=tiny_data())


if __name__ == "__main__":
  absltest.main()
