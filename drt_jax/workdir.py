"""What a run writes into its workdir and reads back.

A workdir holds ``config.json`` (the resolved config, what a rerun is compared with),
``metrics.jsonl`` (one JSON row per evaluation), ``partition.npz`` and ``partition.png`` (who holds
which examples), TensorBoard event files beside them, and ``checkpoints/``
(:mod:`drt_jax.checkpoint`). JSONL files -- a run's metrics, a sweep's rows -- are read by
:func:`read_jsonl` and appended to by :func:`append_jsonl` alone, whoever writes them.

What the side files may not do is decide the fate of the checkpoints: every file is replaced
atomically (a temporary file in the same folder, then ``os.replace``), so a kill leaves the old one
or the new one; appends to ``metrics.jsonl`` stay appends. Each checkpoint keeps the run's config
and its rows, so a missing or damaged ``config.json`` is rebuilt from the newest checkpoint (or the
run refused), never a reason to delete them, and lost rows come back from it. ``.lock`` (pid and
host of the run, :func:`lock`) keeps a second run out of a workdir in use.
"""

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Mapping

import ml_collections
import numpy as np
from absl import logging

from drt_jax import checkpoint, partition

LOCK = ".lock"


def read_jsonl(path: str, *, warn: bool = True) -> list[dict]:
  """The rows of a JSONL file in file order; ``[]`` if it does not exist.

  A line that is not a JSON object (a run killed while writing it, a stray edit) is skipped, with
  a warning naming it when ``warn``.
  """
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if not isinstance(row, dict):
        if warn:
          logging.warning("%s:%d is not a JSON object (cut short?); ignored", path, n)
        continue
      rows.append(row)
  return rows


