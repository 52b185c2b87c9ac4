"""Config and command-line edges: every bad value is one ``error:`` line or one ValueError line,
never a traceback or a setting that silently means something else; sweeps parse literal grid
values, fail loudly, survive malformed output lines and lock their output file."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized
from experiments_test import run_binary
from fixtures import TINY, tiny_data
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from drt_jax import config, train
from experiments import common, sweep

_SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "configs", "default.py") + ":smoke"
# Cheap sweep points: synthetic data, an MLP, four agents (tests mock the training itself).
BASE = {"dataset": "synthetic", "num_agents": 4, "model": "mlp", "model_options": {"hidden": (8,)},
        "batch_size": 8, "num_steps": 2, "eval_every": 2, "backend": "vmap"}
_DONE = {"history": [{"step": 0, "test_acc_mean": 0.5}], "final": {"step": 0,
         "test_acc_mean": 0.5}, "best_test_acc_mean": 0.5, "wall_time_s": 0.1, "status": "ok"}


class _Tmp(absltest.TestCase):

  def _tmp(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name


class ResolveTest(parameterized.TestCase):
  """``config.resolve``: one ValueError line naming the field, the value and what is accepted."""

  @parameterized.named_parameters(
      # ml_collections' type safety used to raise its own TypeError.
      ("int_as_string", {"num_agents": "4"}, "config.num_agents='4' is not accepted; expected "
       "an integer >= 1"),
      ("int_as_float", {"num_steps": 2.5}, "config.num_steps=2.5 is not accepted"),
      ("bool_as_string", {"same_init": "no"}, "config.same_init='no' is not accepted; expected "
       "True or False"),
      ("bool_as_int", {"combine_batch_stats": 1}, "config.combine_batch_stats=1 is not accepted"),
      ("choice_as_list", {"topology": ["ring"]}, "config.topology=['ring'] is not accepted; "
       "expected one of: ring, torus"),
      ("choice_as_mapping", {"algorithm": {"a": 1}}, "config.algorithm={'a': 1} is not accepted"),
      ("nested_float_as_string", {"drt": {"strength": "x"}}, "config.drt.strength='x' is not "
       "accepted"),
      ("data_dir_as_int", {"data_dir": 3}, "config.data_dir=3 is not accepted"),
      ("field_not_a_string", {1: 2}, "unknown config field '1'"),
      ("options_not_a_mapping", {"model_options": None}, "config.model_options=None is not "
       "accepted; expected a mapping of its fields, e.g. {'hidden': ...}"),
      # Seeds: jax.random.key keeps 32 bits, so larger seeds would alias smaller ones.
      ("seed_aliasing", {"seed": 2**32}, "config.seed=4294967296 is not accepted; expected an "
       "integer in [0, 2**32 - 1 = 4294967295]"),
      ("seed_overflowing", {"seed": 2**64}, "config.seed=18446744073709551616 is not accepted"),
      ("fault_seed_aliasing", {"faults": {"seed": 2**40}}, "config.faults.seed=1099511627776"),
      ("negative_fault_seed", {"faults": {"seed": -1}}, "config.faults.seed=-1"),
      # Graph options: checked here, not when the graph is built after the data has loaded.
      ("torus_rows_not_dividing", {"topology": "torus", "topology_options": {"rows": 3}},
       "config.topology_options.rows=3 is not accepted; expected a divisor of num_agents=16 "
       "(rows x cols = K): one of 1, 2, 4, 8, 16"),
      ("torus_shape_not_k", {"topology": "torus", "topology_options": {"rows": 2, "cols": 4}},
       "config.topology_options={'rows': 2, 'cols': 4} is not accepted; expected rows x cols = "
       "num_agents=16, e.g. rows=4, cols=4"),
      ("grid_rows_as_string", {"topology": "grid", "topology_options": {"rows": "x"}},
       "config.topology_options.rows='x' is not accepted"),
      ("edge_probability", {"topology": "erdos_renyi", "topology_options": {"p": "x"}},
       "config.topology_options.p='x' is not accepted; expected an edge probability in (0, 1]"),
      ("matching_period", {"topology": "random_matching", "topology_options": {"period": 2.5}},
       "config.topology_options.period=2.5 is not accepted"),
      ("lazy_twice", {"lazy": 0.2, "topology_options": {"lazy": 0.5}},
       "config.topology_options.lazy=0.5 is not accepted; expected one of config.lazy=0.2 and "
       "config.topology_options.lazy: set one"),
      # Model options of the wrong type used to fail inside flax's trace (or take 'abc' as widths).
      ("mlp_hidden_as_string", {"model": "mlp", "model_options": {"hidden": "abc"}},
       "config.model_options.hidden='abc' is not accepted; expected a tuple of hidden widths"),
      ("mlp_hidden_as_int", {"model": "mlp", "model_options": {"hidden": 16}},
       "config.model_options.hidden=16 is not accepted"),
      ("cnn_hidden_as_tuple", {"model": "cnn", "model_options": {"hidden": (16,)}},
       "config.model_options.hidden=(16,) is not accepted; expected an integer >= 1"),
      ("cnn_features_with_zero", {"model": "cnn", "model_options": {"features": (4, 0)}},
       "config.model_options.features=(4, 0) is not accepted"),
      ("resnet_stages_and_widths", {"model": "resnet20",
                                    "model_options": {"widths": (16, 32)}},
       "expected as many widths as stages"),
      ("dtype_besides_precision", {"model_options": {"dtype": "float16"}},
       "config.model_options.dtype='float16' is not accepted; expected no dtype here: "
       "config.precision"),
      ("conv_twice", {"conv": "xla", "model_options": {"conv": "taps"}},
       "expected one of config.conv='xla' and config.model_options.conv: set one"),
      # An algorithm's own options: its names, checked by its factory.
      ("option_of_another_algorithm", {"algorithm_options": {"compressor": "top_k"}},
       "config.algorithm_options.compressor='top_k' is not accepted; expected an option of "
       "'atc', one of: aggregation, clip_radius, trim"),
      ("option_with_a_field_of_its_own", {"algorithm": "drt",
                                          "algorithm_options": {"strength": 2.0}},
       "config.algorithm_options.strength=2.0 is not accepted; expected set in "
       "config.drt.strength, not here"),
      ("unknown_compressor", {"algorithm": "choco", "algorithm_options": {"compressor": "zip"}},
       "config.algorithm_options={'compressor': 'zip'} is not accepted: "),
      ("comm_every_where_not_taken", {"algorithm": "gradient_tracking", "comm_every": 2},
       "config.comm_every=2 is not accepted; expected 1: 'gradient_tracking' communicates every "
       "step"),
      ("byzantine_all", {"num_agents": 4, "faults": {"byzantine": 4}},
       "config.faults.byzantine=4 is not accepted"),
      ("unknown_attack", {"faults": {"attack": "flip"}}, "config.faults.attack='flip' is not "
       "accepted: unknown faults.attack 'flip'; expected one of: sign_flip"),
      ("unknown_weight_rule", {"topology_weights": "bogus"},
       "config.topology_weights='bogus' is not accepted; expected one of: metropolis, uniform, "
       "push"),
  )
  def test_bad_value_is_one_value_error_line(self, override, expected):
    with self.assertRaises(ValueError) as caught:
      config.resolve(override)
    message = str(caught.exception)
    self.assertIn(expected, message)
    self.assertNotIn("\n", message)

  def test_what_is_accepted_still_is(self):
    config.resolve({"seed": config.MAX_SEED, "faults": {"seed": config.MAX_SEED}})
    config.resolve({"topology": "torus", "topology_options": {"rows": 2, "cols": 8}})
    config.resolve({"topology": "grid", "num_agents": 12, "topology_options": {"cols": 3}})
    config.resolve({"model": "mlp", "model_options": {"hidden": [16, 16]}})  # as config.json
    config.resolve({"model": "mlp", "model_options": {"hidden": ()}})
    config.resolve({"lazy": 0.2, "topology_options": {"lazy": 0.2}})
    config.resolve({"algorithm": "choco", "algorithm_options": {"compressor": "random_k",
                                                                "ratio": 0.5}})
    config.resolve({"algorithm": "atc", "algorithm_options": {"aggregation": "median"},
                    "faults": {"byzantine": 1, "attack": "alie"}})
    self.assertEqual(config.resolve({"learning_rate": 1}).learning_rate, 1.0)  # still a float

  def test_seed_bound_is_where_keys_alias(self):
    def key(seed):
      return np.asarray(jax.random.key_data(jax.random.key(seed)))

    self.assertFalse(np.array_equal(key(config.MAX_SEED), key(0)))
    if not jax.config.jax_enable_x64:  # the default: 32 bits kept, the next seed is 0 again
      np.testing.assert_array_equal(key(config.MAX_SEED + 1), key(0))


class UnsuitableWeightsTest(absltest.TestCase):
  """What an algorithm needs of the graph's weights is refused in one line before training."""

  def test_each_refusal_names_what_is_needed(self):
    cases = (("exact_diffusion", "exponential", "metropolis", "symmetric doubly stochastic"),
             ("gradient_tracking", "star", "uniform", "doubly stochastic weights"),
             ("push_sum", "exponential", "metropolis", None),  # regular: rows sum to one too
             ("atc", "directed_erdos_renyi", "push", "every agent's weights summing to one"))
    for alg, kind, weights, needed in cases:
      c = {**TINY, "num_agents": 8, "num_steps": 1, "eval_every": 1, "algorithm": alg,
           "topology": kind, "topology_weights": weights, "seed": 1}
      if needed is None:
        train.train_and_evaluate(c, data=tiny_data(), verbose=False)
        continue
      with self.assertRaises(ValueError) as caught:
        train.train_and_evaluate(c, data=tiny_data(), verbose=False)
      message = str(caught.exception)
      self.assertIn(f"{alg} needs {needed}", message)
      self.assertNotIn("\n", message)


