r"""Sweeps: one training run per point of a grid of config overrides, in one process, resumable.

Each finished run appends one JSON line to ``--out``: its key (the sorted JSON of its overrides),
the overrides, the full resolved config, the history (scalar metrics of every evaluation), the
final row, the best ``test_acc_mean``, the wall time and ``status``: "ok", "diverged" (NaN/Inf:
a result of the point, not retried) or "error" (retried). A rerun
with the same ``--out`` skips the points that already have an ok row and retries the failed ones;
a line of ``--out`` that is not a whole row is skipped with a warning (its point runs again).
The binary runs every point, then exits non-zero if some failed (status "error"). One sweep at a
time writes an ``--out``: ``<out>.lock`` holds its pid and host while it runs (a lock left by a
sweep that died on this host is taken over, with a warning). Runs of the same shapes share one
compiled step (seeds, learning rates, DRT strengths, topology weights), so a sweep over seeds
compiles once.

``--vectorize`` (default ``auto``) trains points that differ only in
:data:`drt_jax.vectorize.VECTORIZED_FIELDS` (seeds, learning rates, DRT strengths, weights,
partitions) as one program (:func:`drt_jax.vectorize.train_and_evaluate_many`); ``auto`` does so
on a GPU or TPU (:data:`AUTO_PLATFORMS`) and trains point by point on a CPU, where the program over
several members was measured no faster per member (``on`` forces it anywhere). The points still to
run are grouped into *blocks*: points whose resolved configs agree on every other field. A block of
two or more runs vectorised; a block of one, and a block that :func:`drt_jax.vectorize.vectorizable`
refuses (a random graph drawn from the seed, several processes; one log line says why), runs
sequentially. ``on`` is ``auto`` that fails (one line, before anything trains) on a refused block;
``off`` runs every point on its own. A member's row is the one its sequential run writes, to float
rounding (a diverged member gets the row of a run that raised ``FloatingPointError``), its workdir
the same folder; its ``wall_time_s`` is its share of its block's wall time (the block's time over
its members), so the rows' times add up to the sweep's. A block that fails while running (not a
divergence) is run again point by point, so each point gets its own ok or error row. Rows are
appended when their run (or block) ends: blocks in the order of their first point in the grid, each
block's points in grid order, so a grid whose vectorised fields are the last ``--grid`` flags keeps
the grid's order exactly; the rows :func:`run` returns are in grid order always. A killed sweep
loses its unfinished block's rows only: the rerun trains that block's unfinished points again (from
their checkpoints, if ``--workdir_root`` keeps them).

  python experiments/sweep.py --config=experiments/configs/default.py:smoke \
      --grid=algorithm=atc,drt --grid=seed=0,1 --out=runs/sweep.jsonl

(two blocks, atc and drt, each of two seeds trained as one program).

``--grid field=v1,v2,...`` is repeated, one per field; dotted fields (``drt.strength``,
``model_options.hidden``) are allowed; values are comma-separated, each read as JSON where possible
(``0.1``, ``true``, ``"0"``), else as a Python literal (``(16, 16)``, ``[8]``: commas inside
brackets or quotes belong to the value), else as a string (``ring``). Points are the product of
the grids, the last ``--grid`` varying fastest. ``experiments/plot.py`` turns the JSONL into
figures and a table.

From Python::

  from experiments import sweep
  rows = sweep.run(base, sweep.points({"algorithm": ["atc", "drt"], "seed": [0, 1, 2]}),
                   "runs/sweep.jsonl")
"""

import ast
import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from drt_jax import backends, train
from drt_jax import config as config_lib
from drt_jax import vectorize as vectorize_lib
from drt_jax import workdir as workdir_lib
from experiments import common

FINISHED = ("ok", "diverged")  # statuses a rerun skips
VECTORIZE = ("auto", "on", "off")  # how run() trains blocks of points (see the module docstring)
GRID_FORM = ("field=v1,v2,... (e.g. --grid=seed=0,1, --grid=drt.strength=0.5,1.0 or "
             "--grid=model_options.hidden=(16,),(32,))")
