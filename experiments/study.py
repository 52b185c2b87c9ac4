r"""The study of docs/results.md: DRT diffusion against true controls, ablations and the field's
baselines, with paired seeds and intervals. Offline, on a 2-core CPU.

Setting (:data:`SETTING`): Fashion-MNIST, 10 % of the training split held out for tuning, K = 8
agents, Dirichlet label skew, the ``convnet`` model (9,346 parameters spread over four BatchNorm
convolutions and a classifier: no layer holds half of them), SGD with momentum 0.9 and a cosine
learning-rate decay to 0, batch 32, 200 steps, evaluations every 20 steps on 500 test images, and
at the last step on the whole test split (10,000 images; the ``final_*`` numbers every verdict
uses). Same seed, same partition, same initial weights, same batches: every comparison is paired.

Stages, each a resumable sweep (rerun the same command to continue; finished runs are skipped):

  tune    every tuned method on the main setting (ring, alpha = 0.3), seed 0, the validation
          split, the same 200 steps: learning rate in LEARNING_RATES, and for the two methods with a
          second knob the same 2-D budget -- DRT: learning rate x strength rho (STRENGTHS), ATC:
          learning rate x self-weight (SELF_WEIGHTS). An axis whose best value is at the edge of its
          grid is widened (EXTEND) and searched again (WIDENINGS times).
  final   SEEDS for every method, in order of importance: the main setting's methods, controls
          and two DRT ablations (PRIORITY), then, interleaved (AFTER_MAIN), DRT and tuned ATC on
          the other settings (SECONDARY) and the remaining ablations and DRT inside exact
          diffusion (LATE); last, DRT, tuned ATC and fully connected ATC again with BatchNorm
          statistics combined like the parameters (BN_MIXED), and DRT and tuned ATC at three
          times the length (LONG_METHODS, LONG_FACTOR) with the hyperparameters tuned at 200 steps.
          ``atc_matched`` is ATC with static per-layer self-weights equal to DRT's time-averaged
          per-layer self-weights on the same setting (so its parameter-weighted mean is DRT's too)
          at DRT's learning rate: the same amount of mixing in every layer, without DRT's time
          variation and per-agent pattern.
  report  tables.md (the verdicts with their intervals, every method's final numbers, tuning) and
          the figures, from the committed JSONL alone.

  python experiments/study.py --stage=tune   --out=docs/results/study
  python experiments/study.py --stage=final  --out=docs/results/study
  python experiments/study.py --stage=report --out=docs/results/study

``--smoke`` runs the same stages on a tiny variant (CI).
"""

import itertools
import json
import os

import numpy as np
from absl import flags, logging

from drt_jax import workdir as workdir_lib
from experiments import common, stats, sweep
from experiments import plot as plot_lib


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_enum("stage", "tune", ["tune", "final", "report"], "Which stage to run.")
  flags.DEFINE_string("out", "docs/results/study", "Folder of the sweep files.")
  flags.DEFINE_bool("smoke", False, "A tiny version of every stage (seconds).")
  flags.DEFINE_integer("host_devices", 8, "Virtual CPU devices ('shard').")


SETTING = {
    "dataset": "fashion_mnist", "num_agents": 8, "topology": "ring", "partition": "dirichlet",
    "dirichlet_alpha": 0.3, "validation_fraction": 0.1, "model": "convnet", "model_options": {},
    "optimizer": "momentum", "momentum": 0.9, "schedule": "cosine", "batch_size": 32,
    "num_steps": 200, "eval_every": 20, "eval_examples": 500, "train_eval_examples": 500,
}
SMOKE = {"num_agents": 4, "num_steps": 4, "eval_every": 2, "eval_examples": 64,
         "train_eval_examples": 64, "model_options": {"features": (4, 4), "strides": (2, 2)}}
SEEDS = tuple(range(8))
MAIN = ("ring", 0.3)  # (graph, Dirichlet alpha)
SECONDARY = (("one_peer_exponential", 0.3), ("ring", 0.1), ("ring", 1.0))

