"""experiments/study.py: which tuning run wins, and how final rows map back to methods."""

from absl.testing import absltest

from experiments import study


def row(method, val_acc, **overrides):
  return {"status": "ok", "final": {"val_acc_mean": val_acc},
          "overrides": {**study.METHODS[method], **overrides, "method": method}}


class TunedSettingsTest(absltest.TestCase):

  def test_best_validation_accuracy_wins_and_torus_takes_the_ring_setting(self):
    rows = []
    for method in study.METHODS:
      if study.tuned_as(method) != method:
        continue
      for lr, acc in ((0.003, 0.5), (0.01, 0.7), (0.03, 0.6)):
        rows.append(row(method, acc, learning_rate=lr))
    rows += [row("drt/ring", 0.72, learning_rate=0.01, **{"drt.strength": 2.0}),
             row("drt/ring", 0.69, learning_rate=0.01, **{"drt.strength": 0.5}),
             row("drt_symmetric/ring", 0.65, learning_rate=0.01, **{"drt.strength": 2.0})]
    settings = study.tuned_settings(rows)
    self.assertEqual(set(settings), set(study.METHODS))
    self.assertEqual(settings["atc/ring"], {"learning_rate": 0.01})
    self.assertEqual(settings["drt/ring"], {"learning_rate": 0.01, "drt.strength": 2.0})
    self.assertEqual(settings["drt/torus"], settings["drt/ring"])
    self.assertEqual(settings["drt_symmetric/ring"], {"learning_rate": 0.01,
                                                      "drt.strength": 1.0})
    self.assertNotIn("drt.strength", settings["drt_normalized/ring"])

  def test_missing_tuning_is_one_line(self):
    with self.assertRaisesRegex(ValueError, "no finished tuning run for atc/ring; run "
                                "--stage=tune first"):
      study.tuned_settings([])


if __name__ == "__main__":
  absltest.main()