# A lock whose holder wrote nothing readable is taken over only this long after it was made (a
# starting sweep writes its pid right after creating it).
_LOCK_UNREADABLE_GRACE_S = 10.0


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


def blocks(base, overrides_list: Sequence[Mapping]) -> list[list[dict]]:
  """The points in blocks whose resolved configs differ only in ``VECTORIZED_FIELDS``.

  Blocks come in the order of their first point, each block's points in the order given (a
  stable sort by block), so a grid whose vectorised fields vary fastest keeps its order.

  >>> blocks(base, points({"algorithm": ["atc", "drt"], "seed": [0, 1]}))
  [[{'algorithm': 'atc', 'seed': 0}, {'algorithm': 'atc', 'seed': 1}],
   [{'algorithm': 'drt', 'seed': 0}, {'algorithm': 'drt', 'seed': 1}]]
  """
  groups: dict[str, list[dict]] = {}
  for overrides in overrides_list:
    flat = workdir_lib.flatten(config_lib.resolve(config_for(base, overrides)).to_dict())
    shape = {k: v for k, v in flat.items() if k not in vectorize_lib.VECTORIZED_FIELDS}
    groups.setdefault(json.dumps(shape, sort_keys=True, default=str), []).append(dict(overrides))
  return list(groups.values())


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


def time_averages(history: Sequence[dict]) -> dict:
  """Every ``self_weight*`` metric averaged over a run's evaluations after step 0 (at step 0 no
  combine has run yet): a run's typical mixing, e.g. DRT's per-layer self-weights."""
  later = [r for r in history if r.get("step", 0) > 0]
  names = sorted({k for r in later for k, v in r.items()
                  if k.startswith("self_weight") and isinstance(v, (int, float))})
  return {k: float(np.mean([r[k] for r in later if r.get(k) is not None])) for k in names}


def _result(history: Sequence[dict], wall: float, metrics: Sequence[str] | None) -> dict:
  best = [r["test_acc_mean"] for r in history if r.get("test_acc_mean") is not None]
  rows = [_scalars(r, metrics) for r in history]
  return {"history": rows, "final": rows[-1], "best_test_acc_mean": max(best, default=None),
          "time_avg": time_averages(history), "wall_time_s": wall, "status": "ok"}


def train_one(config: dict, workdir: str | None = None, metrics: Sequence[str] | None = None):
  """Trains one point; returns the result fields of its row (without key and overrides)."""
  start = time.perf_counter()
  history = train.train_and_evaluate(config, workdir, data=common.data_for(config))
  return _result(history, time.perf_counter() - start, metrics)


def _as_members(resolved: Sequence[dict]) -> tuple[dict, list[dict]]:
  """A block's resolved configs as ``train_and_evaluate_many``'s base and members: the first
  config, and each point's values of the vectorised fields (the rest is the same in a block)."""
  flats = [workdir_lib.flatten(c) for c in resolved]
  members = [{f: flat[f] for f in vectorize_lib.VECTORIZED_FIELDS if f in flat}
             for flat in flats]
  return dict(resolved[0]), members


def train_block(resolved: Sequence[dict], workdirs: Sequence[str | None],
                metrics: Sequence[str] | None = None) -> list[dict]:
  """Trains one block's points (resolved configs) as one program; returns each point's result
  fields: :func:`train_one`'s for an ok member, ``status`` diverged and the ``error`` a
  sequential run that raised records for a diverged one; each with its share of the wall time."""
  start = time.perf_counter()
  base, members = _as_members(resolved)
  datas = [common.data_for(c) for c in resolved]  # loaded once per process, as train_one's
  data = datas[0] if all(d is datas[0] for d in datas) else None  # else: each loads its own
  histories = vectorize_lib.train_and_evaluate_many(base, members, workdirs=list(workdirs),
                                                    data=data)
  share = (time.perf_counter() - start) / len(resolved)
  results = []
  for history in histories:
    if history.status == "ok":
      results.append(_result(history, share, metrics))
    else:
      results.append({"status": "diverged", "error": _one_line(FloatingPointError(history.error)),
                      "wall_time_s": share})
  return results


