r"""Sweeps: one training run per point of a grid of config overrides, in one process, resumable.

Each finished run appends one JSON line to ``--out``: its key (the sorted JSON of its overrides),
the overrides, the full resolved config, the history (scalar metrics of every evaluation), the
final row, the best ``test_acc_mean``, the wall time and ``status``: "ok", "diverged" (NaN/Inf:
a result of the point, not retried) or "error" (retried). A rerun
with the same ``--out`` skips the points that already have an ok row and retries the failed ones.
Runs of the same shapes share one compiled step (seeds, learning rates, DRT strengths,
topology weights), so a sweep over seeds compiles once.

  python experiments/sweep.py --config=experiments/configs/default.py:smoke \
      --grid=algorithm=atc,drt --grid=seed=0,1 --out=runs/sweep.jsonl

``--grid field=v1,v2,...`` is repeated, one per field; dotted fields (``drt.strength``,
``model_options.hidden``) are allowed; values are comma-separated scalars read as JSON where
possible (``0.1``, ``true``, ``"0"``) and as strings otherwise (``ring``). Points are the product of
the grids, the last ``--grid`` varying fastest. ``experiments/plot.py`` turns the JSONL into
figures and a table.

From Python::

  from experiments import sweep
  rows = sweep.run(base, sweep.points({"algorithm": ["atc", "drt"], "seed": [0, 1, 2]}),
                   "runs/sweep.jsonl")
"""

import copy
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from drt_jax import backends, train
from drt_jax import config as config_lib
from drt_jax import workdir as workdir_lib
from experiments import common

FINISHED = ("ok", "diverged")  # statuses a rerun skips
GRID_FORM = "field=v1,v2,... (e.g. --grid=seed=0,1 or --grid=drt.strength=0.5,1.0)"


# --------------------------------------------------------------------------------------------
# Points.


def points(grid: Mapping[str, Sequence]) -> list[dict]:
  """Every combination of the grid's values, the last field varying fastest.

  >>> points({"algorithm": ["atc", "drt"], "seed": [0, 1]})
  [{'algorithm': 'atc', 'seed': 0}, {'algorithm': 'atc', 'seed': 1},
   {'algorithm': 'drt', 'seed': 0}, {'algorithm': 'drt', 'seed': 1}]
  """
  lists = {}
  for field, values in grid.items():
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
      raise ValueError(f"grid field {field!r} needs a list of values; got {values!r}")
    lists[field] = list(values)
    if not lists[field]:
      raise ValueError(f"grid field {field!r} has no values; give at least one")
  return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]


def run_key(overrides: Mapping) -> str:
  """The stable identity of one point: its overrides as sorted JSON."""
  return json.dumps(dict(overrides), sort_keys=True, default=str)


def safe_name(key: str) -> str:
  """A folder name for a run key: its readable part plus a short hash (unique per key)."""
  overrides = json.loads(key)
  readable = ",".join(f"{k}={v}" for k, v in overrides.items())
  readable = re.sub(r"[^A-Za-z0-9.,=+-]+", "_", readable).strip("_") or "run"
  return f"{readable[:100]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def config_for(base, overrides: Mapping) -> dict:
  """``base`` (ConfigDict or dict of library fields) with ``overrides`` (dotted names) applied."""
  if isinstance(base, ml_collections.ConfigDict):
    d, _ = common.split(base)
  else:
    d = copy.deepcopy(dict(base or {}))
    for field in common.EXPERIMENT_FIELDS:
      d.pop(field, None)
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = d
    for i, name in enumerate(parents):
      child = node.setdefault(name, {})
      if isinstance(child, ml_collections.ConfigDict):
        child = node[name] = child.to_dict()
      if not isinstance(child, dict):
        raise ValueError(f"config field {'.'.join(parents[:i + 1])!r} is not a group; cannot "
                         f"set {field!r}")
      node = child
    node[leaf] = value
  return d


