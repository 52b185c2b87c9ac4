"""Several processes as one run: 2 CPU processes x 4 devices on localhost (gloo collectives).

The experiment of ``tests/multihost_config.py`` (K = 8, DRT on a ring, a tiny MLP) trained by
``experiments/train.py`` as two processes must give the history and final state of the same
experiment on 1 device (vmap) and on 8 devices (shard, this process: conftest.py) to 1e-5.
Bad input: processes that disagree on the config, K not divisible by the devices, and a
coordinator that cannot be reached all end every process with one line, within a bounded time.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

import jax
import multihost_config  # tests/multihost_config.py: pytest puts tests/ on sys.path
import numpy as np
from absl.testing import absltest
from fixtures import untimed

from drt_jax import backends, checkpoint, distributed, train
from drt_jax import workdir as workdir_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BINARY = os.path.join(_ROOT, "experiments", "train.py")
_CONFIG = os.path.join(_ROOT, "tests", "multihost_config.py")
_TIMEOUT_S = 240  # per launch; a healthy one takes about 10 s on 2 cores


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
          "PYTHONPATH": os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH")))),
          "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}


def _launch(workdir, num_processes=2, ids=None, extra=(), timeout_s=_TIMEOUT_S, ports=None):
  """Runs the binary as processes ``ids`` of ``num_processes``.

  Returns ``[(returncode, stdout, stderr)]`` in the order of ``ids``, and the seconds taken.

  ``ports`` maps a process id to its coordinator's port (default: one free port for all).
  """
  port = _free_port()
  procs = []
  start = time.perf_counter()
  for pid in ids if ids is not None else range(num_processes):
    args = [sys.executable, _BINARY, f"--config={_CONFIG}", f"--workdir={workdir}",
            "--host_devices=4", f"--coordinator_address=localhost:{(ports or {}).get(pid, port)}",
            f"--num_processes={num_processes}", f"--process_id={pid}",
            *(a(pid) if callable(a) else a for a in extra)]
    procs.append(subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out, time.perf_counter() - start


def _last_line(stderr: str) -> str:
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _library_config(**overrides) -> dict:
  c = multihost_config.get_config().to_dict()
  c.pop("compare")
  return {**c, "algorithm": "drt", **overrides}


class MultiProcessRunTest(absltest.TestCase):
  """One 2-process run, then several assertions on what it left."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.workdir = os.path.join(cls.tmp, "two_processes")
    cls.results, cls.seconds = _launch(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    for pid, (code, _, stderr) in enumerate(self.results):
      self.assertEqual(code, 0, f"process {pid} failed:\n{stderr[-3000:]}")

  def test_each_process_holds_its_own_agents(self):
    for pid, (_, _, stderr) in enumerate(self.results):
      self.assertRegex(stderr, rf"process {pid} of 2 holds agents {4 * pid}-{4 * pid + 3} "
                       r"\(their examples and index lists\) on 4 devices")

  def test_files_are_written_once(self):
    run_dir = os.path.join(self.workdir, "drt")
    rows = workdir_lib.read_metrics(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      self.assertLen(f.readlines(), len(rows))  # one line per evaluation, no second writer
    self.assertEqual([r["step"] for r in rows], [0, 3, 6])
    self.assertEqual(checkpoint.latest_step(run_dir), 6)
    self.assertEqual(sorted(os.listdir(checkpoint.directory(run_dir))), ["3", "6"])
    for produced in ("summary.md", "comparison.png", "drt/config.json", "drt/curves.png",
                     "drt/partition.npz"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, produced)), produced)
    (_, main_out, _), (_, other_out, _) = self.results  # only process 0 prints the summary
    self.assertIn("summary: ", main_out)
    self.assertNotIn("summary: ", other_out)
    self.assertNotIn("test acc", other_out)

  def test_same_history_and_parameters_as_one_and_eight_devices(self):
    if jax.device_count() < 8:
      self.skipTest("needs 8 devices in the test process (conftest.py)")
    multi_dir = os.path.join(self.workdir, "drt")
    multi_rows = untimed(workdir_lib.read_metrics(multi_dir))
    multi_state, _ = checkpoint.load(multi_dir)
    for backend in ("vmap", "shard"):
      run_dir = os.path.join(self.tmp, backend)
      rows = untimed(train.train_and_evaluate(_library_config(backend=backend), run_dir))
      state, _ = checkpoint.load(run_dir)
      self.assertEqual(len(rows), len(multi_rows))
      for got, want in zip(multi_rows, rows):
        self.assertEqual(sorted(got), sorted(want))
        for key, value in want.items():
          np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(value, float),
                                     rtol=1e-5, atol=1e-5, err_msg=f"{backend}: {key}")
      self.assertEqual(jax.tree.structure(multi_state), jax.tree.structure(state))
      for got, want in zip(jax.tree.leaves(multi_state), jax.tree.leaves(state)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)

  def test_resumes_from_a_checkpoint_written_by_both_processes(self):
    run_dir = os.path.join(self.tmp, "resumed")
    shutil.copytree(self.workdir, run_dir)
    shutil.rmtree(os.path.join(run_dir, "drt", checkpoint.SUBDIR, "6"))  # as if killed after 3
    self.assertEqual(checkpoint.latest_step(os.path.join(run_dir, "drt")), 3)
    results, _ = _launch(run_dir)
    for code, _, stderr in results:
      self.assertEqual(code, 0, stderr[-3000:])
      self.assertIn("resuming from the checkpoint of step 3", stderr)
    original, resumed = (os.path.join(d, "drt") for d in (self.workdir, run_dir))
    self.assertEqual(untimed(workdir_lib.read_metrics(resumed)),
                     untimed(workdir_lib.read_metrics(original)))
    for got, want in zip(jax.tree.leaves(checkpoint.load(resumed)[0]),
                         jax.tree.leaves(checkpoint.load(original)[0])):
      np.testing.assert_array_equal(got, want)