class ConfigFileTest(_Tmp):
  """What the binaries' ``--config=<file>`` makes of a file that cannot give a config."""

  def _parse(self, source, arg=None):
    path = os.path.join(self._tmp(), "c.py")
    with open(path, "w") as f:
      f.write(textwrap.dedent(source))
    parser = common._ConfigFileParser(ConfigFileFlagParser("config"))
    return parser.parse(path if arg is None else f"{path}:{arg}")

  def test_bad_file_is_one_line(self):
    for source, expected in (
        ("raise RuntimeError('boom')", "failed to load: RuntimeError: boom"),
        ("def get_config(arg=None)\n  pass", "failed to load: SyntaxError: expected ':'"),
        ("import not_a_module_anywhere", "failed to load: ModuleNotFoundError: No module named"),
        ("X = 1", "defines no get_config(arg=None)"),
        ("def get_config(arg=None):\n  return None", "get_config returned NoneType; return an "
         "ml_collections.ConfigDict (or a dict)"),
        ("def get_config(arg=None):\n  return [1]", "get_config returned list"),
        ("def get_config(arg=None):\n  return {}['x']", "get_config raised KeyError: x"),
        ("def get_config():\n  return {}", "get_config raised TypeError"),  # given an arg
        ("def get_config(arg=None):\n  raise ValueError('unknown variant x\\nmore')",
         ": unknown variant x")):
      with self.assertRaises(common.ConfigFileError, msg=source) as caught:
        self._parse(source, arg="v" if "get_config():" in source else None)
      self.assertIn(expected, str(caught.exception), source)
      self.assertNotIn("\n", str(caught.exception))
    for path, expected in (("/nonexistent/c.py", "No such file or directory"),
                           (self._tmp(), "is a folder")):
      with self.assertRaisesRegex(common.ConfigFileError, expected):
        common._ConfigFileParser(ConfigFileFlagParser("config")).parse(path)

  def test_get_config_returning_a_dict_is_taken_as_its_config_dict(self):
    c = self._parse("def get_config(arg=None):\n  return {'num_agents': 4, 'drt': {'floor': 0.1}}")
    self.assertEqual(c.to_dict(), {"num_agents": 4, "drt": {"floor": 0.1}})
    with self.assertRaises(AttributeError):  # locked, as ml_collections' parser leaves it
      c.bogus = 1


