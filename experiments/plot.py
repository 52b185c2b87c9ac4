r"""Comparison figures and tables of sweep results (``experiments/sweep.py`` JSONL files).

Runs that differ only in ``seed`` form one group; each group is drawn as its mean over seeds with a
shaded mean ± std band, and summarised as mean ± std of its final metrics.

  python experiments/plot.py --sweep=runs/sweep.jsonl --out=runs/sweep_plots

writes ``comparison.png`` and ``summary.md`` to ``--out`` and prints the table. From Python::

  from experiments import plot
  groups = plot.group(plot.load("runs/sweep.jsonl"))
  print(plot.summary(groups))
  plot.plot(groups, "comparison.png")
"""

import errno
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from drt_jax import workdir as workdir_lib

DEFAULT_METRICS = ("test_acc_mean", "gen_gap", "consensus_distance", "output_disagreement")
TITLES = {
    "test_acc_mean": "mean test accuracy",
    "gen_gap": "generalization gap (train - test acc)",
    "consensus_distance": "consensus distance",
    "output_disagreement": "output disagreement",
    "train_loss": "training loss (mean over agents)",
    "self_weight_mean": "self-weight (parameter-weighted)",
}
_LOG_METRICS = ("consensus", "disagreement")
# Columns of summary(): (header, how a run gives the value, number format).
_COLUMNS = (
    ("final test acc", lambda r: r["final"].get("test_acc_mean"), ".4f"),
    ("best test acc", lambda r: r.get("best_test_acc_mean"), ".4f"),
    ("final gen gap", lambda r: r["final"].get("gen_gap"), ".4f"),
    ("final consensus", lambda r: r["final"].get("consensus_distance"), ".3g"),
    ("final disagreement", lambda r: r["final"].get("output_disagreement"), ".3g"),
)


def load(paths: str | Sequence[str]) -> list[dict]:
  """The ok rows of one or more sweep files; a run stored twice (same full config) counts once.

  A line cut short by a killed sweep is skipped with a warning; a file that is not there is an
  error (a mistyped path must not drop its runs from the comparison unnoticed).
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  rows = {}
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    for row in workdir_lib.read_jsonl(path):
      if row.get("status") == "ok" and isinstance(row.get("history"), list):
        rows[json.dumps(row.get("config", row.get("key")), sort_keys=True)] = row
  return list(rows.values())


def _field(config: dict, name: str):
  for part in name.split("."):
    config = config.get(part) if isinstance(config, dict) else None
  return config


def _label(pairs) -> str:
  return ", ".join(f"{k}={v}" for k, v in pairs) or "base"


def group(rows: Sequence[dict], by: str | Sequence[str] | None = None) -> dict[str, list[dict]]:
  """Groups runs by label, in the order they first appear.

  By default a label is the run's overrides other than ``seed`` (``"algorithm=drt,
  topology=ring"``), so a group holds the seeds of one setting. ``by`` names the config fields
  (dotted allowed) that make the label instead, e.g. ``by="algorithm"``.
  """
  by = [by] if isinstance(by, str) else by
  groups = {}
  for row in rows:
    if by is None:
      pairs = sorted((k, v) for k, v in row["overrides"].items() if k != "seed")
    else:
      pairs = [(name, _field(row["config"], name)) for name in by]
    groups.setdefault(_label(pairs), []).append(row)
  return groups


def _std(values: np.ndarray, axis=0) -> np.ndarray:
  """Sample standard deviation over runs (0 for a single run)."""
  n = values.shape[axis]
  return np.std(values, axis=axis, ddof=1) if n > 1 else np.zeros_like(np.mean(values, axis))


def curves(rows: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, std)`` of ``metric`` over runs, at the steps every run evaluated it."""
  series = [{h["step"]: h[metric] for h in r["history"] if h.get(metric) is not None}
            for r in rows]
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  if not steps:
    return np.zeros(0, int), np.zeros(0), np.zeros(0)
  values = np.array([[s[t] for t in steps] for s in series], dtype=float)
  return np.array(steps), values.mean(0), _std(values)