LEARNING_RATES = (0.03, 0.1, 0.3)
STRENGTHS = (1.0, 4.0, 16.0)
SELF_WEIGHTS = (0.05, 0.15, 0.33)
# The values a grid axis grows by when its best value sits at an edge: (below, above).
EXTEND = {"learning_rate": ((0.01, 0.003), (1.0,)), "drt.strength": ((0.25, 0.0625), (64.0, 256.0)),
          "self_weight": ((0.02,), (0.6, 0.8))}
WIDENINGS = 2

# Tuned methods: name -> (overrides, tuned axes). The ATC twins differ by their second axis.
TUNED = {
    "drt": ({"algorithm": "drt"}, ("learning_rate", "drt.strength")),
    "atc_tuned": ({"algorithm": "atc"}, ("learning_rate", "self_weight")),
    "atc": ({"algorithm": "atc"}, ("learning_rate",)),
    "full": ({"algorithm": "atc", "topology": "full"}, ("learning_rate",)),
    "local": ({"algorithm": "local"}, ("learning_rate",)),
    "dsgd": ({"algorithm": "dsgd"}, ("learning_rate",)),
    "gradient_tracking": ({"algorithm": "gradient_tracking"}, ("learning_rate",)),
    "exact_diffusion": ({"algorithm": "exact_diffusion"}, ("learning_rate",)),
}
GRIDS = {"learning_rate": LEARNING_RATES, "drt.strength": STRENGTHS, "self_weight": SELF_WEIGHTS}
# Methods run at DRT's tuned settings with one thing changed: the ablations, and DRT inside exact
# diffusion (its learning rate tuned, its strength DRT's).
ABLATIONS = {
    "drt_shared": {"algorithm_options.layerwise": False},  # one weight for the whole model
    "drt_frozen": {"algorithm_options.freeze_after": 20},  # weights fixed after 10 % of the run
    "drt_current": {"drt.reference": "current"},  # n^(p): current norms, not the initial ones
    "drt_floor_0.02": {"drt.floor": 0.02},
    "drt_floor_0.2": {"drt.floor": 0.2},
}
PRIORITY = ("drt", "atc_matched", "atc_tuned", "atc", "full", "gradient_tracking",
            "exact_diffusion", "dsgd", "local", "drt_shared", "drt_frozen")
# After the secondary settings, as the budget allows.
LATE = ("drt_current", "drt_floor_0.2", "drt_floor_0.02", "drt_exact_diffusion")
SECONDARY_METHODS = ("drt", "atc_tuned")
# What runs after PRIORITY, in this order: a secondary setting (DRT and tuned ATC on it) or a
# LATE method on the main setting.
AFTER_MAIN = (SECONDARY[0], SECONDARY[1], LATE[0], LATE[1], SECONDARY[2], LATE[2], LATE[3])
# Methods rerun on the main setting with BatchNorm statistics combined like the parameters
# (config.combine_batch_stats). With the statistics local, agents whose parameters are equal still
# disagree in their outputs: fully connected ATC's disagreement is its local statistics alone. These
# runs measure the disagreement that the combination itself controls. Name -> the method it reruns.
BN_MIXED = {"drt_bn_mixed": "drt", "atc_tuned_bn_mixed": "atc_tuned", "full_bn_mixed": "full"}
# The main comparison again at LONG_FACTOR times the length (the cosine decay stretched with it) and
# the hyperparameters tuned at the usual length: does the ranking hold where the best method has
# plateaued?
LONG_FACTOR = 3
LONG_METHODS = ("drt", "atc_tuned")
TARGET = 0.95  # steps to reach this fraction of fully connected ATC's final accuracy


def setting_name(graph: str, alpha: float, num_steps: int | None = None) -> str:
  name = f"{graph}/a{alpha:g}"
  return name if num_steps is None else f"{name}/{num_steps}steps"


def base_config(smoke: bool) -> dict:
  return {**SETTING, **(SMOKE if smoke else {})}


def _strip(points):
  return [{k: v for k, v in p.items() if k not in ("method", "setting")} for p in points]


def _run(base, points, path):
  """Runs ``points`` (with their bookkeeping fields) and returns their rows, tagged."""
  rows = sweep.run(base, _strip(points), path)
  tags = {sweep.run_key(q): p for p, q in zip(points, _strip(points))}
  out = []
  for r in rows:
    p = tags.get(r["key"])
    if p is not None:
      out.append({**r, "method": p["method"], "setting": p["setting"]})
  return out