class BinaryTest(_Tmp):
  """The binaries end to end: one ``error:`` line, exit code 1, before any training."""

  def _one_error_line(self, proc, expected):
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    self.assertLen(lines, 1, proc.stderr[-2000:])
    self.assertStartsWith(lines[0], "error: ")
    self.assertIn(expected, lines[0])

  def test_bad_input_through_the_binaries(self):
    tmp = self._tmp()
    raising = os.path.join(tmp, "raising.py")
    with open(raising, "w") as f:
      f.write("1 / 0\n")
    workdir = os.path.join(tmp, "never")
    for binary, args, expected in (
        ("train", [f"--config={raising}", f"--workdir={workdir}"],
         f"config file '{raising}' failed to load: ZeroDivisionError: division by zero"),
        ("train", [f"--config={_SMOKE}", "--workdir="], "--workdir is empty; expected a path"),
        ("train", [f"--config={_SMOKE}", f"--workdir={workdir}", "--config.model_options.hidden="
                   "abc"], "config.model_options.hidden='abc' is not accepted"),
        ("plot", ["--sweep="], "--sweep is empty; expected a path (Sweep JSONL file(s) from "
         "experiments/sweep.py), e.g. --sweep=runs/sweep.jsonl")):
      self._one_error_line(run_binary(binary, *args), expected)
    self.assertFalse(os.path.exists(workdir))