def _cell(values: list, fmt: str) -> str:
  values = np.array([v for v in values if v is not None], dtype=float)
  if not values.size:
    return "–"
  return f"{format(values.mean(), fmt)} ± {format(float(_std(values)), fmt)}"


def summary(groups: dict[str, list[dict]]) -> str:
  """A markdown table: per group, mean ± std over its runs of the final metrics."""
  headers = ["group", *[h for h, _, _ in _COLUMNS], "seeds"]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for label, rows in groups.items():
    cells = [_cell([get(r) for r in rows], fmt) for _, get, fmt in _COLUMNS]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(rows)} |")
  return "\n".join(lines)


def plot(groups: dict[str, list[dict]], path: str,
         metrics: Sequence[str] = DEFAULT_METRICS, title: str | None = None) -> str:
  """One PNG: a panel per metric, a line per group (mean over seeds, shaded ± std), under
  ``title``. Distances are drawn on a log axis from the first step after 0 (agents that start
  equal are 0 apart at step 0, which a log axis cannot show)."""
  fig = Figure(figsize=(4 * len(metrics), 3.4 if title else 3.2))
  axes = fig.subplots(1, len(metrics), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    log = any(w in metric for w in _LOG_METRICS)  # >= 0, many decades
    for label, rows in groups.items():
      steps, mean, std = curves(rows, metric)
      if log:  # from step 1 on: agents that start equal sit at rounding noise at step 0
        keep = (mean > 0) & (steps > 0)
        steps, mean, std = steps[keep], mean[keep], std[keep]
      if not len(steps):
        continue
      (line,) = ax.plot(steps, mean, label=label)
      low = np.maximum(mean - std, mean * 0.1) if log else mean - std
      ax.fill_between(steps, low, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_title(TITLES.get(metric, metric), fontsize=10)
    ax.set_xlabel("step")
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both" if log else "major")
  axes[0][0].legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  workdir_lib.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100))
  return path


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_multi_string("sweep", [], "Sweep JSONL file(s) from experiments/sweep.py.")
  flags.DEFINE_string("out", "runs/sweep_plots", "Folder for comparison.png and summary.md.")
  flags.DEFINE_list("metrics", list(DEFAULT_METRICS), "History metrics to plot.")
  flags.DEFINE_list("by", None, "Config fields that label a group (default: every swept field "
                    "but seed).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.sweep:
    raise app.UsageError("give at least one --sweep=path.jsonl")
  if not f.metrics:
    raise app.UsageError("--metrics is empty; name at least one, e.g. --metrics=test_acc_mean")
  if os.path.exists(f.out) and not os.path.isdir(f.out):
    raise app.UsageError(f"--out={f.out} is a file; give a folder for comparison.png and "
                         "summary.md")
  rows = load(f.sweep)
  if not rows:
    raise app.UsageError(f"no finished runs (status ok) in {', '.join(f.sweep)}")
  known = sorted({k for r in rows for h in r["history"] for k in h} - {"step"})
  for metric in f.metrics:
    if metric not in known:
      raise app.UsageError(f"--metrics: no run has {metric!r}; the runs have: {', '.join(known)}")
  for name in f.by or ():
    if all(_field(r.get("config", {}), name) is None for r in rows):
      raise app.UsageError(f"--by: no run's config has {name!r}; name config fields, dotted "
                           "for nested ones, e.g. --by=algorithm,drt.strength")
  groups = group(rows, f.by)
  figure = plot(groups, os.path.join(f.out, "comparison.png"), f.metrics)
  table = summary(groups)
  workdir_lib.write_text(os.path.join(f.out, "summary.md"), table + "\n")
  print(table)
  print(f"\nfigure: {os.path.abspath(figure)}")


if __name__ == "__main__":
  from experiments import common  # noqa: PLC0415 -- here so that importing plot stays light

  define_flags()
  common.run(main)
