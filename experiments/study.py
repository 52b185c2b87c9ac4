r"""The study of docs/results.md: DRT diffusion against its baselines, K = 16, non-IID, offline.

Setting: ``experiments/configs/fashion_mnist.py`` (Fashion-MNIST, 10 % validation split, Dirichlet
alpha = 0.3 over 16 agents, a 0.30M-parameter CNN, SGD with momentum, batch 32, 1,050 steps = about
10 local epochs). Stages, each a resumable sweep (rerun the same command to continue; finished runs
are skipped):

  tune    the same search for every method, on the validation split, seed 0, 3 local epochs
          (315 steps): learning rate in TUNE_LEARNING_RATES for each method on its tuning graph,
          then, at its best rate, DRT strength in TUNE_STRENGTHS for drt and drt_symmetric
          (drt_normalized has no strength). Selection: the highest final mean validation accuracy.
  final   the 12 configurations -- {atc, drt, drt_symmetric, drt_normalized, dsgd} x {ring,
          torus}, local, ATC on the full graph -- with their tuned hyperparameters, seeds SEEDS,
          10 local epochs; then ATC on each graph with matched mixing: every agent's self-weight
          set to the mean self-weight the DRT runs on that graph had (averaged over evaluations
          and seeds), so a DRT win cannot be just "more mixing".
  report  tables (mean +- std over seeds) and figures under --out.

  python experiments/study.py --stage=tune   --out=docs/results/fashion_mnist
  python experiments/study.py --stage=final  --out=docs/results/fashion_mnist
  python experiments/study.py --stage=report --out=docs/results/fashion_mnist

``--smoke`` runs the same stages on a tiny variant (CI). ``--dataset=mnist`` studies MNIST.
"""

import json
import os

import numpy as np
from absl import flags, logging

from drt_jax import workdir as workdir_lib
from experiments import common, sweep
from experiments import plot as plot_lib


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_enum("stage", "tune", ["tune", "final", "report"], "Which stage to run.")
  flags.DEFINE_string("out", "docs/results/fashion_mnist", "Folder of the sweep files.")
  flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "mnist"], "Data.")
  flags.DEFINE_bool("smoke", False, "A tiny version of every stage (seconds).")
  flags.DEFINE_integer("host_devices", 8, "Virtual CPU devices ('shard').")


TUNE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3)
TUNE_STRENGTHS = (0.5, 1.0, 2.0, 4.0)
TUNE_STEPS = 315  # 3 local epochs
SEEDS = (0, 1, 2)
DIFFUSION = ("atc", "drt", "drt_symmetric", "drt_normalized", "dsgd")
GRAPHS = ("ring", "torus")
DRT_WITH_STRENGTH = ("drt", "drt_symmetric")

# Method -> the overrides that define it; graph-dependent methods are tuned on the ring.
METHODS = {
    **{f"{a}/{g}": {"algorithm": a, "topology": g} for a in DIFFUSION for g in GRAPHS},
    "local": {"algorithm": "local", "topology": "ring"},
    "atc/full": {"algorithm": "atc", "topology": "full"},
}


def tuned_as(method: str) -> str:
  """The method whose tuning a method uses: torus runs take their ring twin's settings."""
  return method.replace("/torus", "/ring")