def _graph_fields(graph, alpha):
  return {"topology": graph, "dirichlet_alpha": alpha}


def _score(row) -> float:
  return (row.get("final") or {}).get("val_acc_mean") or 0.0


# --------------------------------------------------------------------------------------------
# Tuning.


def _tune_one(base, name, path, smoke):
  overrides, axes = TUNED[name]
  grid = {a: list(GRIDS[a][:2] if smoke else GRIDS[a]) for a in axes}
  widen = {a: [list(EXTEND[a][0]), list(EXTEND[a][1])] for a in axes}
  setting = setting_name(*MAIN)
  for _ in range(1 + (0 if smoke else WIDENINGS)):
    points = [{**_graph_fields(*MAIN), **overrides, "seed": 0, **dict(zip(axes, values)),
               "method": name, "setting": setting}
              for values in itertools.product(*(grid[a] for a in axes))]
    rows = [r for r in _run(base, points, path) if r.get("status") == "ok"]
    if not rows:
      raise ValueError(f"every tuning run of {name} failed; see {path}")
    best = max(rows, key=_score)["overrides"]
    grew = False
    for a in axes:
      values = sorted(grid[a])
      if best[a] == values[0] and widen[a][0]:
        grid[a].append(widen[a][0].pop(0))
        grew = True
      elif best[a] == values[-1] and widen[a][1]:
        grid[a].append(widen[a][1].pop(0))
        grew = True
    if not grew:
      break


def tune(base, out, smoke):
  path = os.path.join(out, "tune.jsonl")
  for name in TUNED:
    _tune_one(base, name, path, smoke)


def tune_rows(out, status="ok"):
  rows = workdir_lib.read_jsonl(os.path.join(out, "tune.jsonl"))
  for r in rows:
    r["method"] = _tuned_method(r["overrides"])
  return [r for r in rows if r.get("status") == status and r["method"]]


def _tuned_method(o):
  for name, (overrides, axes) in TUNED.items():
    if (all(o.get(k) == v for k, v in overrides.items()) and set(axes) <= set(o)
        and (o.get("topology") == "full") == (overrides.get("topology") == "full")
        and ("self_weight" in o) == ("self_weight" in axes)):
      return name
  return None


def tuned_settings(out) -> dict:
  """Tuned method -> its chosen values (best final validation accuracy, seed 0)."""
  rows = tune_rows(out)
  chosen = {}
  for name, (_, axes) in TUNED.items():
    mine = [r for r in rows if r["method"] == name]
    if mine:
      best = max(mine, key=_score)["overrides"]
      chosen[name] = {a: best[a] for a in axes}
  return chosen


# --------------------------------------------------------------------------------------------
# Final runs.


def _method_point(name, chosen, graph, alpha, seed, matched=None):
  if name in BN_MIXED:
    point = _method_point(BN_MIXED[name], chosen, graph, alpha, seed, matched)
    return {**point, "combine_batch_stats": True, "method": name}
  drt = {**TUNED["drt"][0], **chosen["drt"]}
  if name in TUNED:
    over = {**TUNED[name][0], **chosen[name]}
  elif name in ABLATIONS:
    over = {**drt, **ABLATIONS[name]}
  elif name == "atc_matched":
    over = {"algorithm": "atc", "learning_rate": chosen["drt"]["learning_rate"],
            "algorithm_options.self_weights": matched}
  elif name == "drt_exact_diffusion":
    over = {"algorithm": "drt_exact_diffusion", **chosen["drt_exact_diffusion"],
            "drt.strength": chosen["drt"]["drt.strength"]}
  else:
    raise ValueError(f"unknown method {name!r}")
  fields = _graph_fields(graph, alpha)
  if name == "full":
    fields["topology"] = "full"
  return {**fields, **over, "seed": seed, "method": name, "setting": setting_name(graph, alpha)}


def matched_self_weights(rows, setting) -> dict | None:
  """DRT's per-layer self-weights on ``setting``, averaged over time and seeds (4 decimals)."""
  drt = [r for r in rows if r["method"] == "drt" and r["setting"] == setting
         and r.get("status") == "ok"]
  if not drt:
    return None
  layers = sorted({k.split("/", 1)[1] for r in drt for k in r["time_avg"]
                   if k.startswith("self_weight/")})
  return {p: round(float(np.mean([r["time_avg"][f"self_weight/{p}"] for r in drt])), 4)
          for p in layers}


