"""Several processes (hosts) as one JAX system: joining it, agreeing, and who writes.

JAX runs one Python process per host (or per GPU); ``jax.distributed.initialize`` joins them into
one system whose ``jax.devices()`` are every process's devices. The agents mesh
(:func:`drt_jax.backends.agents_mesh`) then spans all of them: each process computes only the
agents of its own devices and holds only their training examples
(:func:`drt_jax.train.device_data`), and the combine's collectives cross hosts.

:func:`initialize` takes the coordinator address (``host:port`` of process 0, which serves it),
the process count and this process's id from its arguments or from ``DRT_JAX_COORDINATOR``,
``DRT_JAX_NUM_PROCESSES`` and ``DRT_JAX_PROCESS_ID``; ``coordinator_address='auto'`` leaves them
to JAX's own detection (Cloud TPU, Slurm, Open MPI). On CPU it selects gloo collectives, so that
CPU processes can exchange arrays at all. Joining is bounded: a coordinator that cannot be reached,
or processes that do not all arrive, end this process within ``timeout_s`` with one line naming
the address (XLA would otherwise abort it with a stack dump, after its own longer deadline).

After that, :func:`check_agreement` makes every process fail with one line when the processes
hold different configs or data, :func:`on_main` runs a decision on process 0 alone and hands its
result (or its error) to all, and :func:`is_main` says which process writes files.
"""

import hashlib
import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

ENV_COORDINATOR = "DRT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DRT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DRT_JAX_PROCESS_ID"
AUTO = "auto"
_EXIT_CODE = 1
_MESSAGE_BYTES = 2048


def _int_from(value, env: str, name: str) -> int | None:
  if value is None:
    value = os.environ.get(env) or None
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer; pass --{name} or {env}") from None


def _host_port(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port (e.g. 10.0.0.2:1234); "
                     f"pass --coordinator_address or {ENV_COORDINATOR}")
  return host.strip("[]"), int(port)


