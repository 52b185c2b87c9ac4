"""experiments/study.py and experiments/stats.py: tuning choices, how rows map back to methods,
paired intervals and verdicts, and that docs/results.md and the README say what the committed
results say."""

import json
import os
import re
import shutil
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from experiments import stats, study

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_ROOT, "docs", "results", "study")


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


class StatsTest(parameterized.TestCase):

  @parameterized.parameters((1, 12.7062), (7, 2.3646), (30, 2.0423))
  def test_t_quantiles_match_the_tables(self, df, want):
    self.assertAlmostEqual(stats.t_quantile(0.975, df), want, places=3)

  def test_paired_interval_uses_common_seeds_only(self):
    a = {s: 0.8 + 0.01 * s for s in range(8)}
    b = {s: 0.8 + 0.01 * s - 0.02 + (0.004 if s % 2 else -0.004) for s in range(9)}
    d = stats.paired(a, b)
    self.assertEqual(d.n, 8)
    self.assertAlmostEqual(d.mean, 0.02, places=9)
    half = 2.3646 * np.std([0.024, 0.016] * 4, ddof=1) / np.sqrt(8)
    self.assertAlmostEqual(d.hi - d.mean, half, places=4)
    self.assertIsNone(stats.paired({0: 1.0}, {0: 0.5}))

  @parameterized.parameters(((0.01, 0.002, 0.018), "supported"),
                            ((-0.01, -0.02, 0.004), "not supported"),
                            ((0.0, -0.01, 0.012), "inconclusive"))
  def test_verdict_words(self, diff, want):
    self.assertEqual(stats.verdict(stats.Paired(*diff, 8, ()), 0.005), want)


def _final(method_overrides, seed, acc, steps_hit=None, **final):
  history = [{"step": s, "test_acc_mean": acc * min(1.0, s / (steps_hit or 20))}
             for s in range(0, 201, 20)]
  return {"status": "ok", "key": json.dumps({**method_overrides, "seed": seed}),
          "overrides": {**method_overrides, "seed": seed}, "history": history,
          "final": {"test_acc_mean": acc, "final_test_acc_mean": acc, "gen_gap": 0.02,
                    **final}, "time_avg": {}}


class StudyTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.out = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.out)

  def test_best_validation_accuracy_wins_per_method(self):
    rows = []
    for over, axes in study.TUNED.values():
      for lr, acc in ((0.03, 0.6), (0.1, 0.7), (0.3, 0.5)):
        extra = {a: study.GRIDS[a][1] for a in axes if a != "learning_rate"}
        rows.append({"status": "ok", "final": {"val_acc_mean": acc},
                     "overrides": {"topology": "ring", "dirichlet_alpha": 0.3, **over,
                                   "seed": 0, "learning_rate": lr, **extra}})
    rows.append({"status": "ok", "final": {"val_acc_mean": 0.9},
                 "overrides": {"topology": "ring", "dirichlet_alpha": 0.3, "algorithm": "drt",
                               "seed": 0, "learning_rate": 0.03, "drt.strength": 16.0}})
    _write(os.path.join(self.out, "tune.jsonl"), rows)
    chosen = study.tuned_settings(self.out)
    self.assertEqual(set(chosen), set(study.TUNED))
    self.assertEqual(chosen["drt"], {"learning_rate": 0.03, "drt.strength": 16.0})
    self.assertEqual(chosen["atc_tuned"], {"learning_rate": 0.1, "self_weight": 0.15})
    self.assertEqual(chosen["full"], {"learning_rate": 0.1})

  def test_every_final_point_maps_back_to_its_method(self):
    chosen = {name: {a: study.GRIDS[a][0] for a in axes}
              for name, (_, axes) in study.TUNED.items()}
    chosen["drt_exact_diffusion"] = {"learning_rate": 0.1}
    settings = [study.MAIN, *study.SECONDARY]
    for name in (*study.PRIORITY, *study.LATE, *study.BN_MIXED):
      for graph, alpha in settings:
        p = study._method_point(name, chosen, graph, alpha, 3, matched={"Conv_0": 0.1})
        got = study._identify(study._strip([p])[0])
        want_setting = study.setting_name(*study.MAIN) if name.startswith("full") else p["setting"]
        self.assertEqual(got, (name, want_setting), msg=(name, graph, alpha))
    for name in study.LONG_METHODS:
      p = study._long_point(name, chosen, study.SETTING, 3)
      self.assertEqual(p["num_steps"], study.LONG_FACTOR * study.SETTING["num_steps"])
      self.assertEqual(study._identify(study._strip([p])[0]), (name, p["setting"]))
      self.assertIn(p["setting"], {c[2] for c in study.CLAIMS})  # a claim reads these runs

  def test_claims_are_paired_and_oriented(self):
    drt, atc = {"topology": "ring", "dirichlet_alpha": 0.3, "algorithm": "drt"}, {
        "topology": "ring", "dirichlet_alpha": 0.3, "algorithm": "atc"}
    full = {**atc, "topology": "full"}
    rows = []
    for s in range(8):
      noise = 0.001 * (s % 3)
      rows += [_final(drt, s, 0.80 + noise, steps_hit=60, final_output_disagreement=0.1),
               _final(atc, s, 0.78 + noise, final_output_disagreement=0.2),
               _final(full, s, 0.84 + noise, steps_hit=20)]
    _write(os.path.join(self.out, "final.jsonl"), rows)
    found = {v["id"]: v for v in study.verdicts(study.final_rows(self.out))}
    self.assertEqual(found["C1"]["verdict"], "supported")
    self.assertAlmostEqual(found["C1"]["diff"].mean, 0.02, places=6)
    self.assertNotIn("C2", found)  # no tuned ATC runs: no claim
    # DRT needs 60 steps to the target, full ATC 20: 40 more than full, 20 beyond the margin.
    self.assertEqual(found["C7"]["verdict"], "not supported")
    self.assertAlmostEqual(found["C7"]["diff"].mean, -20.0)

  def test_comparisons_pair_one_method_across_lengths(self):
    drt = {"topology": "ring", "dirichlet_alpha": 0.3, "algorithm": "drt"}
    steps = study.LONG_FACTOR * study.SETTING["num_steps"]
    rows = []
    for s in range(8):
      rows += [_final(drt, s, 0.70 + 0.01 * s),
               _final({**drt, "num_steps": steps}, s, 0.75 + 0.01 * s)]
    _write(os.path.join(self.out, "final.jsonl"), rows)
    found = {c["what"]: c for c in study.comparisons(study.final_rows(self.out))}
    self.assertEqual(set(found), {"DRT at 600 steps - at 200"})  # the others lack their runs
    self.assertAlmostEqual(found["DRT at 600 steps - at 200"]["diff"].mean, 0.05, places=6)
    self.assertAlmostEqual(found["DRT at 600 steps - at 200"]["diff"].hi, 0.05, places=6)