def final(base, out, smoke):
  chosen = tuned_settings(out)
  missing = [m for m in TUNED if m not in chosen]
  if missing:
    raise ValueError(f"no finished tuning run for {', '.join(missing)}; run --stage=tune first")
  if "drt_exact_diffusion" not in chosen:  # its learning rate, at DRT's strength
    _tune_drt_exact_diffusion(base, out, chosen, smoke)
    chosen = {**chosen, **_drt_exact_choice(out)}
  base = {**base, "final_full_test": True}
  path = os.path.join(out, "final.jsonl")
  seeds = SEEDS[:2] if smoke else SEEDS
  rows = final_rows(out)
  for name in PRIORITY:
    matched = None
    if name == "atc_matched":
      matched = matched_self_weights(rows, setting_name(*MAIN))
      logging.info("matched per-layer self-weights: %s", matched)
    points = [_method_point(name, chosen, *MAIN, s, matched) for s in seeds]
    rows += _run(base, points, path)
  for step in AFTER_MAIN:
    if isinstance(step, str):  # a method on the main setting
      rows += _run(base, [_method_point(step, chosen, *MAIN, s) for s in seeds], path)
      continue
    for name in SECONDARY_METHODS:  # a secondary setting
      rows += _run(base, [_method_point(name, chosen, *step, s) for s in seeds], path)
  for name in BN_MIXED:
    rows += _run(base, [_method_point(name, chosen, *MAIN, s) for s in seeds], path)
  for name in LONG_METHODS:
    rows += _run(base, [_long_point(name, chosen, base, s) for s in seeds], path)
  return rows


def _long_point(name, chosen, base, seed):
  steps = LONG_FACTOR * base["num_steps"]
  return {**_method_point(name, chosen, *MAIN, seed), "num_steps": steps,
          "setting": setting_name(*MAIN, steps)}


def _tune_drt_exact_diffusion(base, out, chosen, smoke):
  path = os.path.join(out, "tune.jsonl")
  grid = LEARNING_RATES[:2] if smoke else LEARNING_RATES
  points = [{**_graph_fields(*MAIN), "algorithm": "drt_exact_diffusion", "learning_rate": lr,
             "drt.strength": chosen["drt"]["drt.strength"], "seed": 0,
             "method": "drt_exact_diffusion", "setting": setting_name(*MAIN)} for lr in grid]
  _run(base, points, path)


def _drt_exact_choice(out):
  rows = [r for r in workdir_lib.read_jsonl(os.path.join(out, "tune.jsonl"))
          if r.get("status") == "ok" and r["overrides"].get("algorithm") == "drt_exact_diffusion"]
  if not rows:
    return {}
  return {"drt_exact_diffusion": {"learning_rate": max(rows, key=_score)["overrides"][
      "learning_rate"]}}


def _identify(o) -> tuple[str, str]:
  """(method, setting) of a final row from its overrides."""
  full = o.get("topology") == "full"  # one run, shared by every setting of the main graph
  graph = MAIN if full else (o.get("topology"), o.get("dirichlet_alpha"))
  setting = setting_name(*graph, o.get("num_steps"))
  suffix = "_bn_mixed" if o.get("combine_batch_stats") else ""
  return _method_of(o) + suffix, setting


def _method_of(o) -> str:
  alg = o.get("algorithm")
  if o.get("topology") == "full":
    return "full"
  if "algorithm_options.self_weights" in o:
    return "atc_matched"
  if alg == "drt":
    return next((name for name, change in ABLATIONS.items()
                 if all(o.get(k) == v for k, v in change.items())), "drt")
  if alg == "atc":
    return "atc_tuned" if "self_weight" in o else "atc"
  return alg


def final_rows(out, status="ok"):
  path = os.path.join(out, "final.jsonl")
  rows = workdir_lib.read_jsonl(path) if os.path.exists(path) else []
  for r in rows:
    r["method"], r["setting"] = _identify(r["overrides"])
  return [r for r in rows if r.get("status") == status]