class ArgumentsTest(absltest.TestCase):
  """What initialize accepts, checked without joining anything."""

  def test_nothing_given_or_one_process_is_a_single_process_run(self):
    with mock.patch.dict(os.environ, {}, clear=False):
      for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                   distributed.ENV_PROCESS_ID):
        os.environ.pop(name, None)
      self.assertFalse(distributed.initialize())
      os.environ.update({distributed.ENV_COORDINATOR: "localhost:1234",
                         distributed.ENV_NUM_PROCESSES: "1", distributed.ENV_PROCESS_ID: "0"})
      self.assertFalse(distributed.initialize())
    self.assertTrue(distributed.is_main())
    self.assertFalse(jax.distributed.is_initialized())

  def test_incomplete_or_malformed_arguments_give_one_line(self):
    with mock.patch.dict(os.environ, {distributed.ENV_PROCESS_ID: ""}):
      for args, message in (
          (("localhost:1234", 2, None), "process_id missing"),
          (("localhost", 2, 0), "coordinator address 'localhost' is not host:port"),
          (("localhost:1234", 2, 2), "process_id=2 with num_processes=2: ids run from 0"),
          (("localhost:1234", "two", 0), "num_processes='two' is not an integer")):
        with self.assertRaisesRegex(ValueError, message):
          distributed.initialize(*args)


class BadInputTest(absltest.TestCase):

  def test_processes_with_different_configs_all_fail_with_one_line(self):
    with tempfile.TemporaryDirectory() as workdir:
      results, _ = _launch(workdir, extra=(
          lambda pid: f"--config.learning_rate={0.05 if pid == 0 else 0.1}",))
      for code, _, stderr in results:
        self.assertEqual(code, 1, stderr[-3000:])
        self.assertEqual(_last_line(stderr), "error: processes [1] hold a different config than "
                         "process 0; start every process with the same config and overrides")
      self.assertFalse(os.path.exists(os.path.join(workdir, "drt", "metrics.jsonl")))

  def test_agents_not_divisible_by_all_devices_are_refused_on_every_process(self):
    with tempfile.TemporaryDirectory() as workdir:
      results, _ = _launch(workdir, extra=("--config.num_agents=6",))
    for code, _, stderr in results:
      self.assertEqual(code, 1, stderr[-3000:])
      self.assertEqual(_last_line(stderr), "error: K=6 agents cannot be split evenly over 8 "
                       "devices of 2 processes; use a multiple of 8 (num_agents=8)")

  def test_one_process_shards_over_the_devices_that_divide_k(self):
    if jax.device_count() != 8:
      self.skipTest("needs 8 devices (conftest.py)")
    for k_count, used in ((16, 8), (12, 6), (4, 4), (7, 7), (11, 1), (1, 1)):
      backends.check("shard", k_count)
      self.assertEqual(backends.mesh_size(k_count), used, k_count)
      self.assertEqual(backends.agents_mesh(k_count).devices.tolist(), jax.devices()[:used])
      self.assertEqual(backends.resolve("auto", k_count), "shard" if used > 1 else "vmap")
      self.assertLen(backends.agent_blocks("shard", k_count), used)

  def test_unreachable_coordinator_fails_fast_naming_the_address(self):
    ports = {1: _free_port(), 0: _free_port()}  # nobody listens on either yet
    with tempfile.TemporaryDirectory() as workdir:
      # Process 1 cannot reach its coordinator; process 0 serves another, where nobody arrives.
      results, seconds = _launch(workdir, ids=(1, 0), extra=("--join_timeout_s=3",),
                                 ports=ports, timeout_s=90)
    (code1, _, err1), (code0, _, err0) = results
    self.assertEqual(code1, 1, err1[-3000:])
    self.assertEqual(_last_line(err1), f"error: process 1 could not reach the coordinator at "
                     f"localhost:{ports[1]} within 3s; start process 0 there (it serves the "
                     "coordinator) or fix --coordinator_address / DRT_JAX_COORDINATOR")
    self.assertEqual(code0, 1, err0[-3000:])
    self.assertRegex(_last_line(err0), rf"^error: not every process joined the coordinator at "
                     rf"localhost:{ports[0]} within 3s \(this is process 0\)")
    self.assertLess(seconds, 60)


if __name__ == "__main__":
  absltest.main()