@absltest.skipUnless(os.path.exists(os.path.join(_RESULTS, "final.jsonl")),
                     "no committed study results")
class CommittedResultsTest(absltest.TestCase):
  """What docs/results.md and the README state is what the committed JSONL gives."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp()
    for name in ("tune.jsonl", "final.jsonl"):
      shutil.copy(os.path.join(_RESULTS, name), cls.out)
    cls.rows = study.final_rows(cls.out)
    cls.verdicts = study.verdicts(cls.rows)
    with open(os.path.join(_ROOT, "docs", "results.md")) as f:
      cls.results = f.read()
    with open(os.path.join(_ROOT, "README.md")) as f:
      cls.readme = f.read()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.out)
    super().tearDownClass()

  def test_every_verdict_in_results_md_matches_the_report(self):
    self.assertNotEmpty(self.verdicts)
    for v in self.verdicts:
      line = next((ln for ln in self.results.splitlines()
                   if ln.startswith(f"| {v['id']} |")), None)
      self.assertIsNotNone(line, f"docs/results.md has no row for claim {v['id']}")
      self.assertIn(v["interval"], line, v["id"])
      self.assertIn(f"**{v['verdict']}**", line, v["id"])

  def test_report_stage_regenerates_the_committed_tables(self):
    with open(os.path.join(_RESULTS, "tables.md")) as f:
      committed = f.read()
    self.assertEqual(study.report(self.out), committed)
    for name in re.findall(r"\]\(([^)]+\.png)\)", committed):
      self.assertTrue(os.path.exists(os.path.join(self.out, name)), name)
      self.assertTrue(os.path.exists(os.path.join(_RESULTS, name)), name)

  def test_every_table_row_of_results_md_is_in_the_report(self):
    with open(os.path.join(_RESULTS, "tables.md")) as f:
      report = set(f.read().splitlines())
    rows = [ln for ln in self.results.splitlines() if ln.startswith("|")]
    self.assertNotEmpty(rows)
    for ln in rows:
      self.assertIn(ln, report)

  def test_matched_control_is_matched_per_layer(self):
    check = study.matched_check(self.rows)
    self.assertNotEmpty(check)
    self.assertIn("self_weight_mean", [c["layer"] for c in check])
    for c in check:
      self.assertLessEqual(abs(c["diff"]), 0.005, c["layer"])

  def test_every_interval_in_results_md_is_a_report_interval(self):
    quoted = re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", self.results)
    self.assertNotEmpty(quoted)
    intervals = {v["interval"] for v in self.verdicts}
    intervals |= {c["interval"] for c in study.comparisons(self.rows)}
    for q in quoted:
      self.assertIn(q, intervals)

  def test_readme_headline_numbers_come_from_the_report(self):
    headline = self.readme.split("<!-- headline -->")[1].split("<!-- /headline -->")[0]
    quoted = re.findall(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", headline)
    self.assertNotEmpty(quoted)
    intervals = {v["interval"] for v in self.verdicts}
    for q in quoted:
      self.assertIn(q, intervals)


if __name__ == "__main__":
  absltest.main()
