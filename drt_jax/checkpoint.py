"""Checkpoints of the whole training state with orbax, and what a resumed run needs.

Checkpoints and faults
----------------------
With ``config.checkpoint_every = N`` (and a workdir) the trainer saves the whole
:class:`drt_jax.train.TrainState` -- stacked parameters, BatchNorm statistics, optimizer and
algorithm state, the sampling key and the step -- every N steps and at the last step into
``<workdir>/checkpoints/<step>/``, keeping the latest ``config.keep_checkpoints``. Orbax writes
each checkpoint into a temporary folder and renames it when complete, so a run killed at any
moment leaves only whole checkpoints. Next to the arrays each checkpoint holds a small JSON record
of the host side: the per-step training metrics since the last evaluation (so the next row of
``metrics.jsonl`` averages the same steps) and the elapsed wall time.

The state and the step suffice: the batches are a pure function of (sampling key, step)
(:func:`drt_jax.data.sample_indices`), the topology and the fault patterns
(:mod:`drt_jax.faults`) pure functions of the config and the step. So
``train_and_evaluate(config, workdir)`` on a workdir that holds a checkpoint of the same config
restores the newest good one and continues: on the same machine and platform (CPU is
deterministic; GPU reductions may not be) the resumed run ends bit for bit where an uninterrupted
run ends, and ``metrics.jsonl`` keeps the rows up to the checkpoint's step and continues from
there (no gap, no duplicate). A workdir of another config is refused unless ``overwrite``, which
starts afresh and deletes the old checkpoints.

A run that produces a non-finite loss or parameters stops with a one-line ``FloatingPointError``
naming the step and the agents, before the next checkpoint, so the latest checkpoint on disk is
always a finite state. Checkpoints are read only from the workdir given; arrays are restored by
orbax from their tensorstore files, the host record from JSON -- nothing is unpickled.

Typed PRNG keys are saved as their raw ``key_data`` and rebuilt with the template's
implementation; restored arrays take the template's shardings (the ``shard`` back-end gets its
agents split over the mesh again).

Damaged checkpoints
-------------------
A checkpoint is trusted only after it restores and verifies: its host record holds sha256 digests
of the arrays (leaves in the order of their names, with names, dtypes and shapes) and of the record
itself, taken at save time and compared after every restore. A checkpoint that orbax cannot read
(emptied, truncated) or whose digests differ (bytes flipped) is skipped for the one before it, in
one warning line, and moved to ``<workdir>/checkpoints.damaged/`` (kept for inspection, never
deleted), so the run saves that step again. When none is good the run is refused with one line
naming the folder. The host record also keeps the run's resolved config and data digest (the
workdir's identity, so losing ``config.json`` loses nothing) and the evaluation rows up to its
step (so lost rows of ``metrics.jsonl`` come back).
"""

import contextlib
import hashlib
import json
import logging as py_logging
import os
import shutil
import sys
import time

import jax
import numpy as np
from absl import logging

from drt_jax import distributed

SUBDIR = "checkpoints"
DAMAGED = "checkpoints.damaged"  # beside SUBDIR: orbax reads every step name inside its own folder
CHECKSUM = "checksum"  # the host record's field of digests, taken off what restore returns
_HOST_FILE = ("host", "metadata")  # where orbax's JsonCheckpointHandler keeps the host record
_SETTLE_S = 0.5  # for the reads of a damaged checkpoint that orbax left in flight to end


def _ocp():
  """orbax.checkpoint, imported on first use: runs without checkpoints do not need it."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  return ocp


def directory(workdir: str) -> str:
  """Where the checkpoints of the run in ``workdir`` live."""
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_arrays(tree):
  """``tree`` with typed PRNG keys replaced by their raw ``uint32`` data (orbax stores arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_arrays(tree, template):
  """Inverse of :func:`to_arrays`: key data back to typed keys wherever ``template`` has a key."""
  return jax.tree.map(
      lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      tree, template)


def _abstract(template):
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(one, to_arrays(template))


class DamagedCheckpointError(ValueError):
  """A checkpoint whose arrays or host record differ from what was saved."""


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:limit]}"