def run(base, overrides_list: Sequence[Mapping], out: str, *, workdir_root: str | None = None,
        metrics: Sequence[str] | None = None, vectorize: str = "auto") -> list[dict]:
  """Trains every point not yet finished in ``out`` and appends one JSON line per run to it.

  Args:
    base: a ConfigDict (experiment fields such as ``compare`` are dropped) or a dict of library
      fields.
    overrides_list: one dict per point (e.g. from :func:`points`); dotted names allowed.
    out: the JSONL file; points with an ok row there are skipped, failed ones are retried.
    workdir_root: if given, each run writes its ``metrics.jsonl`` etc. to
      ``<workdir_root>/<safe_name(key)>``.
    metrics: history metrics to keep (None: every scalar metric; step and epoch always).
    vectorize: ``"auto"`` trains each block of two or more unfinished points (:func:`blocks`)
      as one program and the rest one by one, on a GPU or TPU (on a CPU, point by point);
      ``"on"`` does so anywhere, and a block that cannot be vectorised is an error; ``"off"``
      trains every point on its own (see the module docstring for the order of the appended
      rows).

  Returns:
    One row per distinct point, in order: the stored one for skipped points, else the new one.

  Raises:
    ValueError: a point is not a valid config, ``vectorize`` is not one of :data:`VECTORIZE`, or
      with ``"on"`` a block cannot be vectorised (nothing has run).
    Locked: another sweep, still running, writes ``out`` (it holds ``<out>.lock``).
  """
  if vectorize not in VECTORIZE:
    raise ValueError(f"vectorize={vectorize!r} is not one of {', '.join(VECTORIZE)}")
  check(base, overrides_list)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with _locked(out):
    return _run(base, overrides_list, out, workdir_root, metrics, vectorize)


def _finished(row: dict) -> bool:
  """Whether ``row`` is a whole row of a finished point (a rerun skips its point)."""
  overrides = row.get("overrides")
  return (row.get("status") in FINISHED and isinstance(overrides, dict)
          and row.get("key") == run_key(overrides)
          and (row["status"] != "ok" or isinstance(row.get("final"), dict)))


# Where ``auto`` vectorises. On a 2-core CPU one program over S members was not faster per member
# than S runs one after another (0.59x-1.00x at S = 4..16, benchmarks/sweeps.py): the cores are
# already busy with one run, and the wider program compiles slower.
AUTO_PLATFORMS = ("gpu", "tpu")


def _plan(base, todo: list[dict], vectorize: str) -> list[list[dict]]:
  """``todo`` in the blocks that run: those of two or more points run vectorised."""
  if vectorize == "auto" and jax.default_backend() not in AUTO_PLATFORMS:
    if len(todo) > 1:
      logging.info("vectorize=auto on %s trains the points one by one (vectorising is not "
                   "faster here: benchmarks/sweeps.py); --vectorize=on forces it",
                   jax.default_backend())
    vectorize = "off"
  if vectorize == "off":
    return [[overrides] for overrides in todo]
  plan = []
  for block in blocks(base, todo):
    if len(block) > 1:
      try:
        vectorize_lib.vectorizable(*_as_members(
            [config_lib.resolve(config_for(base, o)).to_dict() for o in block]))
      except ValueError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if vectorize == "on":
          raise ValueError(f"vectorize=on: the block of {len(block)} points from "
                           f"{run_key(block[0])} cannot run as one program: {why} (vectorize=auto "
                           "runs such a block point by point)") from e
        logging.info("the block of %d points from %s runs sequentially: %s", len(block),
                     run_key(block[0]), why)
        plan += [[overrides] for overrides in block]
        continue
    plan.append(block)
  return plan