class GridTest(absltest.TestCase):

  def test_literal_values_parse_whole(self):
    self.assertEqual(sweep.parse_grid(["model_options.hidden=(16,),(32, 32)"]),
                     {"model_options.hidden": [(16,), (32, 32)]})
    self.assertEqual(sweep.parse_grid(["model_options.hidden=[8],[4, 4]", "dataset='a,b',c",
                                       "same_init=True,false"]),
                     {"model_options.hidden": [[8], [4, 4]], "dataset": ["a,b", "c"],
                      "same_init": [True, False]})
    self.assertEqual(sweep.parse_grid(["seed=0, 1", "topology=ring"]),  # as before
                     {"seed": [0, 1], "topology": ["ring"]})
    overrides = sweep.points(sweep.parse_grid(["model_options.hidden=(16,),(32,)"]))
    sweep.check(BASE, overrides)  # each point a valid config
    self.assertEqual(sweep.config_for(BASE, overrides[1])["model_options"], {"hidden": (32,)})

  def test_unbalanced_and_mistyped_values_are_one_line(self):
    with self.assertRaises(ValueError) as caught:
      sweep.parse_grid(["model_options.hidden=(16,),(32"])
    self.assertIn("unbalanced brackets or quotes; expected field=v1,v2", str(caught.exception))
    self.assertNotIn("\n", str(caught.exception))
    with self.assertRaisesRegex(ValueError, r'^grid point \{"model_options.hidden": 16\}: '
                                r"config.model_options.hidden=16 is not accepted[^\n]*$"):
      sweep.check(BASE, sweep.points(sweep.parse_grid(["model_options.hidden=16"])))