def json_safe(row: dict) -> dict:
  """``row`` with non-finite floats as None (JSON has no NaN or Inf)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
          for k, v in row.items()}


def append_jsonl(path: str, row: dict, *, sync: bool = True) -> dict:
  """Appends ``row`` as one line (non-finite floats as None), synced to disk when ``sync``;
  returns it as stored (JSON types). A last line cut short by a killed writer is ended first,
  so the new row stays whole."""
  text = json.dumps(json_safe(row))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+") as f:
    f.seek(0, os.SEEK_END)
    if f.tell():
      f.seek(f.tell() - 1)
      if f.read(1) != "\n":
        f.write("\n")
    f.write(text + "\n")
    f.flush()
    if sync:
      os.fsync(f.fileno())
  return json.loads(text)


def replace_file(path: str, write) -> None:
  """Replaces ``path`` atomically with what ``write(tmp)`` writes to a temporary path in its folder
  (with the same extension, for writers that go by it): readers and a killed run see the old file
  or the new one. Raises OSError naming ``path`` when it cannot be written; the old one stays."""
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp{os.path.splitext(name)[1]}")
  try:
    write(tmp)
    with open(tmp, "rb+") as f:  # on disk before the rename, or a crash could leave it empty
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise OSError(f"could not write {path} ({e.strerror or e}); free space or make it writable "
                  "(the previous file is intact)") from e


def write_text(path: str, text: str) -> None:
  """Replaces ``path`` with ``text``, atomically (:func:`replace_file`)."""

  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)

  replace_file(path, write)


def write_jsonl(path: str, rows) -> None:
  """Replaces ``path`` with ``rows``, atomically (readers see the old file or the new one)."""
  write_text(path, "".join(json.dumps(json_safe(row)) + "\n" for row in rows))


def _read_config(path: str) -> tuple[dict | None, str]:
  """``(config, "")`` from ``path``, or ``(None, what is wrong with it)``."""
  try:
    with open(path) as f:
      old = json.load(f)
  except FileNotFoundError:
    return None, "missing"
  except (OSError, ValueError) as e:
    return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
  return (old, "") if isinstance(old, dict) else (None, "unreadable (not a JSON object)")


def _first_difference(old: dict, new: dict) -> str:
  flat_old, flat_new = flatten(old), flatten(new)
  field = next(k for k in sorted(set(flat_old) | set(flat_new))
               if flat_old.get(k, "<absent>") != flat_new.get(k, "<absent>"))
  was, now = flat_old.get(field, "<absent>"), flat_new.get(field, "<absent>")
  return f"{field}: {was!r} there, {now!r} now"


def check_workdir(workdir, c: ml_collections.ConfigDict, overwrite: bool = False) -> bool:
  """Refuses a workdir that holds a run of a different config, unless ``overwrite``.

  A workdir with the same config (a rerun) is accepted: it resumes from its newest good checkpoint
  if it has one (:mod:`drt_jax.checkpoint`), else its files are replaced. Returns whether the
  workdir holds a run of the same config (False with ``overwrite``, which starts afresh).

  Without a readable ``config.json`` the checkpoints speak for the run: the config kept in the
  newest one is compared instead, and ``config.json`` rebuilt from it when it is the same (one
  warning line); otherwise, or when no checkpoint keeps its config, the workdir is refused in one
  line. A ``checkpoints`` path that is not a folder is refused, even with ``overwrite``.
  """
  if not workdir:
    return False
  folder = checkpoint.directory(workdir)
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise ValueError(f"{folder} is a file, not the folder of the run's checkpoints; move it away "
                     "and rerun")
  if overwrite:
    return False
  path = os.path.join(workdir, "config.json")
  new = json.loads(c.to_json())
  old, problem = _read_config(path)
  if old is not None:
    if old != new:
      raise ValueError(f"workdir {workdir} holds a run of a different config "
                       f"({_first_difference(old, new)}); use another workdir or overwrite "
                       "(overwrite=True, --overwrite)")
    return True
  if not checkpoint.steps(workdir):
    if problem == "missing":
      return False
    raise ValueError(f"{path} is {problem} and no checkpoint keeps the run's config; delete it "
                     "to start afresh, or overwrite (overwrite=True, --overwrite)")
  found = checkpoint.stored_config(workdir)
  if found is None:
    raise ValueError(f"{path} is {problem} and no checkpoint in {folder} keeps its config whole; "
                     "put config.json back, or overwrite (overwrite=True, --overwrite), which "
                     "deletes the checkpoints")
  step, old = found
  if old != new:
    raise ValueError(f"{path} is {problem} and checkpoint {step} in {folder} holds a run of a "
                     f"different config ({_first_difference(old, new)}); use another workdir or "
                     "overwrite (overwrite=True, --overwrite)")
  write_text(path, c.to_json(indent=2, sort_keys=True))
  logging.warning("%s was %s; rebuilt from the config kept in checkpoint %d (the same as this "
                  "run's)", path, problem, step)
  return True


def check_writable(workdir) -> None:
  """Raises ValueError (one line) if ``workdir`` cannot be created or written; creates nothing."""
  if not workdir:
    return
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"workdir {workdir} cannot be created: {probe} is a file; choose another "
                     "workdir")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir} is not writable ({probe} denies writing); choose "
                     "another workdir")


_HELD: dict[str, bool] = {}  # lock path -> whether taking it made the workdir; this process's


def _holder(path: str) -> dict | None:
  """The run named in lock file ``path``, or None when it cannot be read."""
  for attempt in range(2):
    try:
      with open(path) as f:
        holder = json.load(f)
      if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
        return holder
    except (OSError, ValueError):
      pass
    if attempt == 0:
      time.sleep(0.2)  # created but not written yet, by a run starting this very moment
  return None


def _alive(holder: dict | None, path: str) -> bool:
  """Whether the run that holds the lock may still be running (another host's: assumed so)."""
  if holder is None:
    return False
  if holder.get("host") != socket.gethostname():
    return True
  if holder["pid"] == os.getpid():  # this process, or an earlier one given the same pid
    return os.path.abspath(path) in _HELD
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def acquire_lock(workdir) -> str | None:
  """Takes ``<workdir>/.lock`` for this run (creating the workdir); returns its path.

  The lock file holds the pid and host of the run and is created atomically (``O_EXCL``). A lock
  of a process that no longer runs on this host is taken over with one warning line; a live one
  (or one from another host) is refused with a one-line ValueError naming it.
  """
  if not workdir:
    return None
  made = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.abspath(os.path.join(workdir, LOCK))
  me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if _alive(holder, path):
        raise ValueError(f"workdir {workdir} is in use by another run (pid {holder['pid']} on "
                         f"{holder.get('host')}, lock file {path}); wait for it to end or use "
                         "another workdir (delete the lock file only if no such run is alive)"
                         ) from None
      logging.warning("taking over the lock %s of a run that no longer runs (%s)", path,
                      f"pid {holder['pid']} on {holder.get('host')}" if holder else "unreadable")
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      f.write(me)
    _HELD[path] = made
    return path
  raise ValueError(f"could not take the lock {path}: other runs keep taking it; start one run "
                   "per workdir")


def release_lock(path: str | None) -> None:
  """Removes the lock taken by :func:`acquire_lock` (if still this run's), and the workdir too if
  taking it made the workdir and nothing was written there since."""
  if path is None or path not in _HELD:
    return
  made = _HELD.pop(path)
  try:
    with open(path) as f:
      mine = json.load(f) == {"pid": os.getpid(), "host": socket.gethostname()}
  except (OSError, ValueError):
    mine = False
  with contextlib.suppress(OSError):
    if mine:
      os.remove(path)
    if made:
      os.rmdir(os.path.dirname(path))  # only if empty


@contextlib.contextmanager
def lock(workdir):
  """``with lock(workdir):`` the run holds ``<workdir>/.lock`` (:func:`acquire_lock`), removed on
  exit whatever the exit."""
  path = acquire_lock(workdir)
  try:
    yield path
  finally:
    release_lock(path)


def flatten(d: Mapping, prefix: str = "") -> dict:
  """A nested mapping (a config as a dict) with dotted keys: ``{"drt": {"floor": 0.05}}`` ->
  ``{"drt.floor": 0.05}``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def read_metrics(workdir, up_to: int | None = None) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` in step order, one per step (the first kept).

  Rows after ``up_to`` and a torn last line (a run killed while writing) are left out.
  """
  rows, seen = [], set()
  for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"), warn=False):
    step = row.get("step")
    if not isinstance(step, int) or step in seen or (up_to is not None and step > up_to):
      continue
    seen.add(step)
    rows.append(row)
  return sorted(rows, key=lambda r: r["step"])


def resumed_rows(workdir, step: int, kept: list | None) -> list[dict]:
  """The rows a run resumed at ``step`` continues from: those of ``metrics.jsonl`` up to it, or
  ``kept`` (the checkpoint's copy) where the file lost some, said in one warning line."""
  rows = read_metrics(workdir, up_to=step)
  kept = [r for r in kept or () if isinstance(r, dict) and r.get("step", step + 1) <= step]
  if len(kept) > len(rows):
    logging.warning("%s holds %d rows up to step %d, checkpoint %d kept %d; restored them from the "
                    "checkpoint", os.path.join(workdir, "metrics.jsonl"), len(rows), step, step,
                    len(kept))
    return kept
  return rows


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except (OSError, ValueError):
    return None


class Writer:
  """What process 0 writes during a run: ``config.json``, the partition, ``metrics.jsonl`` and
  TensorBoard event files (nothing without a workdir).

  ``rows`` (a resumed run's rows up to its checkpoint) replace the metrics file's contents,
  atomically.
  """

  def __init__(self, workdir: str | None, c: ml_collections.ConfigDict, prepared=None,
               rows: list | None = None, tensorboard: bool = True):
    self.path, self._tb = None, None
    if not workdir:
      return
    os.makedirs(workdir, exist_ok=True)
    config_path, text = os.path.join(workdir, "config.json"), c.to_json(indent=2, sort_keys=True)
    if _read_text(config_path) != text:
      write_text(config_path, text)
    if prepared is not None:
      replace_file(os.path.join(workdir, "partition.npz"),
                   lambda tmp: partition.save(prepared.parts, tmp))
      hist = partition.label_histogram(prepared.parts, prepared.data.train_labels,
                                       prepared.data.classes)
      title = f"{prepared.data.name}: {c.partition} partition over K={c.num_agents} agents"
      replace_file(os.path.join(workdir, "partition.png"),
                   lambda tmp: partition.plot_histogram(hist, tmp, title))
    self.path = os.path.join(workdir, "metrics.jsonl")
    write_jsonl(self.path, rows or ())
    if tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 -- only runs with a workdir need it

      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, row: dict) -> None:
    """Appends an evaluation row to ``metrics.jsonl`` and its scalars to TensorBoard."""
    if self.path:
      try:
        append_jsonl(self.path, row, sync=False)
      except OSError as e:  # a full disk: the rows before it stay (a torn line is skipped)
        raise OSError(f"could not append to {self.path} ({e.strerror or e}); free space or make "
                      "it writable and rerun: it resumes from the last checkpoint") from e
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, row["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def buffer_to_json(buf: dict) -> dict:
  """Per-step host metrics kept since the last evaluation, as a checkpoint stores them."""
  return {k: {"dtype": str(np.asarray(v[0]).dtype), "values": [np.asarray(x).tolist() for x in v]}
          for k, v in buf.items() if v}


def buffer_from_json(record: dict) -> dict:
  return {k: [np.asarray(x, v["dtype"]) for x in v["values"]] for k, v in record.items()}