# --------------------------------------------------------------------------------------------
# Report.

_LONG = setting_name(*MAIN, LONG_FACTOR * SETTING["num_steps"])  # the long runs' setting

# (id, claim, setting, A, B, metric, +1: higher is better for A / -1: lower, margin)
CLAIMS = (
    ("C1", "DRT beats ATC (Metropolis weights) in test accuracy", "main", "drt", "atc",
     "final_test_acc_mean", 1, 0.005),
    ("C2", "DRT beats ATC with its self-weight tuned on the same 2-D budget", "main", "drt",
     "atc_tuned", "final_test_acc_mean", 1, 0.005),
    ("C3", "DRT's time-varying pattern beats static per-layer weights of the same mean (matched "
     "control)", "main", "drt", "atc_matched", "final_test_acc_mean", 1, 0.005),
    ("C4", "DRT has a smaller generalization gap than tuned ATC", "main", "drt", "atc_tuned",
     "gen_gap", -1, 0.005),
    ("C5", "DRT's agents disagree less in their outputs than tuned ATC's", "main", "drt",
     "atc_tuned", "final_output_disagreement", -1, 0.005),
    ("C6", "DRT's average (centroid) model beats tuned ATC's", "main", "drt", "atc_tuned",
     "final_centroid_test_acc", 1, 0.005),
    ("C7", "DRT converges about as fast as fully connected ATC (steps to 95 % of its final "
     "accuracy; at most 20 steps more)", "main", "drt", "full", "steps_to_target", -1, 20.0),
    ("C8", "per-layer weights matter: DRT beats one DRT weight for the whole model", "main", "drt",
     "drt_shared", "final_test_acc_mean", 1, 0.005),
    ("C9", "recomputing every step matters: DRT beats DRT weights frozen after 20 steps", "main",
     "drt", "drt_frozen", "final_test_acc_mean", 1, 0.005),
    ("C10", "DRT beats gradient tracking", "main", "drt", "gradient_tracking",
     "final_test_acc_mean", 1, 0.005),
    ("C11", "DRT beats exact diffusion", "main", "drt", "exact_diffusion", "final_test_acc_mean",
     1, 0.005),
    ("C12", "DRT beats DSGD", "main", "drt", "dsgd", "final_test_acc_mean", 1, 0.005),
    ("C13", "DRT beats tuned ATC on the one-peer exponential graph", "one_peer_exponential/a0.3",
     "drt", "atc_tuned", "final_test_acc_mean", 1, 0.005),
    ("C14", "DRT beats tuned ATC under strong label skew (alpha = 0.1)", "ring/a0.1", "drt",
     "atc_tuned", "final_test_acc_mean", 1, 0.005),
    ("C15", "DRT beats tuned ATC near IID (alpha = 1.0)", "ring/a1", "drt", "atc_tuned",
     "final_test_acc_mean", 1, 0.005),
    ("C16", "DRT's agents disagree less in their outputs than tuned ATC's, BatchNorm statistics "
     "combined too", "main", "drt_bn_mixed", "atc_tuned_bn_mixed", "final_output_disagreement", -1,
     0.005),
    ("C17", "DRT beats tuned ATC, BatchNorm statistics combined too", "main", "drt_bn_mixed",
     "atc_tuned_bn_mixed", "final_test_acc_mean", 1, 0.005),
    ("C18", "DRT beats tuned ATC at three times the length (600 steps)", _LONG, "drt",
     "atc_tuned", "final_test_acc_mean", 1, 0.005),
)


