r"""Wall time per member of a sweep: S runs one after another against one vectorised program.

For each sweep size S (``--sizes``) it trains S members of one sweep (seeds 0..S-1, or with
``--learning_rates`` seeds x learning rates: member i has seed i // L and the (i mod L)-th rate)
of the default config's run (the model of ``--model``, K = ``--k`` agents, ``--steps`` steps,
an evaluation every ``--eval_every`` steps) on synthetic data already in memory, in two modes:

* ``sequential``: ``drt_jax.train.train_and_evaluate`` for each member, one after another in one
  process (the first run compiles the programs, the others reuse them);
* ``vectorised``: one ``drt_jax.vectorize.train_and_evaluate_many`` call for all S members.

Each mode and size runs in a fresh process (fresh programs: nothing compiled by an earlier case,
the persistent compilation cache off as ``benchmarks.common.start`` turns it off), and its time
runs from the first training call to the last history, so compilation, each run's set-up and the
evaluations count in both; the process start and the data's synthesis do not. The parent process
never starts a JAX backend (on a GPU it would hold the memory the cases need). Each row says S,
the mode, the total seconds, the seconds per member (total / S) and ``seq_over_vec``: the
sequential seconds per member over the vectorised ones at that S (> 1: vectorising wins).

Each case is appended to ``<out>.jsonl`` as soon as it finishes; the full result goes to ``--out``
(JSON) and a markdown table to stdout.

Commands (from the repository root):

  python -m benchmarks.sweeps                                  # cnn, K=16, S = 1, 4, 16
  python -m benchmarks.sweeps --smoke --out /tmp/sweeps.json   # CI: mlp, K=4, S = 1, 2 (< 90 s)
  JAX_PLATFORMS=cpu python -m benchmarks.sweeps --model mlp --sizes 1,4,16 --steps 200
  python -m benchmarks.sweeps --sizes 4,16 --learning_rates 0.05,0.1   # seeds x rates
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from benchmarks import common

MODES = ("sequential", "vectorised")
MODELS = ("cnn", "mlp", "resnet20")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT = "SWEEP_CASE "  # the prefix of a case's result line on its stdout


def members(size: int, learning_rates: list[float]) -> list[dict]:
  """The sweep's first ``size`` members: seeds, or seeds x learning rates."""
  if not learning_rates:
    return [{"seed": i} for i in range(size)]
  n = len(learning_rates)
  return [{"seed": i // n, "learning_rate": learning_rates[i % n]} for i in range(size)]


def base_config(s: dict) -> dict:
  """The default config's run with the benchmark's model, K, steps and evaluations."""
  return {"model": s["model"], "num_agents": s["k"], "batch_size": s["batch"],
          "num_steps": s["steps"], "eval_every": s["eval_every"], "dataset": "synthetic"}


# --------------------------------------------------------------------------------------------
# One case, in its own process.


def run_case(mode: str, size: int, s: dict) -> dict:
  """Trains the sweep's ``size`` members in ``mode``; the record of the case."""
  # The library is imported here, not at the top: the parent process must not start a backend.
  from drt_jax import data as data_lib
  from drt_jax import train, vectorize

  machine = common.start(1)  # the persistent compilation cache off; the backend started
  shape = {"resnet20": (32, 32, 3)}.get(s["model"], (28, 28, 1))
  d = data_lib.synthetic(num_train=max(4096, 4 * s["k"] * s["batch"]), num_test=1024,
                         shape=shape, seed=0)
  base, grid = base_config(s), members(size, s["learning_rates"])
  runs_s = []
  start = time.perf_counter()
  if mode == "sequential":
    histories = []
    for m in grid:
      t = time.perf_counter()
      histories.append(train.train_and_evaluate(vectorize.member_config(base, m), data=d,
                                                verbose=False))
      runs_s.append(time.perf_counter() - t)
    statuses = ["ok"] * size
  else:
    histories = vectorize.train_and_evaluate_many(base, grid, data=d, verbose=False)
    statuses = [h.status for h in histories]
  total = time.perf_counter() - start
  return {"S": size, "mode": mode, "status": "ok", "total_s": total, "per_member_s": total / size,
          "runs_s": runs_s or None, "members": grid, "member_status": statuses,
          "final_test_acc": [h[-1]["test_acc_mean"] if h else None for h in histories],
          "machine": machine}


def _case_in_process(mode: str, size: int, s: dict, timeout_s: float) -> dict:
  """:func:`run_case` in a fresh Python process; its log goes to this process's stderr."""
  args = [sys.executable, "-m", "benchmarks.sweeps", f"--case={mode}:{size}",
          f"--model={s['model']}", f"--k={s['k']}", f"--batch={s['batch']}",
          f"--steps={s['steps']}", f"--eval_every={s['eval_every']}",
          f"--learning_rates={','.join(map(str, s['learning_rates']))}"]
  failed = {"S": size, "mode": mode, "total_s": None, "per_member_s": None}
  try:
    proc = subprocess.run(args, cwd=_ROOT, stdout=subprocess.PIPE, text=True,
                          timeout=timeout_s or None, check=False)
  except subprocess.TimeoutExpired:
    return {**failed, "status": f"cut at {timeout_s:g} s"}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
  if proc.returncode != 0 or not lines:
    return {**failed, "status": f"failed (exit status {proc.returncode})"}
  return json.loads(lines[-1][len(_RESULT):])


# --------------------------------------------------------------------------------------------
# The sweep of cases.


def run(s: dict, sink: common.Sink, timeout_s: float) -> tuple[dict | None, list]:
  """Every size in both modes; (the machine of the first case that ran, the rows)."""
  machine, rows = None, []
  for size in s["sizes"]:
    by_mode = {}
    for mode in MODES:
      logging.info("S=%d %s: %s, K=%d, %d steps", size, mode, s["model"], s["k"], s["steps"])
      row = _case_in_process(mode, size, s, timeout_s)
      case_machine = row.pop("machine", None)
      if machine is None and case_machine is not None:
        machine = case_machine
        sink.write({"machine": machine, "settings": s})
      sink.write(row)
      logging.info("S=%d %s: %s, %s s per member", size, mode, row["status"],
                   common.fmt(row["per_member_s"], ".2f"))
      rows.append(row)
      by_mode[mode] = row
    seq, vec = by_mode["sequential"]["per_member_s"], by_mode["vectorised"]["per_member_s"]
    for row in by_mode.values():
      row["seq_over_vec"] = seq / vec if seq and vec else None
  return machine, rows


def table(machine: dict | None, s: dict, rows: list) -> str:
  where = ("no case ran" if machine is None else
           f"{machine['platform']}, {machine['device_kind']}, {machine['local_device_count']} "
           f"device(s), {machine['cpu_count']} CPUs, jax {machine['jax']}")
  grid = "seeds x learning rates" if s["learning_rates"] else "seeds"
  lines = [f"Sweep of S members ({grid}), sequential vs vectorised: {s['model']}, K = {s['k']}, "
           f"{s['steps']} steps, eval every {s['eval_every']}, compile included ({where})", "",
           "| S | mode | total s | s / member | seq / vec per member | status |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['S']} | {r['mode']} | {common.fmt(r['total_s'], '.1f')} | "
                 f"{common.fmt(r['per_member_s'], '.2f')} | "
                 f"{common.fmt(r['seq_over_vec'], '.2f')} | {r['status']} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("model", "cnn", "Model: cnn, mlp or resnet20.")
  flags.DEFINE_integer("k", 16, "Number of agents K.")
  flags.DEFINE_integer("batch", 32, "Images per agent per step.")
  flags.DEFINE_list("sizes", ["1", "4", "16"], "Sweep sizes S (members per case).")
  flags.DEFINE_integer("steps", 200, "Train steps of each member.")
  flags.DEFINE_integer("eval_every", 50, "Evaluate every N steps (and at step 0 and the end).")
  flags.DEFINE_list("learning_rates", [], "If given, members are seeds x these learning rates.")
  flags.DEFINE_float("case_timeout_s", 0, "Stop a case (one mode, one S) after this many "
                     "seconds (0: never).")
  flags.DEFINE_string("out", "sweeps.json", "JSON result; per-case lines go to <out>.jsonl.")
  flags.DEFINE_bool("smoke", False, "Tiny run for CI: mlp, K=4, batch 8, S = 1, 2, 6 steps.")
  flags.DEFINE_string("case", None, "Internal: run one case, 'mode:S', and print its record.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    learning_rates = [float(x) for x in f.learning_rates]
  except ValueError:
    raise app.UsageError(f"--learning_rates={','.join(f.learning_rates)}: expected numbers, "
                         "e.g. --learning_rates=0.05,0.1") from None
  s = {"model": f.model, "k": f.k, "batch": f.batch, "sizes": common.ints("sizes", f.sizes),
       "steps": f.steps, "eval_every": f.eval_every, "learning_rates": learning_rates}
  if f.smoke:
    s.update(model="mlp", k=4, batch=8, sizes=[1, 2], steps=6, eval_every=3)
  if s["model"] not in MODELS:
    raise app.UsageError(f"--model: unknown {s['model']!r}; expected one of {', '.join(MODELS)}")
  if not s["sizes"] or min(s["sizes"]) < 1:
    raise app.UsageError(f"--sizes={','.join(map(str, s['sizes']))}: expected sizes >= 1")
  if f.case is not None:
    mode, _, size = f.case.partition(":")
    if mode not in MODES or not size.isdigit() or int(size) < 1:
      raise app.UsageError(f"--case={f.case}: expected 'mode:S' with mode one of "
                           f"{', '.join(MODES)}")
    print(_RESULT + json.dumps(run_case(mode, int(size), s)), flush=True)
    return
  common.check_out(f.out)
  sink = common.Sink(f.out)
  machine, rows = run(s, sink, f.case_timeout_s)
  text = table(machine, s, rows)
  print(text)
  common.write_result(f.out, {"machine": machine, "settings": s, "argv": sys.argv, "rows": rows,
                              "table": text})
  logging.info("wrote %s and %s", f.out, sink.path)
  bad = [r for r in rows if r["status"] != "ok"]
  if bad:
    sys.exit(f"error: {len(bad)} case(s) did not finish, first S={bad[0]['S']} "
             f"{bad[0]['mode']}: {bad[0]['status']}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