class SweepFileTest(_Tmp):
  """The sweep's output file: malformed lines skipped, failed points loud, one writer."""

  def test_malformed_lines_are_skipped_with_a_warning(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    key = sweep.run_key({"seed": 0})
    with open(out, "w") as f:
      f.write("\n".join([
          "not json", "[1, 2]", json.dumps({"key": 5, "status": "ok"}),
          json.dumps({"key": key, "status": "ok"}),  # no overrides, no final
          json.dumps({"key": key, "overrides": {"seed": 1}, "status": "ok", "final": {}}),
          json.dumps({"key": key, "overrides": {"seed": 0}, "status": "error", "error": "E"}),
          '{"key": "cut sho']) + "\n")
    with (mock.patch.object(sweep, "train_one", return_value=dict(_DONE)) as train_one,
          self.assertLogs("absl", level="WARNING") as logs):
      rows = sweep.run(BASE, [{"seed": 0}], out)
    train_one.assert_called_once()
    self.assertEqual([r["status"] for r in rows], ["ok"])
    self.assertTrue(any("3 rows are not whole sweep rows" in line for line in logs.output),
                    logs.output)
    with mock.patch.object(sweep, "train_one") as train_one:  # the new row is whole: skipped
      self.assertEqual(sweep.run(BASE, [{"seed": 0}], out), rows)
    train_one.assert_not_called()
    table = sweep.summary_table(rows + [{"key": "k", "status": "ok", "final": {"gen_gap": "x"},
                                         "wall_time_s": None}])
    self.assertIn("0.5000", table)

  def test_a_sweep_whose_points_fail_exits_non_zero_after_all_of_them(self):
    tmp = self._tmp()
    path, out = os.path.join(tmp, "tiny.py"), os.path.join(tmp, "sweep.jsonl")
    with open(path, "w") as f:
      f.write(f"def get_config(arg=None):\n  return {BASE!r}\n")
    # Valid configs whose data cannot hold the batch: they fail on the data, before compiling.
    proc = run_binary("sweep", f"--config={path}", "--grid=batch_size=5000,6000",
                      f"--out={out}", "--host_devices=1")
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertEqual(proc.stderr.strip().splitlines()[-1], f"error: 2 of 2 sweep points failed "
                     f"(status error in {out}); rerun the same command to retry them")
    with open(out) as f:
      self.assertEqual([json.loads(line)["status"] for line in f], ["error", "error"])
    self.assertIn("batch_size", proc.stdout)  # the table came first
    self.assertFalse(os.path.exists(out + ".lock"))

  def _lock(self, out, holder, age_s=0.0):
    with open(out + ".lock", "w") as f:
      f.write(holder if isinstance(holder, str) else json.dumps(holder))
    if age_s:
      then = time.time() - age_s
      os.utime(out + ".lock", (then, then))

  def test_a_live_lock_is_refused_in_one_line(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    for holder in ({"pid": os.getpid(), "host": socket.gethostname()},
                   {"pid": 1, "host": "another-host"},
                   ""):  # just created: its sweep has not written its pid yet
      self._lock(out, holder)
      with (mock.patch.object(sweep, "train_one") as train_one,
            self.assertRaises(sweep.Locked) as caught):
        sweep.run(BASE, [{"seed": 0}], out)
      train_one.assert_not_called()
      message = str(caught.exception)
      self.assertIn(f"{out} is in use by another sweep: {out}.lock holds ", message)
      self.assertIn(f"pid {holder['pid']} on {holder['host']}" if holder else "no pid written",
                    message)
      self.assertNotIn("\n", message)
      self.assertTrue(os.path.exists(out + ".lock"))  # still the other sweep's
    self._lock(out, {"pid": os.getpid(), "host": socket.gethostname()})
    proc = run_binary("sweep", f"--config={_SMOKE}", "--grid=seed=0", f"--out={out}",
                      "--host_devices=1")
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    self.assertEqual(proc.stderr.strip().splitlines(), [
        f"error: {out} is in use by another sweep: {out}.lock holds pid {os.getpid()} on "
        f"{socket.gethostname()}; wait for it, use another --out, or remove {out}.lock if no "
        "sweep runs there"])

  def test_a_stale_lock_is_taken_over_and_the_lock_released(self):
    out = os.path.join(self._tmp(), "sweep.jsonl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    for seed, (holder, age_s) in enumerate((
        ({"pid": dead.pid, "host": socket.gethostname()}, 0.0),
        ("", 60.0))):  # unreadable and old: its sweep died while starting
      self._lock(out, holder, age_s)
      with (mock.patch.object(sweep, "train_one", return_value=dict(_DONE)),
            self.assertLogs("absl", level="WARNING") as logs):
        sweep.run(BASE, [{"seed": seed}], out)
      self.assertTrue(any("taking over" in line for line in logs.output), logs.output)
      self.assertFalse(os.path.exists(out + ".lock"))
    with (mock.patch.object(sweep, "_run", side_effect=RuntimeError("lost")),
          self.assertRaises(RuntimeError)):
      sweep.run(BASE, [{"seed": 0}], out)
    self.assertFalse(os.path.exists(out + ".lock"))  # released on the way out, too


if __name__ == "__main__":
  absltest.main()