# Paired differences the reading cites beside the claims: (what, A, A's setting, B, B's setting,
# metric), A - B over the common seeds, no verdict. The same method at two lengths tells how far
# the shorter run was from a plateau. (Accuracy gained late in one run would not: the cosine decay
# lifts it at the end of any length.)
COMPARISONS = (
    ("tuned ATC - Metropolis ATC", "atc_tuned", "main", "atc", "main", "final_test_acc_mean"),
    ("tuned ATC - fully connected ATC", "atc_tuned", "main", "full", "main",
     "final_test_acc_mean"),
    ("tuned ATC - matched ATC", "atc_tuned", "main", "atc_matched", "main", "final_test_acc_mean"),
    ("tuned ATC - DSGD", "atc_tuned", "main", "dsgd", "main", "final_test_acc_mean"),
    ("DRT with floor 0.2 - DRT (floor 0.05)", "drt_floor_0.2", "main", "drt", "main",
     "final_test_acc_mean"),
    ("DRT with floor 0.02 - DRT (floor 0.05)", "drt_floor_0.02", "main", "drt", "main",
     "final_test_acc_mean"),
    ("DRT with current norms - DRT", "drt_current", "main", "drt", "main", "final_test_acc_mean"),
    ("DRT inside exact diffusion - DRT", "drt_exact_diffusion", "main", "drt", "main",
     "final_test_acc_mean"),
    ("DRT inside exact diffusion - exact diffusion", "drt_exact_diffusion", "main",
     "exact_diffusion", "main", "final_test_acc_mean"),
    ("DRT, BatchNorm statistics combined - local", "drt_bn_mixed", "main", "drt", "main",
     "final_test_acc_mean"),
    ("tuned ATC, BatchNorm statistics combined - local", "atc_tuned_bn_mixed", "main",
     "atc_tuned", "main", "final_test_acc_mean"),
    ("fully connected ATC, BatchNorm statistics combined - local", "full_bn_mixed", "main", "full",
     "main", "final_test_acc_mean"),
    ("DRT's disagreement, BatchNorm statistics combined - local", "drt_bn_mixed", "main", "drt",
     "main", "final_output_disagreement"),
    ("tuned ATC's disagreement, BatchNorm statistics combined - local", "atc_tuned_bn_mixed",
     "main", "atc_tuned", "main", "final_output_disagreement"),
    ("DRT at 600 steps - at 200", "drt", _LONG, "drt", "main", "final_test_acc_mean"),
    ("tuned ATC at 600 steps - at 200", "atc_tuned", _LONG, "atc_tuned", "main",
     "final_test_acc_mean"),
)


def comparisons(rows) -> list[dict]:
  """Every row of :data:`COMPARISONS` whose runs exist, with its paired interval."""
  out = []
  for what, a, sa, b, sb, metric in COMPARISONS:
    va = _by_seed(rows, a, _setting(sa), metric)
    diff = stats.paired(va, _by_seed(rows, b, _setting(sb), metric))
    if diff is not None:
      out.append({"what": what, "metric": metric, "diff": diff, "interval": stats.interval(diff)})
  return out


def _setting(label):
  return setting_name(*MAIN) if label == "main" else label


def _value(row, metric, target=None):
  f = row["final"]
  if metric == "steps_to_target":
    hit = [h["step"] for h in row["history"] if (h.get("test_acc_mean") or 0.0) >= target]
    return float(hit[0]) if hit else float(row["history"][-1]["step"] + SETTING["eval_every"])
  if metric == "gen_gap":
    return f["gen_gap"]
  return f.get(metric)


def _by_seed(rows, method, setting, metric, target=None):
  return {r["overrides"]["seed"]: _value(r, metric, target) for r in rows
          if r["method"] == method and r["setting"] == setting
          and _value(r, metric, target) is not None}


def _target(rows):
  full = [r["final"]["test_acc_mean"] for r in rows if r["method"] == "full"]
  return TARGET * float(np.mean(full)) if full else None


def verdicts(rows) -> list[dict]:
  """Every claim of :data:`CLAIMS` whose runs exist: its paired difference and verdict."""
  target = _target(rows)
  out = []
  for cid, text, setting, a, b, metric, sign, margin in CLAIMS:
    s = _setting(setting)
    if metric == "steps_to_target" and target is None:
      continue
    va, vb = _by_seed(rows, a, s, metric, target), _by_seed(rows, b, s, metric, target)
    diff = stats.paired({k: sign * v for k, v in va.items()}, {k: sign * v for k, v in vb.items()})
    if diff is None:
      continue
    if metric == "steps_to_target":  # (full - drt steps) + margin > 0: at most `margin` slower
      diff = stats.Paired(diff.mean + margin, diff.lo + margin, diff.hi + margin, diff.n,
                          diff.seeds)
      word = stats.verdict(diff, 0.0)
    else:
      word = stats.verdict(diff, margin)
    out.append({"id": cid, "claim": text, "setting": s, "a": a, "b": b, "metric": metric,
                "diff": diff, "verdict": word,
                "interval": stats.interval(diff, "+.1f" if metric == "steps_to_target" else
                                           "+.4f")})
  return out


