"""What a run writes into its workdir and reads back.

A workdir holds ``config.json`` (the resolved config, what a rerun is compared with),
``metrics.jsonl`` (one JSON row per evaluation), ``partition.npz`` and ``partition.png`` (who holds
which examples), TensorBoard event files beside them, and ``checkpoints/``
(:mod:`drt_jax.checkpoint`). JSONL files -- a run's metrics, a sweep's rows -- are read by
:func:`read_jsonl` and appended to by :func:`append_jsonl` alone, whoever writes them.
"""

import json
import math
import os

import ml_collections
import numpy as np
from absl import logging

from drt_jax import partition


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


def write_jsonl(path: str, rows) -> None:
  """Replaces ``path`` with ``rows``, atomically (readers see the old file or the new one)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(json_safe(row)) + "\n" for row in rows)
  os.replace(tmp, path)


def check_workdir(workdir, c: ml_collections.ConfigDict, overwrite: bool = False) -> bool:
  """Refuses a workdir that holds a run of a different config, unless ``overwrite``.

  A workdir with the same config (a rerun) is accepted: it resumes from its latest checkpoint if
  it has one (:mod:`drt_jax.checkpoint`), else its files are replaced. Returns whether the workdir
  holds a run of the same config (False with ``overwrite``, which starts afresh).
  """
  path = os.path.join(workdir, "config.json") if workdir else None
  if overwrite or not path or not os.path.exists(path):
    return False
  with open(path) as f:
    try:
      old = json.load(f)
    except json.JSONDecodeError:
      old = {}
  new = json.loads(c.to_json())
  if old != new:
    flat_old, flat_new = _flatten(old), _flatten(new)
    field = next(k for k in sorted(set(flat_old) | set(flat_new))
                 if flat_old.get(k, "<absent>") != flat_new.get(k, "<absent>"))
    was, now = flat_old.get(field, "<absent>"), flat_new.get(field, "<absent>")
    raise ValueError(f"workdir {workdir} holds a run of a different config ({field}: {was!r} "
                     f"there, {now!r} now); use another workdir or overwrite (overwrite=True, "
                     "--overwrite)")
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


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
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
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json(indent=2, sort_keys=True))
    if prepared is not None:
      partition.save(prepared.parts, os.path.join(workdir, "partition.npz"))
      hist = partition.label_histogram(prepared.parts, prepared.data.train_labels,
                                       prepared.data.classes)
      partition.plot_histogram(hist, os.path.join(workdir, "partition.png"),
                               f"{prepared.data.name}: {c.partition} partition over "
                               f"K={c.num_agents} agents")
    self.path = os.path.join(workdir, "metrics.jsonl")
    write_jsonl(self.path, rows or ())
    if tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 -- only runs with a workdir need it

      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, row: dict) -> None:
    """Appends an evaluation row to ``metrics.jsonl`` and its scalars to TensorBoard."""
    if self.path:
      append_jsonl(self.path, row, sync=False)
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
