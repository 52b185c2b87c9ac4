r"""Trains K agents from an experiment config and writes metrics, plots and a summary.

  python experiments/train.py --config=experiments/configs/default.py --workdir=runs/default
  python experiments/train.py --config=experiments/configs/fashion_mnist.py:smoke \
      --workdir=/tmp/smoke --config.num_steps=20 --config.compare=drt,atc

Every algorithm of ``config.compare`` trains into ``<workdir>/<algorithm>/`` (``config.json``,
``metrics.jsonl`` with one row per evaluation, ``partition.npz``, ``partition.png``,
``curves.png`` and, for DRT runs, ``self_weights.png``); ``<workdir>/comparison.png`` and
``<workdir>/summary.md`` compare them. A workdir holding a run of a different config is refused
unless ``--overwrite``. Config files: ``experiments/configs/`` (``get_config(arg)``, variants after
``:``; ``--config.<field>=<value>`` overrides any field).

Several processes (hosts) train one run when each starts this binary with the same config and
``--coordinator_address``, ``--num_processes`` and its own ``--process_id`` (or the
``DRT_JAX_*`` environment variables; BUILD.md, "Multi-host"); process 0 writes the files.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from drt_jax import algorithms, backends, distributed, plotting, train
from drt_jax import config as config_lib
from drt_jax import workdir as workdir_lib
from experiments import common

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where the runs, plots and summary go.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace runs of a different config.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 8, "Virtual CPU devices, so that the 'auto' back-end shards the agents over "
    "them (faster than vmap on CPU, BUILD.md); no effect on a GPU or TPU. Per process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0, which serves the "
    "coordinator ('auto': JAX detects it on a TPU pod slice, Slurm or Open MPI); default "
    f"${distributed.ENV_COORDINATOR}.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Multi-process runs: how many processes; default "
    f"${distributed.ENV_NUM_PROCESSES}.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"Multi-process runs: this process's id, 0 to num_processes - 1; default "
    f"${distributed.ENV_PROCESS_ID}.")
_JOIN_TIMEOUT = flags.DEFINE_float(
    "join_timeout_s", 300.0, "Multi-process runs: how long to wait for the coordinator and every "
    "process before failing.")

SUMMARY = (("test_acc_mean", "test acc", ".4f"), ("centroid_test_acc", "centroid", ".4f"),
           ("gen_gap", "gen gap", ".4f"), ("consensus_distance", "consensus", ".3g"),
           ("output_disagreement", "disagreement", ".3g"), ("self_weight_mean", "self-weight",
                                                             ".3f"))


def summary_table(histories: dict) -> str:
  """Markdown table: the last evaluation of each run, plus the best mean test accuracy."""
  head = ["algorithm", *(title for _, title, _ in SUMMARY), "best test acc", "steps/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, history in histories.items():
    last = history[-1]
    cells = [name]
    for key, _, spec in SUMMARY:
      value = last.get(key)
      cells.append("–" if value is None else format(value, spec))
    cells.append(format(max(r["test_acc_mean"] for r in history), ".4f"))
    rates = [r["steps_per_sec"] for r in history[1:] if r["steps_per_sec"] is not None]
    cells.append(f"{sum(rates) / len(rates):.2f}" if rates else "–")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_configs(c) -> dict:
  """algorithm -> resolved library config, for every algorithm of ``compare``; checks them all."""
  library, experiment = common.split(c)
  # Each compared algorithm takes the algorithm_options it has (compare=atc,choco with choco's
  # compressor set); an option none of them takes is refused below.
  options = dict(library.get("algorithm_options") or {})
  # every other field, ``algorithm`` too, even where compare replaces it
  config_lib.resolve({**library, "algorithm_options": {}})
  compare = experiment.get("compare") or (library.get("algorithm", "atc"),)
  # --config.compare=drt,atc arrives as one string (or a tuple holding one).
  compare = tuple(a.strip() for item in ((compare,) if isinstance(compare, str) else compare)
                  for a in str(item).split(",") if a.strip())
  compare = compare or (library.get("algorithm", "atc"),)  # --config.compare= : just one run
  if len(set(compare)) != len(compare):
    raise ValueError(f"config.compare={compare!r} names an algorithm twice; list each once")
  configs, taken = {}, set()
  for name in compare:
    try:
      accepted = algorithms.options(name) if name in algorithms.NAMES else ()
      own = {k: v for k, v in options.items() if k in accepted}
      configs[name] = config_lib.resolve({**library, "algorithm": name,
                                          "algorithm_options": own})
    except ValueError as e:  # said of compare, which set it, not of algorithm alone
      raise ValueError(f"config.compare names {name!r}: {e}") from None
    taken |= set(own)
  unused = sorted(set(options) - taken)
  if unused:
    raise ValueError(f"config.algorithm_options.{unused[0]} is an option of none of the "
                     f"compared algorithms ({', '.join(compare)}); drop it or compare one that "
                     "takes it")
  return configs


def run_experiment(c, workdir: str, overwrite: bool = False) -> dict:
  """Trains every algorithm of ``c.compare`` into ``workdir``; returns algorithm -> history."""
  configs = run_configs(c)
  for name, run_config in configs.items():  # refuse before anything is trained or written
    workdir_lib.check_workdir(os.path.join(workdir, name), run_config, overwrite)

  import jax  # noqa: PLC0415 -- after the host devices are set

  first = next(iter(configs.values()))
  logging.info("devices: %s", jax.devices())
  logging.info("config (%s):\n%s", ", ".join(configs),
               json.dumps(first.to_dict(), indent=1, sort_keys=True))
  data = common.data_for(first)
  histories = {}
  for name, run_config in configs.items():
    run_dir = os.path.join(workdir, name)
    histories[name] = train.train_and_evaluate(run_config, run_dir, data, overwrite=overwrite)
    if not distributed.is_main():  # process 0 writes the figures and the summary
      continue
    plotting.plot_histories({name: histories[name]}, os.path.join(run_dir, "curves.png"))
    plotting.plot_self_weights(histories[name], os.path.join(run_dir, "self_weights.png"),
                               f"{name}: self-weight per layer")

  if not distributed.is_main():
    return histories
  figure = plotting.plot_histories(histories, os.path.join(workdir, "comparison.png"))
  table = summary_table(histories)
  title = (f"{data.name}, K={first.num_agents} {first.topology}, {first.partition} partition, "
           f"{first.num_steps} steps of {first.batch_size} per agent")
  workdir_lib.write_text(os.path.join(workdir, "summary.md"), f"# {title}\n\n{table}\n")
  print(f"\n{title}\n{table}\n")
  print(f"runs:    {os.path.abspath(workdir)}/<algorithm>/  (metrics.jsonl, curves.png, ...)")
  print(f"plot:    {os.path.abspath(figure)}")
  print(f"summary: {os.path.abspath(os.path.join(workdir, 'summary.md'))}")
  return histories


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  backends.use_host_devices(_HOST_DEVICES.value)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         timeout_s=_JOIN_TIMEOUT.value)
  run_experiment(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  common.run(main)