def _wait_for(address: str, deadline: float) -> bool:
  """Whether a TCP connection to ``address`` opens before ``deadline`` (retried meanwhile)."""
  host, port = _host_port(address)
  while True:
    try:
      wait = max(0.1, min(2.0, deadline - time.time()))
      with socket.create_connection((host, port), timeout=wait):
        return True
    except OSError:
      if time.time() >= deadline:
        return False
      time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float = 300.0) -> bool:
  """Joins this process to a multi-process run; returns whether it did.

  Arguments left None come from ``DRT_JAX_COORDINATOR``, ``DRT_JAX_NUM_PROCESSES`` and
  ``DRT_JAX_PROCESS_ID``. With none of them given (or one process) this is a single-process run
  and nothing happens. ``coordinator_address='auto'`` asks JAX to detect all three (Cloud TPU
  pod slices, Slurm, Open MPI). Must run before JAX's first operation.

  Raises:
    ValueError: an incomplete or malformed set of arguments (one line naming the fix).
    ConnectionError: process ``process_id > 0`` could not reach the coordinator within
      ``timeout_s``, or JAX refused the join (port taken, ids clashing); the one line names the
      address.
  If the coordinator is reached but not every process arrives within ``timeout_s``, the process
  prints one line naming the address and exits with status 1 (JAX offers no way to abandon a join
  and carry on).
  """
  address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  n = _int_from(num_processes, ENV_NUM_PROCESSES, "num_processes")
  pid = _int_from(process_id, ENV_PROCESS_ID, "process_id")
  if address is None and n is None and pid is None:
    return False
  if address == AUTO:
    kw, where = {}, "the coordinator JAX detected from the cluster's environment"
  else:
    missing = [name for name, v in (("coordinator_address", address), ("num_processes", n),
                                    ("process_id", pid)) if v is None]
    if missing:
      raise ValueError(f"a multi-process run needs coordinator_address, num_processes and "
                       f"process_id; {', '.join(missing)} missing (flags --{missing[0]} or "
                       "DRT_JAX_* environment variables), or coordinator_address='auto' on a "
                       "TPU pod slice or Slurm")
    if n < 1:
      raise ValueError(f"num_processes={n} must be >= 1")
    if not 0 <= pid < n:
      raise ValueError(f"process_id={pid} with num_processes={n}: ids run from 0 to "
                       f"num_processes - 1")
    if n == 1:
      return False
    _host_port(address)
    kw, where = ({"coordinator_address": address, "num_processes": n, "process_id": pid},
                 f"the coordinator at {address}")
  if jax.distributed.is_initialized():
    return True
  # CPU processes exchange arrays only through a collectives library; GPUs and TPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  deadline = time.time() + timeout_s
  if address not in (None, AUTO) and pid > 0 and not _wait_for(address, deadline):
    raise ConnectionError(f"process {pid} could not reach {where} within {timeout_s:g}s; start "
                          "process 0 there (it serves the coordinator) or fix "
                          f"--coordinator_address / {ENV_COORDINATOR}")

  def give_up():
    me = "this process" if pid is None else f"this is process {pid}"
    print(f"error: not every process joined {where} within {timeout_s:g}s ({me}); start all "
          f"{n or 'the'} processes with the same coordinator address and "
          "process count, each with its own process id", file=sys.stderr, flush=True)
    os._exit(_EXIT_CODE)  # noqa: SLF001 -- the join cannot be abandoned from Python

  left = max(1.0, deadline - time.time())
  watchdog = threading.Timer(left, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # XLA's own deadline comes later, so the watchdog's one line is what a user sees.
    jax.distributed.initialize(**kw, initialization_timeout=int(left) + 30)
  except RuntimeError as e:  # e.g. the port is taken, or two processes share an id
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = (" (initialize must run before JAX's first operation)"
            if "before" in first or "already" in first else "")
    raise ConnectionError(f"joining {where} failed: {first}{hint}") from None
  finally:
    watchdog.cancel()
  return True


def is_main() -> bool:
  """Whether this process writes the run's files (process 0; True in a single-process run)."""
  return jax.process_index() == 0


def _digest(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)


def check_agreement(values: dict[str, str], fix: str) -> None:
  """Raises ValueError on every process unless every process passed equal ``values``.

  ``values`` maps a name (``config``) to its text on this process; only digests travel. The one
  line names the first value that differs, the processes that differ from process 0, and ``fix``.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # noqa: PLC0415

  mine = np.stack([_digest(v) for v in values.values()])[None]  # [1, V, 2]
  everyone = np.asarray(multihost_utils.process_allgather(mine, tiled=True))  # [P, V, 2]
  for i, name in enumerate(values):
    differ = [p for p in range(len(everyone)) if not np.array_equal(everyone[p, i], everyone[0, i])]
    if differ:
      raise ValueError(f"processes {differ} hold a different {name} than process 0; {fix}")


def on_main(fn):
  """``fn()`` run on process 0 alone; every process returns its JSON-able result.

  An exception that ``fn`` raises on process 0 is raised on every process as a ValueError with
  its message (first line), so a refusal or a failure never leaves the other processes waiting.
  In a single-process run: ``fn()``.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # noqa: PLC0415

  buf = np.zeros(_MESSAGE_BYTES, np.uint8)
  if is_main():
    try:
      text = json.dumps({"ok": fn()}).encode()
      if len(text) > _MESSAGE_BYTES:
        raise ValueError(f"on_main: {getattr(fn, '__name__', fn)} returned more than "
                         f"{_MESSAGE_BYTES} bytes of JSON; return less")
    except Exception as e:  # noqa: BLE001 -- every failure must reach the other processes
      message = (str(e).strip().splitlines() or [type(e).__name__])[0]
      if not isinstance(e, ValueError):
        message = f"{type(e).__name__}: {message}"
      text = json.dumps({"error": message[:_MESSAGE_BYTES // 2]}).encode()
    buf[:len(text)] = np.frombuffer(text, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  out = json.loads(bytes(buf).rstrip(b"\0").decode())
  if "error" in out:
    raise ValueError(out["error"])
  return out["ok"]

