"""What the lab's benchmarks share: start-up, the machine record, timing, the JSON-lines sink.

Every benchmark starts with :func:`start` (virtual host devices before JAX starts its backends,
the persistent compilation cache off: compile time is a measurement), records :func:`machine`
beside its results, and appends one JSON line per finished case to ``<out>.jsonl`` through a
:class:`Sink`, so a run cut short keeps what it measured.
"""

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import optax
from absl import app, logging

from drt_jax import backends

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MIN_TIMED_STEPS = 2


def _set_host_devices(n: int) -> None:
  """Asks XLA for n CPU devices; only works before JAX initialises its backends."""
  flags_now = re.sub(_DEVICE_COUNT_FLAG + r"=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_now.strip()} {_DEVICE_COUNT_FLAG}={n}".strip()


def start(host_devices: int) -> dict:
  """Sets up the process for measuring and returns its :func:`machine` record.

  ``host_devices`` > 1 makes that many virtual CPU devices (``XLA_FLAGS``), so ``shard`` runs on
  a CPU; that takes effect only before JAX starts its backends, which this checks.
  """
  if host_devices > 1:
    _set_host_devices(host_devices)
    backends.patient_cpu_collectives()
  jax.config.update("jax_enable_compilation_cache", False)  # compile time is a measurement
  if (host_devices > 1 and jax.default_backend() == "cpu"
      and jax.local_device_count() != host_devices):
    raise RuntimeError(f"--host_devices={host_devices} did not take effect (JAX sees "
                       f"{jax.local_device_count()} devices): a backend started before main")
  record = machine()
  logging.info("machine: %s", record)
  if hint := backends.host_memory_hint():
    logging.info(hint)
  return record


def machine() -> dict:
  """Where and with what the numbers were measured."""
  dev = jax.devices()[0]
  return {
      "host": platform.node(), "platform": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None), "optax": optax.__version__,
      "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


# --------------------------------------------------------------------------------------------
# Timing.


def xla_bytes(compiled) -> int | None:
  """XLA's memory estimate of a compiled program: arguments + outputs - aliased + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every platform implements it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def peak_mb() -> float | None:
  """The first local device's peak MiB in use so far (None where unsupported, as on CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def median_ms(call, reps: int) -> float:
  """Median wall ms of ``reps`` calls of ``call()`` (each waited for), after one untimed."""
  jax.block_until_ready(call())
  times = []
  for _ in range(reps):
    start_s = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start_s)
  return 1e3 * statistics.median(times)


def time_steps(step, state, warmup: int, steps: int, budget_s: float):
  """Runs ``state, loss = step(state)`` ``warmup`` untimed then up to ``steps`` timed times,
  stopping once the timed steps exceed ``budget_s`` (0: never; at least
  :data:`MIN_TIMED_STEPS`). Returns (seconds per timed step, the last loss, the last state)."""
  loss = None
  for _ in range(warmup):
    state, loss = jax.block_until_ready(step(state))
  times = []
  while len(times) < steps:
    start_s = time.perf_counter()
    state, loss = jax.block_until_ready(step(state))
    times.append(time.perf_counter() - start_s)
    if budget_s and sum(times) > budget_s and len(times) >= MIN_TIMED_STEPS:
      break
  return times, loss, state


class Compiled(NamedTuple):
  lowered: Any
  compiled: Any
  seconds: float  # compile time
  xla_bytes: int | None  # XLA's memory estimate (:func:`xla_bytes`)


def compile_timed(jitted, *args) -> Compiled:
  """``jitted`` lowered and compiled at ``args``, timed, with XLA's memory estimate."""
  start_s = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds, estimate = time.perf_counter() - start_s, xla_bytes(compiled)
  # Logged now: a case cut short later (by its time limit, or out of memory) still says these.
  logging.info("  compiled in %.1f s; XLA's memory estimate %s MB", seconds,
               "–" if estimate is None else f"{estimate / 2**20:.0f}")
  return Compiled(lowered, compiled, seconds, estimate)


# --------------------------------------------------------------------------------------------
# Output.


class Sink:
  """Appends one JSON line per finished case to ``<out>.jsonl`` and flushes it to disk."""

  def __init__(self, out: str):
    self.path = os.path.splitext(out)[0] + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    open(self.path, "w").close()

  def write(self, record: dict):
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


def check_out(out: str) -> None:
  """Refuses an ``--out`` that is a folder, before anything is measured."""
  if os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a folder; give the JSON file to write")


def write_result(out: str, result: dict) -> None:
  """The whole result as one JSON file (the per-case lines are in the sink's file)."""
  with open(out, "w") as f:
    json.dump(result, f, indent=2)


def ints(name: str, values) -> list[int]:
  """A list flag's values as integers, or one line naming the flag."""
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected integers, e.g. "
                         f"--{name}=16,64") from None


def fmt(x, spec):
  return "–" if x is None else format(x, spec)


def run(main):
  """``absl.app.run(main)`` that ends on bad input (a usage error, a ValueError, a path it cannot
  read or write) with one line, not a traceback or the help text."""

  def guarded(argv):
    try:
      main(argv)
    except (ValueError, app.UsageError, OSError) as e:
      text = str(e).strip().splitlines()
      sys.exit(f"error: {text[0] if text else type(e).__name__}")

  app.run(guarded)