def _name(key) -> str:
  for attr in ("name", "key", "idx"):  # NamedTuple field, dict key, sequence index
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _on_host(x) -> np.ndarray:
  """``x`` whole on this host; a collective when other processes hold parts of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def arrays_digest(tree) -> str:
  """sha256 of a tree of arrays: every leaf's name, dtype, shape and bytes, leaves sorted by name.

  By name, not tree order, so a tree restored as dicts (:func:`load`) digests like the
  NamedTuples it was saved from.
  """
  leaves = [("/".join(_name(k) for k in path), x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  h = hashlib.sha256()
  for name, x in sorted(leaves, key=lambda leaf: leaf[0]):
    a = np.ascontiguousarray(_on_host(x))
    h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _host_digest(record: dict) -> str:
  rest = {k: v for k, v in record.items() if k != CHECKSUM}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _verify(arrays, record: dict) -> None:
  """Raises DamagedCheckpointError unless ``arrays`` and ``record`` match the record's digests
  (a record without them, from before they were kept, passes)."""
  sums = record.get(CHECKSUM)
  if sums is None:
    return
  if not isinstance(sums, dict) or sums.get("host") != _host_digest(record):
    raise DamagedCheckpointError("its host record differs from the one saved (checksum)")
  if sums.get("arrays") != arrays_digest(arrays):
    raise DamagedCheckpointError("its arrays differ from those saved (checksum)")


class _NotOrbax(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet():
  """Reads of checkpoints that may be damaged, without orbax's own log lines about them nor the
  tracebacks of tensorstore's reads still in flight when orbax gave up ("Event loop is closed"):
  what is wrong is said once, in one line of ours."""
  quiet, hook, absl_logger = _NotOrbax(), sys.unraisablehook, py_logging.getLogger("absl")

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      hook(unraisable)

  absl_logger.addFilter(quiet)
  sys.unraisablehook = unraisablehook
  try:
    yield
  finally:
    sys.unraisablehook = hook
    absl_logger.removeFilter(quiet)


def _everyone(ok: bool) -> bool:
  """Whether ``ok`` on every process, so that all of them take the same checkpoint."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))


class Checkpoints:
  """The checkpoints of one workdir: save, find the newest good one, restore.

  ``config`` (the run's resolved config as JSON) goes into every checkpoint's host record.

  Example::

    ckpt = Checkpoints(workdir, keep=2)
    ckpt.save(step, state, {"wall_time": 12.5})
    state, host = ckpt.restore(template_state)      # the latest; shapes and shardings of template
    ckpt.close()
  """

  def __init__(self, workdir: str, keep: int = 2, config: dict | None = None):
    self.path = directory(workdir)
    self._identity = {} if config is None else {"config": config}
    options = _ocp().CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    with _quiet():  # it reads every checkpoint's metadata; restore_newest says what is damaged
      self._manager = _ocp().CheckpointManager(self.path, options=options)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, host: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays and typed keys) and a JSON-able ``host`` record,
    with the digests that :meth:`restore` verifies.

    Returns when the checkpoint is complete on disk. Raises OSError (one line naming the folder)
    when it cannot be written; the checkpoints before it stay whole.
    """
    arrays = to_arrays(state)
    record = json.loads(json.dumps({**(host or {}), **self._identity}))  # as restore reads it
    record[CHECKSUM] = {"arrays": arrays_digest(arrays), "host": _host_digest(record)}
    args = _ocp().args.Composite(state=_ocp().args.StandardSave(arrays),
                              host=_ocp().args.JsonSave(record))
    try:
      with _quiet():  # on failure, the one line below says it
        try:
          self._manager.save(int(step), args=args, force=True)
          self._manager.wait_until_finished()
        except Exception:
          time.sleep(_SETTLE_S)
          raise
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports a full disk as either
      raise OSError(f"could not save checkpoint {step} into {self.path} ({_first_line(e)}); free "
                    "space or make it writable and rerun: it resumes from the last checkpoint, "
                    "which is intact") from e

  def restore(self, template, step: int | None = None):
    """``(state, host)`` of checkpoint ``step`` (default the latest) in the shape of ``template``.

    Arrays come back with the template's shardings; typed keys with its key implementation.
    Raises FileNotFoundError when there is no checkpoint, DamagedCheckpointError when the
    restored arrays or record differ from those saved, and whatever orbax raises on a checkpoint
    it cannot read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.path}")
    args = _ocp().args.Composite(state=_ocp().args.StandardRestore(_abstract(template)),
                              host=_ocp().args.JsonRestore())
    error = None
    try:
      out = self._manager.restore(int(step), args=args)
    except Exception as e:  # noqa: BLE001 -- the other processes must hear of it before raising
      error = e
    if not _everyone(error is None):
      raise error or DamagedCheckpointError("another process could not read it")
    host = dict(out.host or {})
    _verify(out.state, host)
    host.pop(CHECKSUM, None)
    return from_arrays(out.state, template), host

  def restore_newest(self, template, steps: list[int]):
    """``(state, host, step)`` of the newest of ``steps`` that restores and verifies.

    Newer damaged ones are reported in one warning line and moved to ``<workdir>/
    checkpoints.damaged/`` (by process 0), so the run can save their steps again. Raises
    ValueError (one line naming the folder and the fix) when none is good, moving nothing.
    """
    damaged = []
    for step in sorted(steps, reverse=True):
      with _quiet():
        try:
          state, host = self.restore(template, step)
        except Exception as e:  # noqa: BLE001 -- any failure to read it back: damaged
          damaged.append((step, e if isinstance(e, DamagedCheckpointError) else _first_line(e)))
          time.sleep(_SETTLE_S)
          continue
      if damaged:
        where = distributed.on_main(lambda: self._set_aside([s for s, _ in damaged]))
        with _quiet():
          self._manager.reload()  # its steps changed under it
        logging.warning("checkpoint%s %s in %s %s damaged (%s); moved to %s, resuming from the "
                        "checkpoint of step %d", "s" if len(damaged) > 1 else "",
                        ", ".join(str(s) for s, _ in damaged),
                        self.path, "are" if len(damaged) > 1 else "is",
                        "; ".join(f"{s}: {why}" for s, why in damaged), where, step)
      return state, host, step
    newest, why = damaged[0]
    raise ValueError(f"no checkpoint in {self.path} can be restored ({len(damaged)} damaged; "
                     f"newest, {newest}: {why}); move that folder away to start afresh, or "
                     "overwrite=True (--overwrite), which deletes it")

  def _set_aside(self, steps: list[int]) -> str:
    target = os.path.join(os.path.dirname(self.path), DAMAGED)
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest, n = os.path.join(target, str(step)), 0
      while os.path.lexists(dest):  # the same step damaged before: keep both
        n += 1
        dest = os.path.join(target, f"{step}.{n}")
      os.replace(os.path.join(self.path, str(step)), dest)
    return target

  def close(self) -> None:
    self._manager.close()


def steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in ``workdir``, oldest first, damaged or not (orbax renames a
  checkpoint's folder to its step only once it is complete); [] without a folder."""
  if not workdir or not os.path.isdir(directory(workdir)):
    return []
  return sorted(int(name) for name in os.listdir(directory(workdir)) if name.isdigit())


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step in ``workdir``, or None (also without a folder)."""
  found = steps(workdir)
  return found[-1] if found else None


def stored_config(workdir: str) -> tuple[int, dict] | None:
  """``(step, config)`` of the newest checkpoint whose host record is whole and keeps the run's
  config; None if none does. Reads JSON alone (no arrays, no orbax), on any one process."""
  for step in reversed(steps(workdir)):
    try:
      with open(os.path.join(directory(workdir), str(step), *_HOST_FILE)) as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue
    sums = record.get(CHECKSUM) if isinstance(record, dict) else None
    if (isinstance(sums, dict) and sums.get("host") == _host_digest(record)
        and isinstance(record.get("config"), dict)):
      return step, record["config"]
  return None


def load(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """A checkpoint as stored, without a template: ``(arrays as numpy, host record)``.

  Typed keys stay raw ``uint32`` data and NamedTuples come back as dicts; for inspection and
  comparison of runs, also of runs saved by other devices or several processes (use
  :meth:`Checkpoints.restore` to continue training). Raises DamagedCheckpointError when the
  arrays or the record differ from those saved.
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory(workdir)}")
  ocp = _ocp()
  with _quiet():  # orbax warns that a read-only manager will not save
    manager = ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(
        create=False, read_only=True, enable_async_checkpointing=False), item_handlers={
            "state": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler()})
  try:
    # Onto one local device whatever devices (or processes) saved it.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          manager.item_metadata(int(step))["state"])
    out = manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()))
  finally:
    manager.close()
  host = dict(out.host or {})
  try:
    _verify(out.state, host)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(f"checkpoint {step} in {directory(workdir)} is damaged: {e}") \
        from None
  host.pop(CHECKSUM, None)
  return jax.tree.map(np.asarray, out.state), host


def delete(workdir: str) -> None:
  """Removes every checkpoint of ``workdir`` (a fresh start with ``overwrite``)."""
  shutil.rmtree(directory(workdir), ignore_errors=True)
