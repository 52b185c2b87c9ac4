r"""Built-in experiment: DRT diffusion vs ATC diffusion (and local training) on a ring.

K = 16 agents, the small CNN, the built-in synthetic image task (offline, seeded); writes each
run's ``metrics.jsonl`` and ``config.json`` under ``--workdir/<algorithm>/`` and one comparison
figure ``--workdir/comparison.png``. About two minutes on a 2-core CPU:

  python experiments/quickstart.py --workdir runs/quickstart

(``make run`` does exactly this after creating the venv.)
"""

import os

from absl import app, flags, logging

from drt_jax import data, plotting, train

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where results and the plot go.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run.")
_AGENTS = flags.DEFINE_integer("agents", 16, "Number of agents K.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["atc", "drt", "local"], "Algorithms to compare.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  dataset = data.synthetic(num_train=4096, num_test=1024, seed=0)
  histories = {}
  for name in _ALGORITHMS.value:
    config = {
        "algorithm": name, "num_agents": _AGENTS.value, "topology": "ring", "model": "cnn",
        "optimizer": "momentum", "learning_rate": 0.01, "batch_size": 16,
        "num_steps": _STEPS.value, "eval_every": max(1, _STEPS.value // 10),
        "eval_examples": 512, "train_eval_examples": 512,
    }
    workdir = os.path.join(_WORKDIR.value, name)
    histories[name] = train.train_and_evaluate(config, workdir=workdir, data=dataset)
  figure = plotting.plot_histories(histories, os.path.join(_WORKDIR.value, "comparison.png"))
  print(f"\n{'algorithm':<10} {'test acc':>9} {'centroid':>9} {'gen gap':>8} "
        f"{'consensus':>10} {'disagree':>10}")
  for name, history in histories.items():
    r = history[-1]
    print(f"{name:<10} {r['test_acc_mean']:>9.4f} {r['centroid_test_acc']:>9.4f} "
          f"{r['gen_gap']:>8.4f} {r['consensus_distance']:>10.3g} "
          f"{r['output_disagreement']:>10.3g}")
  print(f"\nmetrics: {os.path.abspath(_WORKDIR.value)}/<algorithm>/metrics.jsonl")
  print(f"plot:    {os.path.abspath(figure)}")


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