def check(base, overrides_list: Sequence[Mapping]) -> None:
  """Resolves every point before anything trains; raises one ValueError line for a bad one."""
  for overrides in overrides_list:
    try:
      config_lib.resolve(config_for(base, overrides))
    except (ValueError, TypeError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"grid point {run_key(overrides)}: {first}") from e


# --------------------------------------------------------------------------------------------
# Rows.


def _scalar(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _scalars(row: dict, metrics: Sequence[str] | None) -> dict:
  keep = None if metrics is None else {"step", "epoch", *metrics}
  return {k: _scalar(v) for k, v in row.items()
          if (v is None or isinstance(v, (bool, int, float, str)))
          and (keep is None or k in keep)}


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


# --------------------------------------------------------------------------------------------
# Running.


def train_one(config: dict, workdir: str | None = None, metrics: Sequence[str] | None = None):
  """Trains one point; returns the result fields of its row (without key and overrides)."""
  start = time.perf_counter()
  history = train.train_and_evaluate(config, workdir, data=common.data_for(config))
  wall = time.perf_counter() - start
  best = [r["test_acc_mean"] for r in history if r.get("test_acc_mean") is not None]
  rows = [_scalars(r, metrics) for r in history]
  return {"history": rows, "final": rows[-1], "best_test_acc_mean": max(best, default=None),
          "wall_time_s": wall, "status": "ok"}


def run(base, overrides_list: Sequence[Mapping], out: str, *, workdir_root: str | None = None,
        metrics: Sequence[str] | None = None) -> list[dict]:
  """Trains every point not yet finished in ``out`` and appends one JSON line per run to it.

  Args:
    base: a ConfigDict (experiment fields such as ``compare`` are dropped) or a dict of library
      fields.
    overrides_list: one dict per point (e.g. from :func:`points`); dotted names allowed.
    out: the JSONL file; points with an ok row there are skipped, failed ones are retried.
    workdir_root: if given, each run writes its ``metrics.jsonl`` etc. to
      ``<workdir_root>/<safe_name(key)>``.
    metrics: history metrics to keep (None: every scalar metric; step and epoch always).

  Returns:
    One row per distinct point, in order: the stored one for skipped points, else the new one.
  """
  check(base, overrides_list)
  done = {r["key"]: r for r in workdir_lib.read_jsonl(out)
          if r.get("status") in FINISHED and "key" in r}
  todo, results = [], {}
  for overrides in overrides_list:
    key = run_key(overrides)
    if key in results:
      continue
    results[key] = done.get(key)
    if key not in done:
      todo.append(overrides)
  skipped = len(results) - len(todo)
  if skipped:
    logging.info("skipping %d finished runs (in %s)", skipped, out)
  for row in results.values():
    if row is not None:
      _warn_if_config_changed(row, config_for(base, row["overrides"]))

  for i, overrides in enumerate(todo, 1):
    key = run_key(overrides)
    config = config_for(base, overrides)
    resolved = config_lib.resolve(config).to_dict()
    workdir = os.path.join(workdir_root, safe_name(key)) if workdir_root else None
    logging.info("run %d/%d: %s", i, len(todo), key)
    row = {"key": key, "overrides": dict(overrides), "config": resolved}
    start = time.perf_counter()
    try:
      row.update(train_one(config, workdir, metrics))
    except FloatingPointError as e:  # the point diverges: its result, not a failure to retry
      logging.warning("run %s diverged: %s", key, _one_line(e))
      row.update(status="diverged", error=_one_line(e), wall_time_s=time.perf_counter() - start)
    except Exception as e:  # one failing point must not end the sweep
      logging.exception("run %s failed", key)
      row.update(status="error", error=_one_line(e), wall_time_s=time.perf_counter() - start)
    results[key] = workdir_lib.append_jsonl(out, row)  # synced: a killed sweep keeps it
  return list(results.values())


def _warn_if_config_changed(row: dict, config: dict) -> None:
  now, then = config_lib.resolve(config).to_dict(), row.get("config", {})
  changed = sorted(k for k in now if k in then and json.dumps(now[k], sort_keys=True)
                   != json.dumps(then[k], sort_keys=True))
  if changed:
    logging.warning("run %s in the sweep file was trained with other values of %s than the base "
                    "config has now; it is kept (use another --out to rerun it)", row["key"],
                    ", ".join(changed))


# --------------------------------------------------------------------------------------------
# Command line.


def _value(text: str):
  try:
    v = json.loads(text)
  except json.JSONDecodeError:
    return text
  return v if v is None or isinstance(v, (bool, int, float, str)) else text


def _known_field(field: str) -> bool:
  node = config_lib.default_config()
  for name in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return False
    if name.endswith("options"):
      return True  # options are free-form (model_options.hidden, topology_options.p)
    node = node[name]
  return True


def parse_grid(specs: Sequence[str]) -> dict[str, list]:
  """``["seed=0,1", "algorithm=atc,drt"]`` -> ``{"seed": [0, 1], "algorithm": ["atc", "drt"]}``.

  Raises one ValueError line naming the problem and the accepted form.
  """
  grid = {}
  for spec in specs:
    field, sep, values = spec.partition("=")
    field = field.strip()
    if not sep or not field:
      raise ValueError(f"--grid {spec!r} is malformed; expected {GRID_FORM}")
    if not _known_field(field):
      raise ValueError(f"--grid {spec!r}: unknown config field {field!r}; expected {GRID_FORM} "
                       "with a field of drt_jax.config.default_config()")
    if field in grid:
      raise ValueError(f"--grid {spec!r}: field {field!r} given twice; expected one "
                       f"{GRID_FORM} per field")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
      raise ValueError(f"--grid {spec!r}: empty value; expected {GRID_FORM}")
    grid[field] = [_value(v) for v in items]
  return grid


def summary_table(rows: Sequence[dict]) -> str:
  """One line per run: key, final test accuracy, generalization gap, wall time."""

  def num(row, field):
    v = row.get("final", {}).get(field)
    return "-" if v is None else f"{v:.4f}"

  width = max([len(r["key"]) for r in rows] + [3])
  lines = [f"{'key':<{width}}  {'test acc':>8}  {'gen gap':>8}  {'wall s':>7}  status"]
  for r in rows:
    wall = r.get("wall_time_s")
    lines.append(f"{r['key']:<{width}}  {num(r, 'test_acc_mean'):>8}  {num(r, 'gen_gap'):>8}  "
                 f"{'-' if wall is None else f'{wall:.1f}':>7}  "
                 f"{r['status'] if r['status'] == 'ok' else r.get('error', r['status'])}")
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path:variant).",
                                  lock_config=True)
  flags.DEFINE_multi_string("grid", [], f"One swept field: {GRID_FORM}; repeat per field.")
  flags.DEFINE_string("out", "runs/sweep.jsonl", "JSONL file the runs are appended to.")
  flags.DEFINE_string("workdir_root", "", "If set, each run's metrics.jsonl and config.json go "
                      "to <workdir_root>/<run name>.")
  flags.DEFINE_integer("host_devices", 8, "Virtual CPU devices, so that the 'auto' back-end "
                       "shards the agents over them; no effect on a GPU or TPU.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  backends.use_host_devices(f.host_devices)
  if f.config is None:
    sys.exit("error: --config is required, e.g. --config=experiments/configs/default.py:smoke")
  todo = points(parse_grid(f.grid))  # bad input: a ValueError, one line from common.run
  check(f.config, todo)
  if os.path.isdir(f.out):
    raise ValueError(f"--out={f.out} is a folder; give the JSONL file to append the runs to")
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  open(f.out, "a").close()  # can it be written? Before any run, not after the first one
  rows = run(f.config, todo, f.out, workdir_root=f.workdir_root or None)
  print(summary_table(rows))
  print(f"\nresults: {os.path.abspath(f.out)}")


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.INFO)
  common.run(main)