_COLUMNS = (("test acc", "final_test_acc_mean", ".4f"), ("centroid acc", "final_centroid_test_acc",
                                                          ".4f"),
            ("gen gap", "gen_gap", ".4f"), ("disagreement", "final_output_disagreement", ".4f"),
            ("consensus", "consensus_distance", ".3g"), ("train loss", "train_loss", ".4f"),
            ("self-weight (param-weighted, time avg)", "time_avg_self_weight_mean", ".3f"))


def _metric_values(rows, key):
  if key.startswith("time_avg_"):
    return [r.get("time_avg", {}).get(key[len("time_avg_"):]) for r in rows]
  return [r["final"].get(key) for r in rows]


def method_table(rows, setting) -> str:
  groups = {}
  for r in rows:
    if r["setting"] == setting:
      groups.setdefault(r["method"], []).append(r)
  known = (*PRIORITY, *LATE, *BN_MIXED)
  order = [m for m in known if m in groups] + sorted(m for m in groups if m not in known)
  lines = ["| method | " + " | ".join(h for h, _, _ in _COLUMNS) + " | seeds |",
           "|---|" + "---|" * (len(_COLUMNS) + 1)]
  for m in order:
    cells = []
    for _, key, fmt in _COLUMNS:
      vals = [v for v in _metric_values(groups[m], key) if v is not None]
      if not vals:
        cells.append("–")
        continue
      mean, sd = stats.mean_sd(vals)
      cells.append(f"{format(mean, fmt)} ± {format(sd, fmt)}")
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(groups[m])} |")
  return "\n".join(lines)


def matched_check(rows) -> list[dict]:
  """Per layer: DRT's time-averaged self-weight on the main setting, the matched control's, and
  their difference (the control is matched when every |difference| <= 0.005)."""
  s = setting_name(*MAIN)
  drt = [r for r in rows if r["method"] == "drt" and r["setting"] == s]
  ctl = [r for r in rows if r["method"] == "atc_matched" and r["setting"] == s]
  if not drt or not ctl:
    return []
  keys = sorted(k for k in drt[0]["time_avg"] if k.startswith("self_weight")
                and k != "self_weight_layer_mean")
  out = []
  for k in keys:
    a = float(np.mean([r["time_avg"][k] for r in drt]))
    got = [r["time_avg"].get(k) for r in ctl]
    if any(v is None for v in got):
      continue
    b = float(np.mean(got))
    out.append({"layer": k, "drt": a, "matched": b, "diff": b - a})
  return out


def report(out: str) -> str:
  """Writes tables.md and the figures under ``out``; returns the markdown."""
  parts = []
  rows = final_rows(out)
  found = verdicts(rows)
  if found:
    lines = ["| id | claim | setting | verdict | difference [95 % CI] | seeds |",
             "|---|---|---|---|---|---|"]
    for v in found:
      lines.append(f"| {v['id']} | {v['claim']} | {v['setting']} | **{v['verdict']}** | "
                   f"{v['interval']} | {v['diff'].n} |")
    parts.append("### Verdicts (paired over seeds; difference oriented so that > 0 favours the "
                 "claim; steps-to-target: slack within the 20-step margin)\n\n" + "\n".join(lines))
  extra = comparisons(rows)
  if extra:
    lines = ["| difference | metric | A - B [95 % CI] | seeds |", "|---|---|---|---|"]
    lines += [f"| {c['what']} | {c['metric']} | {c['interval']} | {c['diff'].n} |"
              for c in extra]
    parts.append("### Other paired differences (no verdict)\n\n" + "\n".join(lines))
  check = matched_check(rows)
  if check:
    lines = ["| self-weight | DRT (time avg) | matched ATC | difference |", "|---|---|---|---|"]
    lines += [f"| {c['layer']} | {c['drt']:.4f} | {c['matched']:.4f} | {c['diff']:+.4f} |"
              for c in check]
    parts.append("### Matched control: self-weights per layer (main setting)\n\n"
                 + "\n".join(lines))
  for setting in sorted({r["setting"] for r in rows}, key=lambda s: (s != setting_name(*MAIN), s)):
    parts.append(f"### Final numbers: {setting} (mean ± sd over seeds; whole test split)\n\n"
                 + method_table(rows, setting))
  chosen = tuned_settings(out)
  chosen.update(_drt_exact_choice(out))
  if chosen:
    parts.append("### Chosen by tuning (seed 0, validation split)\n\n"
                 + "\n".join(f"- {m}: {json.dumps(c)}" for m, c in chosen.items()))
    parts.append("### Tuning runs\n\n" + _tuning_table(out))
  parts += _figures(rows, out)
  text = "\n\n".join(parts) + "\n"
  workdir_lib.write_text(os.path.join(out, "tables.md"), text)
  return text


