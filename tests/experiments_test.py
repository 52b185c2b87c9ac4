"""The experiment binary and its configs: each config's smoke variant runs, logs every metric."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPERIMENTS = os.path.join(_ROOT, "experiments")
sys.path.insert(0, _EXPERIMENTS)

import train as train_binary  # noqa: E402  (experiments/train.py)

CONFIGS = ("default", "mnist", "fashion_mnist", "cifar10_resnet20")
# What every row of metrics.jsonl must hold (drt_diffusion.md, "What to measure").
METRICS = ("step", "test_acc_mean", "test_acc_min", "test_acc_max", "test_acc_per_agent",
           "centroid_test_acc", "train_acc_mean", "gen_gap", "consensus_distance",
           "output_disagreement", "drt_mean", "self_weight_mean", "bytes_per_agent_step")


def get_config(name, arg=None):
  path = os.path.join(_EXPERIMENTS, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class ConfigSmokeTest(parameterized.TestCase):

  @parameterized.parameters(*CONFIGS)
  def test_smoke_variant_runs_and_logs_every_metric(self, name):
    c = get_config(name, "smoke")
    with tempfile.TemporaryDirectory() as workdir:
      if c.dataset == "cifar10":  # not available offline: tfds's mock data stands in
        with tfds.testing.mock_data(num_examples=64):
          histories = train_binary.run_experiment(c, workdir)
      else:
        histories = train_binary.run_experiment(c, workdir)
      self.assertEqual(set(histories), set(c.compare))
      for algorithm in c.compare:
        run_dir = os.path.join(workdir, algorithm)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
          rows = [json.loads(line) for line in f]
        self.assertLen(rows, len(histories[algorithm]))
        for key in METRICS:
          self.assertIn(key, rows[-1], f"{name}/{algorithm}")
        if c.validation_fraction:
          self.assertIn("val_acc_mean", rows[-1])
        expected = ["config.json", "curves.png", "metrics.jsonl", "partition.npz",
                    "partition.png"] + (["self_weights.png"] if algorithm.startswith("drt")
                                        else [])
        self.assertContainsSubset(expected, os.listdir(run_dir))
      for produced in ("comparison.png", "summary.md"):
        self.assertTrue(os.path.exists(os.path.join(workdir, produced)))
      with open(os.path.join(workdir, "summary.md")) as f:
        self.assertIn("| drt |", f.read())

  def test_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, "unknown variant 'huge'"):
      get_config("default", "huge")


class BinaryTest(absltest.TestCase):

  def test_workdir_of_another_config_is_refused_unless_overwrite(self):
    c = get_config("default", "smoke")
    with tempfile.TemporaryDirectory() as workdir:
      with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write("x")
      os.makedirs(os.path.join(workdir, "atc"))
      other = train_binary.run_configs(c)["atc"].to_dict()
      other["num_steps"] = 999
      with open(os.path.join(workdir, "atc", "config.json"), "w") as f:
        json.dump(other, f)
      with self.assertRaisesRegex(ValueError, r"workdir .*atc holds a run of a different config "
                                  r"\(num_steps: 999 there, 4 now\)"):
        train_binary.run_experiment(c, workdir)
      self.assertFalse(os.path.exists(os.path.join(workdir, "drt")))  # nothing was trained
      c.compare = ("atc",)
      train_binary.run_experiment(c, workdir, overwrite=True)
      with open(os.path.join(workdir, "atc", "config.json")) as f:
        self.assertEqual(json.load(f)["num_steps"], 4)

  def test_compare_from_the_command_line_and_duplicates(self):
    c = get_config("default", "smoke")
    c.compare = ("local,atc",)
    self.assertEqual(list(train_binary.run_configs(c)), ["local", "atc"])
    c.compare = ("",)  # --config.compare= : the config's own algorithm alone
    self.assertEqual(list(train_binary.run_configs(c)), [c.algorithm])
    c.compare = ("atc", "atc")
    with self.assertRaisesRegex(ValueError, "names an algorithm twice"):
      train_binary.run_configs(c)

  def test_bad_flags_give_one_line(self):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    smoke = f"--config={_EXPERIMENTS}/configs/default.py:smoke"
    for args, expected in (
        ([smoke, "--config.bogus=1"], "unknown config field 'bogus'; known fields:"),
        ([smoke, "--config.drt.bogus=1"],
         "unknown config field 'drt.bogus'; known fields of drt: eps, floor"),
        ([smoke, "--config.dirichlet_alpha=0"], "config.dirichlet_alpha=0.0 is not"),
        ([smoke, "--config.learning_rate=inf"], "config.learning_rate=inf is not"),
        # The smoke config compares drt and atc, which replace the algorithm: still checked.
        ([smoke, "--config.algorithm=bogus"], "config.algorithm='bogus' is not"),
        # Options reach the config from the command line (3 arrives as an int), and are checked.
        ([smoke, "--config.topology_options.rows=3"],
         "config.topology_options.rows=3 is not accepted; expected an option of 'ring'"),
        ([f"--config={_EXPERIMENTS}/configs/bogus.py"], "No such file or directory"),
        ([f"{smoke}x"], "unknown variant 'smokex'")):
      proc = subprocess.run(
          [sys.executable, os.path.join(_EXPERIMENTS, "train.py"), "--workdir=/nonexistent/x",
           *args], capture_output=True, text=True, env=env, timeout=120, check=False)
      self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
      last = proc.stderr.strip().splitlines()[-1]
      self.assertTrue(last.startswith("error: "), proc.stderr[-2000:])
      self.assertIn(expected, last)


if __name__ == "__main__":
  absltest.main()