def base_config(dataset: str, smoke: bool):
  config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                             f"{dataset}.py")
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("study_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  library, _ = common.split(module.get_config("smoke" if smoke else None))
  return library


def _score(row) -> float:
  return row["final"].get("val_acc_mean") or 0.0


def _best(rows, method, field):
  """The value of ``field`` in the best-scoring tuning run of ``method`` (ties: first listed)."""
  mine = [r for r in rows if r.get("status") == "ok" and r["overrides"].get("method") == method]
  if not mine:
    return None
  return max(mine, key=_score)["overrides"][field]


def tune(base, out: str, smoke: bool):
  steps = 4 if smoke else TUNE_STEPS
  base = {**base, "num_steps": steps, "eval_every": steps, "seed": 0}
  tune_methods = [m for m in METHODS if tuned_as(m) == m]
  path = os.path.join(out, "tune.jsonl")
  lr_points = [{**METHODS[m], "method": m, "learning_rate": lr}
               for m in tune_methods for lr in TUNE_LEARNING_RATES]
  rows = sweep.run(base, _strip_points(lr_points), path)
  rows = _with_method(rows, lr_points)
  strength_points = []
  for m in tune_methods:
    if METHODS[m]["algorithm"] in DRT_WITH_STRENGTH:
      lr = _best(rows, m, "learning_rate")
      strength_points += [{**METHODS[m], "method": m, "learning_rate": lr, "drt.strength": s}
                          for s in TUNE_STRENGTHS if s != 1.0]
  rows += _with_method(sweep.run(base, _strip_points(strength_points), path),
                       strength_points)
  return rows


def _strip_points(points):
  """Sweep points without the bookkeeping field ``method`` (not a config field)."""
  return [{k: v for k, v in p.items() if k != "method"} for p in points]


def _with_method(rows, points):
  keyed = {sweep.run_key({k: v for k, v in p.items() if k != "method"}): p["method"]
           for p in points}
  for r in rows:
    if r["key"] in keyed:
      r["overrides"] = {**r["overrides"], "method": keyed[r["key"]]}
  return rows


def tuned_settings(tune_rows) -> dict:
  """Method -> its tuned overrides (learning rate and, for DRT, strength)."""
  settings = {}
  for m in METHODS:
    t = tuned_as(m)
    lr = _best([r for r in tune_rows if "drt.strength" not in r["overrides"]], t,
               "learning_rate")
    if lr is None:
      raise ValueError(f"no finished tuning run for {t}; run --stage=tune first")
    chosen = {"learning_rate": lr}
    if METHODS[m]["algorithm"] in DRT_WITH_STRENGTH:
      candidates = [r for r in tune_rows if r["overrides"].get("method") == t
                    and r["overrides"].get("learning_rate") == lr]
      best = max(candidates, key=_score)
      chosen["drt.strength"] = best["overrides"].get("drt.strength", 1.0)
    settings[m] = chosen
  return settings


def final(base, out: str, smoke: bool):
  tune_rows = _tune_rows(out)
  settings = tuned_settings(tune_rows)
  seeds = SEEDS[:2] if smoke else SEEDS
  path = os.path.join(out, "final.jsonl")
  # DRT first, then the ATC baselines matched to its mixing (they need its self-weights, and
  # they decide the fairness question), then the rest.
  first = [f"drt/{g}" for g in GRAPHS]
  order = first + sorted(m for m in METHODS if m not in first)
  points = [{**METHODS[m], **settings[m], "seed": s, "method": m} for m in order for s in seeds]
  drt_points = [p for p in points if p["method"] in first]
  rows = _with_method(sweep.run(base, _strip_points(drt_points), path), drt_points)
  matched = []
  for g in GRAPHS:
    drt_rows = [r for r in rows if r["overrides"].get("method") == f"drt/{g}"
                and r.get("status") == "ok"]
    if not drt_rows:
      continue
    s = float(np.mean([h["self_weight_mean"] for r in drt_rows for h in r["history"][1:]]))
    s = round(s, 3)
    logging.info("matched mixing on the %s: self-weight %.3f", g, s)
    matched += [{**METHODS[f"atc/{g}"], **settings[f"atc/{g}"], "self_weight": s, "seed": seed,
                 "method": f"atc_matched/{g}"} for seed in seeds]
  rows += _with_method(sweep.run(base, _strip_points(matched), path), matched)
  rest = [p for p in points if p["method"] not in first]
  rows += _with_method(sweep.run(base, _strip_points(rest), path), rest)
  return rows


def _tune_rows(out, status="ok"):
  rows = workdir_lib.read_jsonl(os.path.join(out, "tune.jsonl"))
  for r in rows:  # the method a tuning row belongs to, recovered from its overrides
    o = r["overrides"]
    for m, defn in METHODS.items():
      if tuned_as(m) == m and all(o.get(k) == v for k, v in defn.items()):
        r["overrides"] = {**o, "method": m}
  return [r for r in rows if r.get("status") == status]


def _final_rows(out):
  rows = [r for r in workdir_lib.read_jsonl(os.path.join(out, "final.jsonl"))
          if r.get("status") == "ok"]
  for r in rows:
    o = r["overrides"]
    if o.get("self_weight"):
      r["overrides"] = {**o, "method": f"atc_matched/{o['topology']}"}
      continue
    for m, defn in METHODS.items():
      if all(o.get(k) == v for k, v in defn.items()):
        r["overrides"] = {**o, "method": m}
  return rows


def report(out: str) -> str:
  """Writes tables.md and figures under ``out``; returns the markdown."""
  parts = []
  tune_rows = _tune_rows(out)
  if tune_rows:
    lines = ["| method | learning rate | DRT strength | final val acc | final test acc | "
             "mean self-weight |", "|---|---|---|---|---|---|"]
    shown = tune_rows + _tune_rows(out, status="diverged")
    order = sorted(shown, key=lambda r: (list(METHODS).index(r["overrides"]["method"]),
                                         r["overrides"].get("drt.strength", 1.0),
                                         r["overrides"]["learning_rate"]))
    for r in order:
      o = r["overrides"]
      head = f"| {o['method']} | {o['learning_rate']} | {o.get('drt.strength', '–')} | "
      if r["status"] != "ok":
        lines.append(head + "diverged | – | – |")
        continue
      f = r["final"]
      sw = f.get("self_weight_mean")
      lines.append(head + f"{_score(r):.4f} | {f['test_acc_mean']:.4f} | "
                   f"{'–' if sw is None else format(sw, '.3f')} |")
    parts.append("### Tuning (validation split, seed 0, 3 local epochs)\n\n" + "\n".join(lines))
    settings = tuned_settings(tune_rows)
    parts.append("### Chosen\n\n" + "\n".join(f"- {m}: {json.dumps(s)}"
                                              for m, s in settings.items()))
  rows = _final_rows(out)
  if rows:
    groups = _group_by_method(rows)
    parts.append("### Final (mean ± std over seeds, 10 local epochs)\n\n"
                 + plot_lib.summary(groups))
    headline = ("drt/ring", "atc/ring", "atc_matched/ring", "atc/full")  # the claims' runs
    for name, keep in (("ring", lambda m: m.endswith("/ring") or m in ("local", "atc/full")),
                       ("torus", lambda m: m.endswith("/torus") or m in ("local", "atc/full")),
                       ("headline", lambda m: m in headline)):
      chosen = {m: g for m, g in groups.items() if keep(m)}
      if chosen:
        path = plot_lib.plot(chosen, os.path.join(out, f"{name}.png"))
        parts.append(f"![{name}]({os.path.basename(path)})")
  text = "\n\n".join(parts) + "\n"
  workdir_lib.write_text(os.path.join(out, "tables.md"), text)
  return text


def _group_by_method(rows):
  groups = {}
  for r in rows:
    groups.setdefault(r["overrides"]["method"], []).append(r)
  return dict(sorted(groups.items()))


def main(argv):
  del argv
  from drt_jax import backends  # noqa: PLC0415

  f = flags.FLAGS
  backends.use_host_devices(f.host_devices)
  if f.stage == "report" and not (_tune_rows(f.out) or _final_rows(f.out)):
    raise ValueError(f"no study results in --out={f.out}; run --stage=tune, then --stage=final, "
                     "into it first")
  os.makedirs(f.out, exist_ok=True)
  base = base_config(f.dataset, f.smoke)
  if f.stage == "tune":
    tune(base, f.out, f.smoke)
  elif f.stage == "final":
    final(base, f.out, f.smoke)
  print(report(f.out))


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.INFO)
  common.run(main)
