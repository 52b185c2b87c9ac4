"""The experiment binary and its configs: each config's smoke variant runs, logs every metric;
variants such as ``algorithm=atc,agents=32,smoke`` set their fields or are refused in one line."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from drt_jax import config as config_lib
from experiments import train as train_binary

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPERIMENTS = os.path.join(_ROOT, "experiments")

CONFIGS = ("default", "mnist", "fashion_mnist", "cifar10_resnet20")
# The k=v knobs every config file takes besides ``algorithm``, and the fields they set.
KNOB_FIELDS = {"agents": "num_agents", "topology": "topology", "steps": "num_steps",
               "seed": "seed", "lr": "learning_rate"}
# What every row of metrics.jsonl must hold (drt_diffusion.md, "What to measure").
METRICS = ("step", "test_acc_mean", "test_acc_min", "test_acc_max", "test_acc_per_agent",
           "centroid_test_acc", "train_acc_mean", "gen_gap", "consensus_distance",
           "output_disagreement", "drt_mean", "self_weight_mean", "bytes_per_agent_step")


def run_binary(name, *args, timeout=120):
  """``python experiments/<name>.py *args`` on CPU, its output captured: cheap for bad input,
  which fails before JAX compiles anything."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(_EXPERIMENTS, f"{name}.py"), *args],
                        capture_output=True, text=True, env=env, timeout=timeout, check=False)


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