def _tuning_table(out):
  rows = tune_rows(out) + tune_rows(out, "diverged")
  rows += [r for r in workdir_lib.read_jsonl(os.path.join(out, "tune.jsonl"))
           if r["overrides"].get("algorithm") == "drt_exact_diffusion"]
  lines = ["| method | learning rate | strength | self-weight | final val acc |",
           "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r.get("method") or "drt_exact_diffusion",
                                        json.dumps(r["overrides"], sort_keys=True))):
    o = r["overrides"]
    acc = f"{_score(r):.4f}" if r.get("status") == "ok" else r.get("status")
    lines.append(f"| {r.get('method') or 'drt_exact_diffusion'} | {o['learning_rate']} | "
                 f"{o.get('drt.strength', '–')} | {o.get('self_weight', '–')} | {acc} |")
  return "\n".join(lines)


def _figures(rows, out):
  parts = []
  k = SETTING["num_agents"]
  for setting in sorted({r["setting"] for r in rows}):
    groups = {}
    for r in rows:
      if r["setting"] == setting and not r["method"].startswith("drt_"):
        groups.setdefault(r["method"], []).append(r)
    if setting == setting_name(*MAIN):
      groups = {m: g for m, g in groups.items() if m in ("drt", "atc", "atc_tuned", "atc_matched",
                                                        "full", "gradient_tracking")}
    seeds = max(len(g) for g in groups.values())
    name = setting.replace("/", "_")
    graph, alpha, *steps = setting.split("/")
    title = (f"Fashion-MNIST, K = {k}, {graph.replace('_', '-')} graph, "
             f"Dirichlet alpha = {alpha[1:]}, convnet, "
             f"{steps[0].replace('steps', ' steps') + ', ' if steps else ''}{seeds} seeds")
    path = plot_lib.plot(groups, os.path.join(out, f"{name}.png"),
                         ("test_acc_mean", "train_loss", "consensus_distance",
                          "output_disagreement"), title=title)
    parts.append(f"![{setting}]({os.path.basename(path)})")
  abl = {m: [r for r in rows if r["method"] == m and r["setting"] == setting_name(*MAIN)]
         for m in ("drt", *ABLATIONS)}
  abl = {m: g for m, g in abl.items() if g}
  if len(abl) > 1:
    path = plot_lib.plot(abl, os.path.join(out, "ablations.png"),
                         ("test_acc_mean", "train_loss", "consensus_distance",
                          "self_weight_mean"),
                         title=f"DRT ablations: Fashion-MNIST, K = {k}, ring, alpha = 0.3, "
                               f"{max(len(g) for g in abl.values())} seeds")
    parts.append(f"![ablations]({os.path.basename(path)})")
  return parts


def main(argv):
  del argv
  from drt_jax import backends  # noqa: PLC0415

  f = flags.FLAGS
  backends.use_host_devices(f.host_devices)
  if f.stage == "report" and not (tune_rows(f.out) or final_rows(f.out)):
    raise ValueError(f"no study results in --out={f.out}; run --stage=tune, then --stage=final, "
                     "into it first")
  os.makedirs(f.out, exist_ok=True)
  base = base_config(f.smoke)
  if f.stage == "tune":
    tune(base, f.out, f.smoke)
  elif f.stage == "final":
    final(base, f.out, f.smoke)
  print(report(f.out))


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.INFO)
  common.run(main)
