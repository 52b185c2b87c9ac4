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
restores the latest one and continues: on the same machine and platform (CPU is deterministic;
GPU reductions may not be) the resumed run ends bit for bit where an uninterrupted run ends, and
``metrics.jsonl`` keeps the rows up to the checkpoint's step and continues from there (no gap, no
duplicate). A workdir of another config is refused unless
``overwrite``, which starts afresh and deletes the old checkpoints.

A run that produces a non-finite loss or parameters stops with a one-line ``FloatingPointError``
naming the step and the agents, before the next checkpoint, so the latest checkpoint on disk is
always a finite state. Checkpoints are read only from the workdir given; arrays are restored by
orbax from their tensorstore files, the host record from JSON -- nothing is unpickled.

Typed PRNG keys are saved as their raw ``key_data`` and rebuilt with the template's
implementation; restored arrays take the template's shardings (the ``shard`` back-end gets its
agents split over the mesh again).
"""

import os
import shutil

import jax
import numpy as np

SUBDIR = "checkpoints"


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


class Checkpoints:
  """The checkpoints of one workdir: save, find the latest, restore.

  Example::

    ckpt = Checkpoints(workdir, keep=2)
    ckpt.save(step, state, {"wall_time": 12.5})
    state, host = ckpt.restore(template_state)      # the latest; shapes and shardings of template
    ckpt.close()
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.path = directory(workdir)
    options = _ocp().CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = _ocp().CheckpointManager(self.path, options=options)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, host: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays and typed keys) and a JSON-able ``host`` record.

    Returns when the checkpoint is complete on disk.
    """
    args = _ocp().args.Composite(state=_ocp().args.StandardSave(to_arrays(state)),
                              host=_ocp().args.JsonSave(dict(host or {})))
    self._manager.save(int(step), args=args, force=True)
    self._manager.wait_until_finished()

  def restore(self, template, step: int | None = None):
    """``(state, host)`` of checkpoint ``step`` (default the latest) in the shape of ``template``.

    Arrays come back with the template's shardings; typed keys with its key implementation.
    Raises FileNotFoundError when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.path}")
    args = _ocp().args.Composite(state=_ocp().args.StandardRestore(_abstract(template)),
                              host=_ocp().args.JsonRestore())
    out = self._manager.restore(int(step), args=args)
    return from_arrays(out.state, template), dict(out.host or {})

  def close(self) -> None:
    self._manager.close()


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step in ``workdir``, or None (also without a folder)."""
  if not workdir or not os.path.isdir(directory(workdir)):
    return None
  steps = [int(name) for name in os.listdir(directory(workdir)) if name.isdigit()]
  return max(steps) if steps else None


def load(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """A checkpoint as stored, without a template: ``(arrays as numpy, host record)``.

  Typed keys stay raw ``uint32`` data and NamedTuples come back as dicts; for inspection and
  comparison of runs, also of runs saved by other devices or several processes (use
  :meth:`Checkpoints.restore` to continue training).
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory(workdir)}")
  ocp = _ocp()
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
  return jax.tree.map(np.asarray, out.state), dict(out.host or {})


def delete(workdir: str) -> None:
  """Removes every checkpoint of ``workdir`` (a fresh start with ``overwrite``)."""
  shutil.rmtree(directory(workdir), ignore_errors=True)