def _run(base, overrides_list, out, workdir_root, metrics, vectorize="auto") -> list[dict]:
  done, broken = {}, 0
  for row in workdir_lib.read_jsonl(out):
    if _finished(row):
      done[row["key"]] = row
    elif row.get("status") != "error" or not isinstance(row.get("key"), str):
      broken += 1
  if broken:
    logging.warning("%s: %d rows are not whole sweep rows (key, overrides, status, final); "
                    "ignored, their points run again", out, broken)
  todo, results = [], {}
  for overrides in overrides_list:
    key = run_key(overrides)
    if key in results:
      continue
    results[key] = done.get(key)
    if key in done:
      _warn_if_config_changed(done[key], config_for(base, overrides))
    else:
      todo.append(overrides)
  skipped = len(results) - len(todo)
  if skipped:
    logging.info("skipping %d finished runs (in %s)", skipped, out)

  def workdir(key):
    return os.path.join(workdir_root, safe_name(key)) if workdir_root else None

  def run_one(i, overrides):
    key = run_key(overrides)
    config = config_for(base, overrides)
    resolved = config_lib.resolve(config).to_dict()
    logging.info("run %d/%d: %s", i, len(todo), key)
    row = {"key": key, "overrides": dict(overrides), "config": resolved}
    start = time.perf_counter()
    try:
      row.update(train_one(config, workdir(key), metrics))
    except FloatingPointError as e:  # the point diverges: its result, not a failure to retry
      logging.warning("run %s diverged: %s", key, _one_line(e))
      row.update(status="diverged", error=_one_line(e), wall_time_s=time.perf_counter() - start)
    except Exception as e:  # one failing point must not end the sweep
      logging.exception("run %s failed", key)
      row.update(status="error", error=_one_line(e), wall_time_s=time.perf_counter() - start)
    results[key] = workdir_lib.append_jsonl(out, row)  # synced: a killed sweep keeps it

  def run_block(i, block):
    keys = [run_key(overrides) for overrides in block]
    resolved = [config_lib.resolve(config_for(base, o)).to_dict() for o in block]
    logging.info("runs %d-%d/%d as one program: %s", i, i + len(block) - 1, len(todo),
                 ", ".join(keys))
    try:
      got = train_block(resolved, [workdir(key) for key in keys], metrics)
    except Exception as e:  # each point's own run says whether, and how, it fails
      logging.warning("the block of runs %d-%d failed (%s); its runs go one by one", i,
                      i + len(block) - 1, _one_line(e))
      for j, overrides in enumerate(block, i):
        run_one(j, overrides)
      return
    for key, overrides, config, result in zip(keys, block, resolved, got):
      if result["status"] == "diverged":
        logging.warning("run %s diverged: %s", key, result["error"])
      row = {"key": key, "overrides": dict(overrides), "config": config, **result}
      results[key] = workdir_lib.append_jsonl(out, row)

  i = 1
  for block in _plan(base, todo, vectorize):
    if len(block) > 1:
      run_block(i, block)
    else:
      run_one(i, block[0])
    i += len(block)
  return list(results.values())


def _warn_if_config_changed(row: dict, config: dict) -> None:
  now, then = config_lib.resolve(config).to_dict(), row.get("config")
  then = then if isinstance(then, dict) else {}
  changed = sorted(k for k in now if k in then and json.dumps(now[k], sort_keys=True)
                   != json.dumps(then[k], sort_keys=True))
  if changed:
    logging.warning("run %s in the sweep file was trained with other values of %s than the base "
                    "config has now; it is kept (use another --out to rerun it)", row["key"],
                    ", ".join(changed))


# --------------------------------------------------------------------------------------------
# The output file's lock: two sweeps appending to one file would each train the other's points.


class Locked(OSError):
  """Another sweep, still running, writes the same output file."""


def _holder(path: str) -> dict | None:
  """What a lock file says of its holder: ``{}`` if unreadable, None if it is gone."""
  try:
    with open(path) as f:
      holder = json.loads(f.read() or "null")
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _alive(pid) -> bool:
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _stale(path: str, holder: dict) -> bool:
  """A lock whose sweep is gone: on this host with a dead pid, or unreadable and not new."""
  if not holder:
    try:
      return time.time() - os.path.getmtime(path) > _LOCK_UNREADABLE_GRACE_S
    except OSError:
      return False
  return holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))


