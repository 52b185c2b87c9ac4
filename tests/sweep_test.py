"""experiments/sweep.py and experiments/plot.py: points, resumable runs, one compile per shape,
vectorised blocks."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import chex
import jax
from absl.testing import absltest
from fixtures import untimed

from drt_jax import vectorize
from drt_jax import workdir as workdir_lib
from experiments import plot, sweep

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPERIMENTS = os.path.join(_ROOT, "experiments")

# A hidden width no other test compiles, so this file's first sweep compiles its own step.
BASE = {
    "dataset": "synthetic", "num_agents": 4, "model": "mlp", "model_options": {"hidden": (13,)},
    "batch_size": 8, "num_steps": 4, "eval_every": 2, "eval_examples": 64,
    "train_eval_examples": 64, "eval_batch_size": 32, "backend": "vmap", "partition": "iid",
}
METRICS = ("step", "epoch", "test_acc_mean", "test_acc_min", "test_acc_max", "centroid_test_acc",
           "train_acc_mean", "gen_gap", "consensus_distance", "output_disagreement",
           "drt_log1p_mean", "drt_mean", "bytes_per_agent_step", "steps_per_sec", "wall_time")
# Two seeds x two learning rates: one vectorised block.
GRID = sweep.points({"seed": [0, 1], "learning_rate": [0.05, 0.1]})
# What a mocked train_one returns: a finished point.
DONE = {"history": [{"step": 0, "test_acc_mean": 0.5}], "final": {"step": 0, "test_acc_mean": 0.5},
        "best_test_acc_mean": 0.5, "wall_time_s": 1.0, "status": "ok"}


class _Lines(logging.Handler):

  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


class _TempDirs(absltest.TestCase):

  def _tmp(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name


class PointsTest(absltest.TestCase):

  def test_product_in_grid_order_last_field_fastest(self):
    got = sweep.points({"algorithm": ["atc", "drt"], "seed": [0, 1], "drt.strength": [0.5]})
    self.assertEqual(got, [
        {"algorithm": "atc", "seed": 0, "drt.strength": 0.5},
        {"algorithm": "atc", "seed": 1, "drt.strength": 0.5},
        {"algorithm": "drt", "seed": 0, "drt.strength": 0.5},
        {"algorithm": "drt", "seed": 1, "drt.strength": 0.5}])
    self.assertEqual(sweep.points({}), [{}])
    with self.assertRaisesRegex(ValueError, "'seed' has no values"):
      sweep.points({"seed": []})

  def test_key_is_stable_and_names_are_unique(self):
    self.assertEqual(sweep.run_key({"seed": 1, "algorithm": "drt"}),
                     sweep.run_key({"algorithm": "drt", "seed": 1}))
    a = sweep.safe_name(sweep.run_key({"seed": 1}))
    b = sweep.safe_name(sweep.run_key({"seed": "1"}))
    self.assertNotEqual(a, b)
    self.assertStartsWith(a, "seed=1-")

  def test_dotted_overrides_merge_into_the_base(self):
    c = sweep.config_for({**BASE, "drt": {"floor": 0.1}}, {"drt.strength": 2.0,
                                                         "model_options.hidden": (5,)})
    self.assertEqual(c["drt"], {"floor": 0.1, "strength": 2.0})
    self.assertEqual(c["model_options"], {"hidden": (5,)})
    self.assertEqual(BASE["model_options"], {"hidden": (13,)})  # the base is not modified


class GridFlagTest(absltest.TestCase):

  def test_values_are_json_where_possible(self):
    grid = sweep.parse_grid(["seed=0,1", "topology=ring, full", "drt.strength=0.5,1e-3",
                             "same_init=true,false", 'dataset="0"'])
    self.assertEqual(grid, {"seed": [0, 1], "topology": ["ring", "full"],
                            "drt.strength": [0.5, 1e-3], "same_init": [True, False],
                            "dataset": ["0"]})
    self.assertEqual(sweep.parse_grid(["model_options.hidden=8"]), {"model_options.hidden": [8]})

  def test_bad_input_is_refused_in_one_line(self):
    for spec, problem in [("seed", "malformed"), ("=1", "malformed"), ("seed=", "empty value"),
                          ("seed=0,,1", "empty value"), ("sed=0,1", "unknown config field 'sed'"),
                          ("drt.bogus=1", "unknown config field 'drt.bogus'"),
                          ("seed.x=1", "unknown config field 'seed.x'")]:
      with self.assertRaises(ValueError, msg=spec) as e:
        sweep.parse_grid([spec])
      self.assertIn(problem, str(e.exception))
      self.assertIn("field=v1,v2", str(e.exception))
      self.assertNotIn("\n", str(e.exception))
    with self.assertRaisesRegex(ValueError, "given twice"):
      sweep.parse_grid(["seed=0", "seed=1"])

  def test_bad_values_are_refused_before_training(self):
    with mock.patch.object(sweep.train, "train_and_evaluate") as train_fn:
      with self.assertRaisesRegex(ValueError, r'grid point \{"topology": "moebius"\}: '
                                  r"config.topology='moebius' is not accepted"):
        sweep.run(BASE, [{"seed": 0}, {"topology": "moebius"}], "/nonexistent/out.jsonl")
      with self.assertRaisesRegex(ValueError, "num_steps"):
        sweep.run(BASE, [{"num_steps": 2.5}], "/nonexistent/out.jsonl")
      train_fn.assert_not_called()


class SweepTest(_TempDirs):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.out = os.path.join(cls.tmp, "sweep.jsonl")
    logger, handler = logging.getLogger("jax._src.interpreters.pxla"), _Lines()
    logger.addHandler(handler)
    try:
      with jax.log_compiles():  # the sequential path: vectorised, the seeds would be one block
        cls.rows = sweep.run(BASE, sweep.points({"seed": [0, 1]}), cls.out,
                             workdir_root=os.path.join(cls.tmp, "runs"), vectorize="off")
    finally:
      logger.removeHandler(handler)
    cls.compiled = [line for line in handler.lines if "Compiling jit(" in line]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp)
    super().tearDownClass()

  def test_seeds_share_one_compiled_train_step(self):
    steps = [line for line in self.compiled if "Compiling jit(train_step" in line]
    self.assertLen(steps, 1, self.compiled)

  def test_one_row_per_run_with_every_metric(self):
    lines = _lines(self.out)
    self.assertEqual(lines, self.rows)
    self.assertEqual([r["key"] for r in lines], ['{"seed": 0}', '{"seed": 1}'])
    for row in lines:
      self.assertEqual(row["status"], "ok")
      self.assertEqual(row["config"]["seed"], row["overrides"]["seed"])
      self.assertEqual(row["config"]["model_options"], {"hidden": [13]})
      self.assertEqual([h["step"] for h in row["history"]], [0, 2, 4])
      self.assertEqual(row["final"], row["history"][-1])
      self.assertContainsSubset(METRICS, row["final"])
      self.assertTrue(any(k.startswith("consensus/") for k in row["final"]))
      self.assertNotIn("test_acc_per_agent", row["final"])
      self.assertEqual(row["best_test_acc_mean"],
                       max(h["test_acc_mean"] for h in row["history"]))
      self.assertGreater(row["wall_time_s"], 0)
      workdir = os.path.join(self.tmp, "runs", sweep.safe_name(row["key"]))
      self.assertTrue(os.path.exists(os.path.join(workdir, "metrics.jsonl")))
    # Different seeds, different runs.
    self.assertNotEqual(lines[0]["history"][-1]["consensus_distance"],
                        lines[1]["history"][-1]["consensus_distance"])

  def test_second_call_trains_nothing(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    shutil.copy(self.out, out)
    with (mock.patch.object(sweep.train, "train_and_evaluate") as train_fn,
          self.assertLogs("absl", level="INFO") as logs):
      rows = sweep.run(BASE, sweep.points({"seed": [0, 1]}), out)
    train_fn.assert_not_called()
    self.assertEqual(rows, self.rows)
    self.assertEqual(_lines(out), self.rows)
    self.assertTrue(any("skipping 2 finished runs" in line for line in logs.output), logs.output)

  def test_failed_runs_get_an_error_row_and_are_retried(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    too_big = {"batch_size": 5000}  # valid config, but no agent holds 5000 examples
    real = sweep.train.train_and_evaluate

    def lose_device_once(config, *args, **kwargs):  # too_big fails for real, seed 0 here
      if config["batch_size"] != too_big["batch_size"]:
        raise RuntimeError("device lost\ndetails")
      return real(config, *args, **kwargs)

    failing = mock.patch.object(sweep.train, "train_and_evaluate", side_effect=lose_device_once)
    with failing, self.assertLogs("absl", level="ERROR"):
      rows = sweep.run(BASE, [too_big, {"seed": 0}], out)
    self.assertEqual([r["status"] for r in rows], ["error", "error"])
    self.assertIn("batch_size", rows[0]["error"])
    self.assertEqual(rows[1]["error"], "RuntimeError: device lost")
    self.assertLen(_lines(out), 2)

    with self.assertLogs("absl", level="ERROR"):
      rows = sweep.run(BASE, [too_big, {"seed": 0}], out)  # both retried: one now succeeds
    self.assertEqual([r["status"] for r in rows], ["error", "ok"])
    self.assertEqual(rows[1]["final"], self.rows[0]["final"] | {
        k: rows[1]["final"][k] for k in ("steps_per_sec", "wall_time")})
    self.assertLen(_lines(out), 4)

  def test_a_diverging_point_is_a_result_and_not_retried(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    point = {"learning_rate": 1e30}  # NaN at once
    with self.assertLogs("absl", level="WARNING"):
      rows = sweep.run(BASE, [point], out)
    self.assertEqual(rows[0]["status"], "diverged")
    self.assertIn("FloatingPointError: non-finite", rows[0]["error"])
    again = sweep.run(BASE, [point], out)  # skipped: no new line
    self.assertEqual(again, rows)
    self.assertLen(_lines(out), 1)

  def test_a_line_cut_short_is_ignored_and_not_appended_to(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    with open(out, "w") as f:
      f.write(json.dumps(self.rows[0]) + "\n" + json.dumps(self.rows[1])[:50])
    self.assertEqual(workdir_lib.read_jsonl(out), self.rows[:1])
    workdir_lib.append_jsonl(out, {"key": "x", "status": "error"})
    self.assertEqual(workdir_lib.read_jsonl(out), [self.rows[0], {"key": "x", "status": "error"}])

  def test_summary_and_plot(self):
    other = [{**r, "overrides": {**r["overrides"], "algorithm": "drt"},
              "config": {**r["config"], "algorithm": "drt"}} for r in self.rows]
    groups = plot.group(self.rows + other)
    self.assertEqual({k: len(v) for k, v in groups.items()}, {"base": 2, "algorithm=drt": 2})
    self.assertEqual(list(plot.group(self.rows + other, by="algorithm")),
                     ["algorithm=atc", "algorithm=drt"])
    table = plot.summary(groups)
    self.assertIn("| base | ", table)
    self.assertIn(" ± ", table)
    self.assertTrue(table.splitlines()[-1].endswith("| 2 |"))
    path = plot.plot(groups, os.path.join(self._tmp(), "comparison.png"))
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertLess(os.path.getsize(path), 300_000)

  def test_load_keeps_ok_rows_once(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    shutil.copy(self.out, out)
    workdir_lib.append_jsonl(out, {"key": "x", "status": "error", "error": "E"})
    self.assertEqual(plot.load([out, self.out]), self.rows)


def assert_same_rows(test, got, want):
  """Rows of the same points with the same fields and values, up to timings and float rounding
  (a vectorised step may round its batched products differently)."""
  test.assertEqual([r["key"] for r in got], [r["key"] for r in want])
  for g, w in zip(got, want):
    test.assertEqual(sorted(g), sorted(w), g["key"])
    exact = ("key", "overrides", "config", "status", "error")
    test.assertEqual({k: g.get(k) for k in exact}, {k: w.get(k) for k in exact})
    if w["status"] == "ok":
      test.assertEqual([sorted(r) for r in g["history"]], [sorted(r) for r in w["history"]])
      chex.assert_trees_all_close(untimed(g["history"]), untimed(w["history"]), rtol=1e-5,
                                  atol=1e-6, custom_message=g["key"])
      test.assertEqual(g["final"], g["history"][-1])
      test.assertAlmostEqual(g["best_test_acc_mean"], w["best_test_acc_mean"], places=5)


class VectorizedSweepTest(_TempDirs):

  def test_a_block_writes_the_rows_of_its_sequential_runs(self):
    tmp = self._tmp()
    seq = sweep.run(BASE, GRID, os.path.join(tmp, "seq.jsonl"), vectorize="off")
    out = os.path.join(tmp, "vec.jsonl")
    with (mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many",
                            wraps=vectorize.train_and_evaluate_many) as many,
          mock.patch.object(sweep, "train_one", side_effect=AssertionError("sequential"))):
      rows = sweep.run(BASE, GRID, out, workdir_root=os.path.join(tmp, "runs"), vectorize="on")
    many.assert_called_once()
    self.assertLen(many.call_args.args[1], 4)  # one program for the four points
    self.assertEqual(_lines(out), rows)
    assert_same_rows(self, rows, seq)
    self.assertLen({r["final"]["train_loss"] for r in rows}, 4)  # the points do differ
    self.assertLen({r["wall_time_s"] for r in rows}, 1)  # each its share of the block's
    for row in rows:
      workdir = os.path.join(tmp, "runs", sweep.safe_name(row["key"]))
      self.assertLen(workdir_lib.read_metrics(workdir), len(row["history"]))

  def test_a_shape_changing_field_splits_the_grid_into_blocks(self):
    # Blocks of four, as GRID's: the atc block reuses its compiled step where it ran first.
    grid = sweep.points({"seed": [0, 1], "algorithm": ["atc", "drt"],
                         "learning_rate": [0.05, 1e30]})
    by_algorithm = [[p for p in grid if p["algorithm"] == a] for a in ("atc", "drt")]
    self.assertEqual(sweep.blocks(BASE, grid), by_algorithm)
    out = os.path.join(self._tmp(), "sweep.jsonl")
    with (mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many",
                            wraps=vectorize.train_and_evaluate_many) as many,
          mock.patch.object(sweep, "AUTO_PLATFORMS", ("cpu",)),  # auto as on an accelerator
          self.assertLogs("absl", level="WARNING")):
      rows = sweep.run(BASE, grid, out)  # auto
    self.assertEqual([len(c.args[1]) for c in many.call_args_list], [4, 4])
    self.assertEqual([r["overrides"] for r in rows], grid)  # returned in grid order
    self.assertEqual([r["overrides"] for r in _lines(out)], by_algorithm[0] + by_algorithm[1])
    self.assertEqual([r["status"] for r in rows], ["ok", "diverged"] * 4)
    # A diverged member's row is the one its sequential run (which raised) writes.
    alone = sweep.run(BASE, [grid[1]], os.path.join(self._tmp(), "one.jsonl"), vectorize="off")
    assert_same_rows(self, rows[1:2], alone)
    self.assertTrue(all(r["error"].startswith("FloatingPointError: non-finite")
                        for r in rows[1::2]))

  def test_on_refuses_a_block_in_one_line_and_auto_runs_it_point_by_point(self):
    er = {**BASE, "topology": "erdos_renyi"}  # a graph drawn from the seed: other lists
    seeds = sweep.points({"seed": [0, 1]})
    out = os.path.join(self._tmp(), "sweep.jsonl")
    with (mock.patch.object(sweep, "train_one") as train_one,
          mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many") as many,
          self.assertRaises(ValueError) as caught):
      sweep.run(er, seeds, out, vectorize="on")
    train_one.assert_not_called()
    many.assert_not_called()
    message = str(caught.exception)
    self.assertStartsWith(message, 'vectorize=on: the block of 2 points from {"seed": 0} cannot '
                          "run as one program: member 1's graph has other neighbour lists")
    self.assertNotIn("\n", message)
    self.assertEqual(workdir_lib.read_jsonl(out), [])
    self.assertFalse(os.path.exists(out + ".lock"))

    with (mock.patch.object(sweep, "train_one", return_value=dict(DONE)) as train_one,
          mock.patch.object(sweep, "AUTO_PLATFORMS", ("cpu",)),
          self.assertLogs("absl", level="INFO") as logs):
      rows = sweep.run(er, seeds, out)
    self.assertEqual(train_one.call_count, 2)
    refused = [line for line in logs.output if "runs sequentially" in line]
    self.assertLen(refused, 1, logs.output)
    self.assertIn("other neighbour lists", refused[0])
    self.assertEqual([r["status"] for r in rows], ["ok", "ok"])
    with self.assertRaisesRegex(ValueError, "vectorize='sometimes' is not one of auto, on, off"):
      sweep.run(er, seeds, out, vectorize="sometimes")

  def test_auto_trains_point_by_point_on_a_cpu(self):
    # Measured no faster per member there (benchmarks/sweeps.py), so auto does not pick it.
    self.assertNotIn("cpu", sweep.AUTO_PLATFORMS)
    out = os.path.join(self._tmp(), "sweep.jsonl")
    with (mock.patch.object(sweep, "train_one", return_value=dict(DONE)) as train_one,
          mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many") as many,
          self.assertLogs("absl", level="INFO") as logs):
      sweep.run(BASE, sweep.points({"seed": [0, 1, 2]}), out)
    self.assertEqual(train_one.call_count, 3)
    many.assert_not_called()
    self.assertTrue(any("vectorize=auto on cpu trains the points one by one" in line
                        for line in logs.output), logs.output)

  def test_a_rerun_trains_only_the_unfinished_members_of_a_block(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    grid = sweep.points({"seed": [0, 1, 2, 3]})
    for point in grid[::2]:  # seeds 0 and 2 finished
      workdir_lib.append_jsonl(out, {"key": sweep.run_key(point), "overrides": point,
                                     "config": sweep.config_for(BASE, point), **DONE})
    history = [{"step": 0, "test_acc_mean": 0.25, "loss": float("nan")}]
    got = [vectorize.MemberHistory(history),
           vectorize.MemberHistory([], "diverged", 3, "non-finite loss at step 3; details\nmore")]
    with (mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many",
                            return_value=got) as many,
          mock.patch.object(sweep, "train_one") as train_one,
          self.assertLogs("absl", level="WARNING")):
      rows = sweep.run(BASE, grid, out, vectorize="on")
    train_one.assert_not_called()
    many.assert_called_once()
    self.assertEqual([m["seed"] for m in many.call_args.args[1]], [1, 3])
    self.assertEqual([r["key"] for r in rows], [sweep.run_key(p) for p in grid])
    self.assertEqual([r["status"] for r in rows], ["ok", "ok", "ok", "diverged"])
    self.assertEqual(rows[1]["history"], [{"step": 0, "test_acc_mean": 0.25, "loss": None}])
    self.assertEqual(sorted(rows[3]), ["config", "error", "key", "overrides", "status",
                                       "wall_time_s"])  # as a sequential run that raised
    self.assertEqual(rows[3]["error"], "FloatingPointError: non-finite loss at step 3; details")
    self.assertLen(_lines(out), 4)
    with mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many") as many:
      self.assertEqual(sweep.run(BASE, grid, out), rows)  # all finished: nothing trains
    many.assert_not_called()

  def test_a_block_that_fails_runs_its_points_one_by_one(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    with (mock.patch.object(sweep.vectorize_lib, "train_and_evaluate_many",
                            side_effect=RuntimeError("out of memory\ndetails")),
          mock.patch.object(sweep, "train_one", return_value=dict(DONE)) as train_one,
          self.assertLogs("absl", level="WARNING") as logs):
      rows = sweep.run(BASE, GRID, out, vectorize="on")
    self.assertEqual(train_one.call_count, 4)
    self.assertTrue(any("RuntimeError: out of memory); its runs go one by one" in line
                        for line in logs.output), logs.output)
    self.assertEqual([r["status"] for r in rows], ["ok"] * 4)


class CurvesTest(absltest.TestCase):

  def test_mean_and_std_over_runs_at_shared_steps(self):
    rows = [{"history": [{"step": 0, "m": 1.0}, {"step": 5, "m": 3.0}, {"step": 10, "m": 5.0}]},
            {"history": [{"step": 0, "m": 3.0}, {"step": 10, "m": 7.0}]}]
    steps, mean, std = plot.curves(rows, "m")
    self.assertEqual(steps.tolist(), [0, 10])
    self.assertEqual(mean.tolist(), [2.0, 6.0])
    self.assertAlmostEqual(std[0], 2 ** 0.5)
    self.assertEqual(len(plot.curves(rows, "absent")[0]), 0)


class CommandLineTest(_TempDirs):

  def test_cli_sweeps_then_plots_and_refuses_a_bad_grid(self):
    tmp = self._tmp()
    config = os.path.join(tmp, "tiny.py")
    with open(config, "w") as f:
      f.write(textwrap.dedent(f"""
          from drt_jax import config as config_lib

          def get_config(arg=None):
            c = config_lib.default_config()
            c.update({{k: v for k, v in {BASE!r}.items() if k != "model_options"}})
            c.model_options.hidden = (13,)
            c.compare = ("atc",)
            return c
          """))
    out = os.path.join(tmp, "sweep.jsonl")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(_EXPERIMENTS, "sweep.py"), f"--config={config}",
           "--host_devices=1", f"--out={out}"]
    proc = subprocess.run(cmd + ["--grid=learning_rate=0.05,0.1"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('{"learning_rate": 0.1}', proc.stdout)
    self.assertEqual([r["status"] for r in _lines(out)], ["ok", "ok"])

    proc = subprocess.run(cmd + ["--grid=learning_rate"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(proc.stderr.strip().splitlines(),
                     [f"error: --grid 'learning_rate' is malformed; expected {sweep.GRID_FORM}"])

    plots = os.path.join(tmp, "plots")
    proc = subprocess.run([sys.executable, os.path.join(_EXPERIMENTS, "plot.py"),
                           f"--sweep={out}", f"--out={plots}"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("| learning_rate=0.1 |", proc.stdout)
    self.assertTrue(os.path.exists(os.path.join(plots, "comparison.png")))
    self.assertTrue(os.path.exists(os.path.join(plots, "summary.md")))

    # Bad input: one line, before anything is trained or written.
    for argv, expected in (
        (cmd[:-1] + [f"--out={tmp}", "--grid=seed=0"], f"error: --out={tmp} is a folder"),
        ([sys.executable, os.path.join(_EXPERIMENTS, "plot.py"), f"--sweep={out}",
          f"--out={plots}_typo", "--metrics=test_acc_meen"],
         "error: --metrics: no run has 'test_acc_meen'; the runs have: "),
        ([sys.executable, os.path.join(_EXPERIMENTS, "plot.py"), f"--sweep={tmp}",
          f"--out={plots}_typo"], "error: [Errno 21] Is a directory")):
      proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                            check=False)
      self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
      lines = proc.stderr.strip().splitlines()
      self.assertLen(lines, 1, proc.stderr[-3000:])
      self.assertStartsWith(lines[0], expected)
    self.assertFalse(os.path.exists(f"{plots}_typo"))


if __name__ == "__main__":
  absltest.main()
