"""Vectorised sweeps: each member equals its own sequential run; divergence; refusals; blocks."""

import functools
import json
import os
import shutil
import tempfile
from unittest import mock

import chex
import jax
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data, untimed

from drt_jax import checkpoint, config, inputs, train, vectorize
from drt_jax import workdir as workdir_lib

BASE = {**TINY, "algorithm": "atc"}
# Two seeds x two learning rates: one compiled step for the four of them.
GRID = [{"seed": s, "learning_rate": lr} for s in (0, 1) for lr in (0.05, 0.1)]
DIVERGING = {"seed": 0, "learning_rate": 1e30}
# DRT with the other traced fields: strength, matched self-weights, lazy weights, partitions.
DRT = {**TINY, "algorithm": "drt", "partition": "dirichlet", "num_steps": 4, "eval_every": 2}
DRT_MEMBERS = [{"drt.strength": 0.5, "self_weight": 0.5, "dirichlet_alpha": 0.3},
               {"drt.strength": 2.0, "lazy": 0.3, "partition": "iid", "seed": 1}]


@functools.cache
def _sequential(base_json: str, member_json: str) -> list:
  c = vectorize.member_config(json.loads(base_json), json.loads(member_json))
  return train.train_and_evaluate(c, data=tiny_data(), verbose=False)


def sequential(base: dict, member: dict) -> list:
  """The member's history from its own sequential run (cached across tests)."""
  return _sequential(json.dumps(base, sort_keys=True), json.dumps(member, sort_keys=True))


def assert_rows_close(test, got, want, msg=""):
  got, want = untimed(got), untimed(want)
  test.assertEqual([r["step"] for r in got], [r["step"] for r in want], msg)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6, custom_message=msg)


def many_step_compiles(logs) -> int:
  return sum("Compiling jit(many_step" in line for line in logs.output)