class VariantTest(parameterized.TestCase):
  """``get_config(arg)``: comma-separated flags and k=v knobs, parsed by config.parse_arg."""

  def test_knobs_set_fields_together_with_smoke(self):
    c = get_config("default", "algorithm=atc,agents=32,smoke")
    self.assertEqual(c.num_agents, 32)
    self.assertEqual(c.algorithm, "atc")
    self.assertEqual(c.compare, ("atc",))  # one run of the named algorithm, not DRT vs ATC
    smoke = get_config("default", "smoke")
    self.assertEqual((c.num_steps, c.model_options.hidden),
                     (smoke.num_steps, smoke.model_options.hidden))
    # Knobs apply after the flags, whatever the order.
    self.assertEqual(get_config("default", "smoke,agents=32,algorithm=atc").to_dict(),
                     c.to_dict())

  @parameterized.parameters(*CONFIGS)
  def test_each_knob_sets_its_field_alone(self, name):
    base = get_config(name).to_dict()
    c = get_config(name, "agents=7,topology=torus,steps=3,seed=5,lr=1").to_dict()
    expected = {**base, "num_agents": 7, "topology": "torus", "num_steps": 3, "seed": 5,
                "learning_rate": 1.0}
    self.assertEqual(c, expected)
    self.assertIsInstance(c["learning_rate"], float)  # lr=1 becomes the field's float

  @parameterized.parameters(*CONFIGS)
  def test_existing_variants_unchanged(self, name):
    c = get_config(name)
    self.assertEqual(c.to_dict(), get_config(name, None).to_dict())
    self.assertEqual(c.to_dict(), get_config(name, "").to_dict())
    self.assertEqual(c.compare, ("drt", "atc"))
    # Every knob at its default, spelt out, is the config itself.
    arg = ",".join(f"{knob}={c[field]!r}" for knob, field in KNOB_FIELDS.items())
    self.assertEqual(get_config(name, arg).to_dict(), c.to_dict())
    smoke = get_config(name, "smoke")
    self.assertLess(smoke.num_steps, c.num_steps)
    self.assertEqual(get_config(name, "smoke,").to_dict(), smoke.to_dict())

  def test_default_and_smoke_as_documented(self):
    c = get_config("default")
    self.assertEqual((c.num_agents, c.num_steps, c.eval_every, c.learning_rate, c.batch_size),
                     (16, 300, 50, 0.01, 16))
    c = get_config("default", "smoke")
    self.assertEqual((c.num_agents, c.num_steps, c.eval_every, c.eval_examples,
                      c.train_eval_examples), (4, 4, 2, 64, 64))
    self.assertEqual(c.model_options.to_dict(), {"features": (4, 8, 8), "hidden": 16})

  @parameterized.parameters(
      ("bogus=1", "unknown knob 'bogus' in 'bogus=1'"),
      ("smoke,huge", "unknown variant 'huge'"),
      ("agents=", "malformed config variant 'agents='; expected name=value"),
      ("=4", "malformed config variant '=4'"),
      ("agents", "knob 'agents' needs a value, e.g. agents=16"),
      ("smoke=1", "flag 'smoke' takes no value"),
      ("agents=abc", "knob 'agents' takes a value of type int such as agents=16, got "
       "'agents=abc'"),
      ("agents=True", "knob 'agents' takes a value of type int"),
      ("lr=fast", "knob 'lr' takes a value of type float"),
      ("algorithm=3", "knob 'algorithm' takes a value of type str"),
      ("agents=4,agents=8", "'agents' given twice"),
      ("steps=(1", "unbalanced brackets"),
      ("algorithm='atc", "unbalanced brackets or quotes"))
  def test_bad_variant_is_one_line_listing_what_is_accepted(self, arg, expected):
    with self.assertRaises(ValueError) as caught:
      get_config("default", arg)
    message = str(caught.exception)
    self.assertIn(expected, message)
    self.assertNotIn("\n", message)
    self.assertEndsWith(message, "; accepted: knobs agents=16, algorithm='', topology='ring', "
                        "steps=300, seed=0, lr=0.01; flags smoke")

  def test_parse_arg_values(self):
    knobs = {"features": (1, 1), "lr": 0.1, "name": "a", "k": 1}
    values, flags = config_lib.parse_arg(
        " features=(8, 8), lr=1e-3,name=atc , k=3,smoke", knobs, ("smoke", "tiny"))
    self.assertEqual(values, {"features": (8, 8), "lr": 1e-3, "name": "atc", "k": 3})
    self.assertEqual(flags, {"smoke"})
    self.assertEqual(config_lib.parse_arg("features=[2, 3],lr=2", knobs),
                     ({"features": (2, 3), "lr": 2.0}, set()))
    self.assertEqual(config_lib.parse_arg("name='x,y'", knobs), ({"name": "x,y"}, set()))
    for arg in (None, ""):
      self.assertEqual(config_lib.parse_arg(arg, knobs), ({}, set()))
    with self.assertRaisesRegex(ValueError, "^unknown variant 'x'; accepted: knobs none; "
                                "flags none$"):
      config_lib.parse_arg("x", {})


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
    c.compare = ("atc", "bogus")  # said of compare, which named it
    with self.assertRaisesRegex(ValueError, "^config.compare names 'bogus': config.algorithm="
                                "'bogus' is not accepted; expected one of: atc,"):
      train_binary.run_configs(c)

  def test_compare_gives_each_algorithm_the_options_it_takes(self):
    c = get_config("default", "smoke")
    c.compare = ("atc", "choco")
    c.algorithm_options = {"compressor": "quantize", "bits": 2}
    configs = train_binary.run_configs(c)
    self.assertEqual(configs["atc"].algorithm_options.to_dict(), {})
    self.assertEqual(configs["choco"].algorithm_options.to_dict(),
                     {"compressor": "quantize", "bits": 2})
    c.algorithm_options = {"compressor": "quantize", "form": "dsgt"}
    with self.assertRaisesRegex(ValueError, "^config.algorithm_options.form is an option of none "
                                r"of the compared algorithms \(atc, choco\)"):
      train_binary.run_configs(c)
    c.compare = ("atc", "choco", "gradient_tracking")
    configs = train_binary.run_configs(c)
    self.assertEqual(configs["gradient_tracking"].algorithm_options.to_dict(), {"form": "dsgt"})

  def test_bad_flags_give_one_line(self):
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
        ([f"{smoke}x"], "unknown variant 'smokex'"),
        ([f"{smoke},agents=abc"], "knob 'agents' takes a value of type int such as agents=16, "
         "got 'agents=abc'; accepted: knobs agents=16, algorithm='',")):
      proc = run_binary("train", "--workdir=/nonexistent/x", *args)
      self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
      last = proc.stderr.strip().splitlines()[-1]
      self.assertTrue(last.startswith("error: "), proc.stderr[-2000:])
      self.assertIn(expected, last)

  def test_variant_knobs_from_the_command_line(self):
    # The k=v form end to end, as small as a run gets: 4 agents, 2 steps, ATC alone.
    config = f"--config={_EXPERIMENTS}/configs/default.py:smoke,agents=4,steps=2,algorithm=atc"
    with tempfile.TemporaryDirectory() as workdir:
      proc = run_binary("train", config, f"--workdir={workdir}", "--host_devices=1", timeout=300)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertEqual(sorted(os.listdir(workdir)), ["atc", "comparison.png", "summary.md"])
      with open(os.path.join(workdir, "atc", "config.json")) as f:
        run = json.load(f)
      self.assertEqual((run["num_agents"], run["num_steps"], run["algorithm"]), (4, 2, "atc"))
      self.assertEqual(run["model_options"]["hidden"], 16)  # the smoke model

if __name__ == "__main__":
  absltest.main()
