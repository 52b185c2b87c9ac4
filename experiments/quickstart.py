r"""Built-in experiment: DRT diffusion vs ATC diffusion (and local training) on a ring.

K = 16 agents, the small CNN, real MNIST split across the agents with Dirichlet label skew
(offline: the embedded copy that ``scripts/install_data.sh`` installs); writes each run's
``metrics.jsonl``, ``config.json`` and partition (``partition.npz``, ``partition.png``) under
``--workdir/<algorithm>/`` and one comparison figure ``--workdir/comparison.png``. About five
minutes on a 2-core CPU:

  python experiments/quickstart.py --workdir runs/quickstart

(``make run`` does exactly this after creating the venv.) A short demonstration, not a study:
300 steps of 16 examples per agent is about 1.3 local epochs.
"""

import os

from absl import app, flags, logging

from drt_jax import backends, plotting, train
from drt_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where results and the plot go.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run.")
_AGENTS = flags.DEFINE_integer("agents", 16, "Number of agents K.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["atc", "drt", "local"], "Algorithms to compare.")
_DATASET = flags.DEFINE_string("dataset", "mnist", "'synthetic' or a tfds image dataset name.")
_PARTITION = flags.DEFINE_string("partition", "dirichlet", "iid, dirichlet or shards.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration (small: label skew).")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 8, "Virtual CPU devices, so that the 'auto' back-end shards the agents over "
    "them (measured faster than vmap on CPU, BUILD.md); no effect on a GPU or TPU.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  backends.use_host_devices(_HOST_DEVICES.value)
  base = {
      "num_agents": _AGENTS.value, "topology": "ring", "model": "cnn", "dataset": _DATASET.value,
      "partition": _PARTITION.value, "dirichlet_alpha": _ALPHA.value, "optimizer": "momentum",
      "learning_rate": 0.01, "batch_size": 16, "num_steps": _STEPS.value,
      "eval_every": max(1, _STEPS.value // 6), "eval_examples": 1000, "train_eval_examples": 500,
  }
  data = train.load_data(config_lib.resolve(base))  # once for all runs
  histories = {}
  for name in _ALGORITHMS.value:
    workdir = os.path.join(_WORKDIR.value, name)
    histories[name] = train.train_and_evaluate({**base, "algorithm": name}, workdir=workdir,
                                               data=data)
  figure = plotting.plot_histories(histories, os.path.join(_WORKDIR.value, "comparison.png"))
  print(f"\n{data.name}, K={_AGENTS.value} ring, {_PARTITION.value} partition, "
        f"{_STEPS.value} steps")
  print(f"{'algorithm':<10} {'test acc':>9} {'centroid':>9} {'gen gap':>8} "
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