class VectorizeTest(parameterized.TestCase):

  def test_members_equal_their_sequential_runs_and_the_step_compiles_once(self):
    self.assertIsNone(vectorize.vectorizable(BASE, GRID))
    vectorize._PROGRAMS.clear()  # compiled by an earlier test of this process otherwise
    with tempfile.TemporaryDirectory() as tmp:
      workdirs = [os.path.join(tmp, f"m{i}") for i in range(len(GRID))]
      with jax.log_compiles(), self.assertLogs("jax._src.interpreters.pxla", "WARNING") as logs:
        many = vectorize.train_and_evaluate_many(BASE, GRID, workdirs=workdirs,
                                                 data=tiny_data(), verbose=False)
      self.assertEqual(many_step_compiles(logs), 1)
      for member, history, workdir in zip(GRID, many, workdirs):
        self.assertEqual(history.status, "ok")
        assert_rows_close(self, history, sequential(BASE, member), str(member))
        # What the workdir holds is what the member's sequential run writes there.
        assert_rows_close(self, workdir_lib.read_metrics(workdir), history, str(member))
        resolved = config.resolve({**BASE, **member})
        with open(os.path.join(workdir, "config.json")) as f:
          self.assertEqual(json.load(f), json.loads(resolved.to_json()))
        self.assertTrue(workdir_lib.check_workdir(workdir, resolved))  # a rerun of the same run
    # The members really differ: the seeds and learning rates reach the programs.
    finals = {h[-1]["train_loss"] for h in many}
    self.assertLen(finals, len(GRID))

  def test_a_diverging_member_is_frozen_and_recorded_while_the_others_match(self):
    members = [GRID[0], DIVERGING, *GRID[2:]]
    with tempfile.TemporaryDirectory() as tmp:
      seq_dir, vec_dir = os.path.join(tmp, "seq"), os.path.join(tmp, "vec")
      with self.assertRaises(FloatingPointError) as ctx:
        train.train_and_evaluate({**BASE, **DIVERGING}, seq_dir, data=tiny_data(), verbose=False)
      many = vectorize.train_and_evaluate_many(BASE, members, data=tiny_data(), verbose=False,
                                               workdirs=[None, vec_dir, None, None])
      diverged = many[1]
      self.assertEqual(diverged.status, "diverged")
      self.assertEqual(diverged.error, str(ctx.exception))  # the sequential run's message
      self.assertIn(f"at step {diverged.diverged_step};", diverged.error)
      self.assertLess(diverged.diverged_step, BASE["num_steps"])
      # The rows before the divergence, the same in the workdir as the sequential run's.
      self.assertNotEmpty(diverged)
      self.assertTrue(all(r["step"] < diverged.diverged_step for r in diverged))
      assert_rows_close(self, workdir_lib.read_metrics(vec_dir), workdir_lib.read_metrics(seq_dir))
    for member, history in zip(members, many):
      if member is not DIVERGING:
        self.assertEqual(history.status, "ok")
        assert_rows_close(self, history, sequential(BASE, member), str(member))

  def test_drt_strength_weights_and_partitions_equal_their_sequential_runs(self):
    widths = {inputs.device_data(*train._setup(vectorize.member_config(DRT, m), tiny_data(), {},
                                               on_device=False).prepared[:2]).idx.shape[1]
              for m in DRT_MEMBERS}
    self.assertLen(widths, 2)  # the index lists are padded to one width
    many = vectorize.train_and_evaluate_many(DRT, DRT_MEMBERS, data=tiny_data(), verbose=False)
    for member, history in zip(DRT_MEMBERS, many):
      assert_rows_close(self, history, sequential(DRT, member), str(member))
    self.assertNotAlmostEqual(many[0][-1]["self_weight_mean"], many[1][-1]["self_weight_mean"])

  def test_shard_back_end_members_equal_their_sequential_runs(self):
    # vmap around the sharded step, the member axis whole: K = 4 agents over 4 of the 8 devices.
    # The sequential runs are vmap's (shard equals vmap: train_test); the seeds' partitions
    # differ, so each device holds the union of its agents' examples over the members.
    members = GRID  # two seeds x two learning rates, as on vmap
    many = vectorize.train_and_evaluate_many({**BASE, "backend": "shard"}, members,
                                             data=tiny_data(), verbose=False)
    for member, history in zip(members, many):
      want = untimed(sequential(BASE, member))
      chex.assert_trees_all_close(untimed(history), want, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ("model", [{"model_options": {"hidden": (8,)}}], "changes model_options.hidden"),
      ("algorithm", [{"algorithm": "dsgd"}], "changes algorithm"),
      ("agents", [{"num_agents": 8}], "changes num_agents"),
      ("batch", [{"batch_size": 4}], "changes batch_size"),
      ("topology", [{"topology": "full"}], "changes topology"),
      ("optimizer", [{"optimizer": "adam"}], "changes optimizer"),
      ("floor", [{"drt.floor": 0.1}], "changes drt.floor"),
      ("steps", [{"num_steps": 9}], "changes num_steps"),
      ("random_graph", [{"seed": 1}], "other neighbour lists", {"topology": "erdos_renyi"}),
      ("fault_seed", [{"faults.seed": 1}], "changes faults.seed"),
      ("not_a_list", {"seed": 1}, "members is a non-empty list"),
      ("bad_value", [{"learning_rate": -1.0}], "member 1: config.learning_rate=-1.0"),
  )
  def test_what_changes_the_program_is_refused_in_one_line(self, others, message, base=None):
    base = {**BASE, **(base or {})}
    members = [{}, *others] if isinstance(others, list) else others
    for refuse in (vectorize.vectorizable,
                   functools.partial(vectorize.train_and_evaluate_many, data=tiny_data())):
      with self.assertRaises(ValueError) as ctx:
        refuse(base, members)
      self.assertIn(message, str(ctx.exception))
      self.assertNotIn("\n", str(ctx.exception))
    if message.startswith("changes"):
      self.assertIn("sequentially", str(ctx.exception))

  def test_blocks_that_do_not_fit_are_split_and_resume_together(self):
    # A device that holds two members' step: the four run as two blocks of two.
    def needed(compiled):
      return 2**30 * compiled.args_info[0][1].shape[0]  # alive: bool[members]

    c = {**BASE, "checkpoint_every": 3}

    def run(workdirs, compiles):
      with (mock.patch.object(vectorize, "_free_device_memory", lambda: 2.5 * 2**30),
            mock.patch.object(vectorize, "_needed_bytes", needed), jax.log_compiles(),
            self.assertLogs("jax._src.interpreters.pxla", "WARNING") as jax_logs,
            self.assertLogs("absl", "INFO") as logs):
        many = vectorize.train_and_evaluate_many(c, GRID, workdirs=workdirs, data=tiny_data(),
                                                 verbose=False)
      split = [line for line in logs.output if "splitting into blocks of 2" in line]
      self.assertLen(split, 1)
      self.assertIn(many_step_compiles(jax_logs), compiles)
      return many, logs.output

    with tempfile.TemporaryDirectory() as tmp:
      workdirs = [os.path.join(tmp, f"m{i}") for i in range(len(GRID))]
      # Four members (measured, too big: unless an earlier test compiled it) and two, once for
      # both blocks.
      many, _ = run(workdirs, (1, 2))
      for member, history in zip(GRID, many):
        assert_rows_close(self, history, sequential(BASE, member), str(member))
      # Member 0 lost its last checkpoint: its block (members 0 and 1) resumes at step 3.
      shutil.rmtree(os.path.join(checkpoint.directory(workdirs[0]), "6"))
      again, logs = run(workdirs, (0,))  # the programs of this process
      at_3 = [line for line in logs if "resuming from the checkpoint of step 3 " in line]
      self.assertLen(at_3, 2)  # members 0 and 1; 2 and 3 at step 6, where nothing is left to do
      self.assertTrue(any("member 1 resumes at step 3 with its block" in line for line in logs))
      for first, second in zip(many, again):
        assert_rows_close(self, second, first)
      self.assertEqual(checkpoint.steps(workdirs[1]), [3, 6])
      # Resumption does not care how a member ran: member 2's run, resumed sequentially from its
      # checkpoint 3, ends with its vectorised history and final state.
      final, host = checkpoint.load(workdirs[2], 6)
      shutil.rmtree(os.path.join(checkpoint.directory(workdirs[2]), "6"))
      with self.assertLogs("absl", "INFO") as logs:
        resumed = train.train_and_evaluate(vectorize.member_config(c, GRID[2]), workdirs[2],
                                           data=tiny_data(), verbose=False)
      self.assertTrue(any("resuming from the checkpoint of step 3 " in line
                          for line in logs.output))
      assert_rows_close(self, resumed, many[2])
      chex.assert_trees_all_close(checkpoint.load(workdirs[2], 6)[0], final, rtol=1e-6,
                                  atol=1e-7)
      self.assertEqual(host["step"], 6)


class MemberHistoryTest(absltest.TestCase):

  def test_is_a_list_of_rows_with_its_status(self):
    h = vectorize.MemberHistory([{"step": 0}], "diverged", 3, "non-finite ...")
    self.assertEqual(h, [{"step": 0}])
    self.assertEqual((h.status, h.diverged_step, h.error), ("diverged", 3, "non-finite ..."))
    self.assertEqual(vectorize.MemberHistory().status, "ok")


if __name__ == "__main__":
  absltest.main()