@contextlib.contextmanager
def _locked(out: str):
  """Holds ``<out>.lock`` (created with O_EXCL, holding pid and host) while the body runs."""
  path, me = out + ".lock", {"pid": os.getpid(), "host": socket.gethostname()}
  for _ in range(3):  # a stale lock removed, or one gone in between: try again
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if holder is None:
        continue
      if not _stale(path, holder):
        who = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
               else "a sweep starting now (no pid written yet)")
        raise Locked(f"{out} is in use by another sweep: {path} holds {who}; wait for it, use "
                     f"another --out, or remove {path} if no sweep runs there") from None
      logging.warning("taking over %s: its sweep (pid %s on %s) is not running", path,
                      holder.get("pid"), holder.get("host"))
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise Locked(f"{out}: could not take {path}; another sweep keeps taking it")
  try:
    yield path
  finally:
    if _holder(path) == me:  # not a lock another sweep took over meanwhile
      os.remove(path)


# --------------------------------------------------------------------------------------------
# Command line.


def _plain(v) -> bool:
  """A value a config field can hold: a scalar, or a tuple or list of them."""
  if isinstance(v, (list, tuple)):
    return all(_plain(x) for x in v)
  return v is None or isinstance(v, (bool, int, float, str))


def _value(text: str):
  try:
    v = json.loads(text)  # 0.1, true, "0": as they always were
  except json.JSONDecodeError:
    try:
      v = ast.literal_eval(text)  # (16, 16), [8], 'a,b'
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return text  # a bare word such as ring
  return v if _plain(v) else text


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
    try:
      items = [v.strip() for v in config_lib.split_items(values)]
    except ValueError:
      raise ValueError(f"--grid {spec!r}: unbalanced brackets or quotes; expected "
                       f"{GRID_FORM}") from None
    if not values.strip() or any(not v for v in items):
      raise ValueError(f"--grid {spec!r}: empty value; expected {GRID_FORM}")
    grid[field] = [_value(v) for v in items]
  return grid


def summary_table(rows: Sequence[dict]) -> str:
  """One line per run: key, final test accuracy, generalization gap, wall time."""

  def num(value, spec):  # stored rows are read back: anything may stand in a field
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:{spec}}" if ok else "-"

  def final(row, field):
    return row["final"].get(field) if isinstance(row.get("final"), dict) else None

  width = max([len(r["key"]) for r in rows] + [3])
  lines = [f"{'key':<{width}}  {'test acc':>8}  {'gen gap':>8}  {'wall s':>7}  status"]
  for r in rows:
    status = r.get("status")
    lines.append(f"{r['key']:<{width}}  {num(final(r, 'test_acc_mean'), '.4f'):>8}  "
                 f"{num(final(r, 'gen_gap'), '.4f'):>8}  {num(r.get('wall_time_s'), '.1f'):>7}  "
                 f"{status if status == 'ok' else r.get('error', status)}")
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path:variant).",
                                  lock_config=True)
  flags.DEFINE_multi_string("grid", [], f"One swept field: {GRID_FORM}; repeat per field.")
  flags.DEFINE_string("out", "runs/sweep.jsonl", "JSONL file the runs are appended to.")
  flags.DEFINE_string("workdir_root", "", "If set, each run's metrics.jsonl and config.json go "
                      "to <workdir_root>/<run name>.")
  flags.DEFINE_enum("vectorize", "auto", VECTORIZE, "auto: on a GPU or TPU, train each block of "
                    "points that differ only in vectorisable fields (seed, learning_rate, "
                    "drt.strength, ...) as one program, the rest one by one (on a CPU, one by "
                    "one); on: a block that cannot be vectorised is an "
                    "error; off: every point on its own.")
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
  rows = run(f.config, todo, f.out, workdir_root=f.workdir_root or None, vectorize=f.vectorize)
  print(summary_table(rows))
  print(f"\nresults: {os.path.abspath(f.out)}")
  failed = sum(r.get("status") == "error" for r in rows)
  if failed:  # after every point ran; a diverged point is a result, not a failure
    sys.exit(f"error: {failed} of {len(rows)} sweep points failed (status error in {f.out}); "
             "rerun the same command to retry them")


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.INFO)
  common.run(main)
