"""The lab's benchmarks by question in smoke mode: benchmarks/train_step.py (every variant yields a
positive, finite throughput), benchmarks/combine.py and benchmarks/data_memory.py.

Each runs in a subprocess so that its ``--host_devices`` (set through XLA_FLAGS before JAX starts)
is independent of the 8 devices this test process already has.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

from benchmarks import train_step

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args, timeout: int = 300):
  """``python -m benchmarks.<module> args`` from the repository root, on the CPU."""
  # timeout: a guard against hangs, not a timing (a loaded 2-core machine takes minutes)
  return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=_ROOT,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=timeout, check=False)


def _results(out: str) -> tuple[dict, list]:
  """The JSON result and the JSON lines of a run that wrote ``out``."""
  with open(out) as f:
    result = json.load(f)
  with open(os.path.splitext(out)[0] + ".jsonl") as f:
    return result, [json.loads(line) for line in f]


def _measured(test: absltest.TestCase, module: str, *args, timeout: int = 300):
  """``(result, lines)`` of a benchmark run that must succeed (its JSON written to a
  temporary folder)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    proc = _run(module, *args, "--out", out, timeout=timeout)
    test.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    return _results(out)


class TrainStepSmokeTest(absltest.TestCase):

  def test_smoke_run_measures_every_variant(self):
    result, lines = _measured(self, "train_step", "--smoke", "--host_devices", "2",
                              "--scan_steps", "2", "--profile_steps", "1")

    rows = result["rows"]
    self.assertEqual(result["machine"]["local_device_count"], 2)
    # Timings depend on the host memory's page size: the record says how the process started.
    self.assertEqual(result["machine"]["glibc_tunables"], os.environ.get("GLIBC_TUNABLES", ""))
    self.assertEqual(result["settings"]["ks"], [2, 4])
    for k_count in (2, 4):
      variants = {r["variant"] for r in rows if r["K"] == k_count}
      expected = {"single", "loop", "vmap", f"chunked({k_count})", "map", "shard(2)"}
      self.assertContainsSubset(expected, variants)
      self.assertTrue(any(v.startswith("drt:") for v in variants), variants)
      self.assertTrue(any(v.startswith("scan2:") for v in variants), variants)
    for r in rows:
      self.assertEqual(r["status"], "ok", r)
      self.assertTrue(math.isfinite(r["img_s"]) and r["img_s"] > 0, r)
      self.assertTrue(math.isfinite(r["step_ms"]) and r["step_ms"] > 0, r)
      self.assertTrue(math.isfinite(r["loss"]), r)
    self.assertTrue(all(r["ratio_vs_single"] == 1.0 for r in rows if r["variant"] == "single"))
    # --profile_steps: every row but the loop's carries its device time by kind of op, all of it
    # attributed to its own program, the matmuls of the MLP included.
    for r in rows:
      if r["variant"] == "loop":
        self.assertNotIn("profile", r)
        continue
      p = r["profile"]
      self.assertGreaterEqual(p["coverage"], 0.9, r["variant"])
      self.assertGreater(p["by_category"]["matmul"], 0, r["variant"])
      self.assertAlmostEqual(p["busy_ms"], sum(p["by_category"].values()))
    self.assertIn("Device time per step by kind of XLA op, mlp, K = 4", result["table"])
    self.assertLen(result["comparisons"], 2)
    for cmp in result["comparisons"]:  # the algorithms' own steps, timed apart from the model
      self.assertGreater(cmp["algorithm_alone_ms"], 0)
      self.assertGreater(cmp["compare_alone_ms"], 0)
    self.assertIn("| alone: algorithm ms |", result["table"])
    # The JSONL stream holds the machine line, every row and every comparison.
    self.assertIn("machine", lines[0])
    self.assertEqual([ln for ln in lines if "variant" in ln], rows)
    self.assertEqual([ln["comparison"] for ln in lines if "comparison" in ln],
                     result["comparisons"])
    self.assertIn("| mlp | 4 | shard(2) |", result["table"])

  def test_lab_conv_formulation_against_an_xla_baseline_with_traces_kept(self):
    with tempfile.TemporaryDirectory() as tmp:
      out, traces = os.path.join(tmp, "bench.json"), os.path.join(tmp, "traces")
      proc = _run("train_step", "--models", "cnn", "--ks", "2", "--batch", "4", "--backends",
                  "vmap", "--baselines", "single", "--compare=", "--steps", "1", "--warmup", "1",
                  "--conv", "xla_dw_matmul", "--baseline_conv", "xla", "--profile_steps", "1",
                  "--profile_dir", traces, "--out", out, timeout=120)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      result, _ = _results(out)
      kept = sorted(os.listdir(traces))
      self.assertEqual(kept, ["00", "01"])  # the single model's, then vmap's
      for name in kept:
        self.assertTrue(os.path.exists(os.path.join(traces, name, "program.hlo.txt")))
      convs = {}
      for name in kept:
        with open(os.path.join(traces, name, "program.hlo.txt")) as f:
          convs[name] = f.read().count(" convolution(")
    self.assertEqual((result["settings"]["conv"], result["settings"]["baseline_conv"]),
                     ("xla_dw_matmul", "xla"))
    self.assertIn("conv xla_dw_matmul (single and loop rows: xla)", result["table"])
    self.assertEqual([r["conv"] for r in result["rows"]], ["xla", "xla_dw_matmul"])
    # The single model's kernel gradients are convolutions; the vmapped program's are matrix
    # products (3 conv layers: forward 3 + input gradient 2 + kernel gradient 3, against 5).
    self.assertEqual((convs["00"], convs["01"]), (8, 5))
    for r in result["rows"]:
      self.assertEqual(r["profile"]["program"], "as timed")
      self.assertGreater(r["profile"]["by_category"]["conv"], 0)

  def test_conv_choices_are_the_library_formulations_and_the_labs(self):
    self.assertEqual(train_step.CONVS, ("auto", "xla", "taps", "xla_dw_matmul", "xla_dw_taps",
                                        "xla_dw_pallas"))

  def test_bad_flag_is_one_line(self):
    proc = _run("train_step", "--models", "vgg", timeout=120)
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertEqual(proc.stderr.strip().splitlines(),
                     ["error: --models: unknown 'vgg'; expected some of cnn, mlp, resnet20"])


class CombineSmokeTest(absltest.TestCase):

  def test_smoke_run_times_both_paths_and_reads_the_bytes_moved(self):
    result, lines = _measured(self, "combine", "--smoke", "--host_devices", "2", timeout=120)
    self.assertEqual(result["machine"]["local_device_count"], 2)
    # The combine alone: both paths timed per K, and the ratio is theirs; on one device and on
    # the agents' mesh (its 2 host devices split K = 8 and 16).
    self.assertEqual([r["K"] for r in result["combine"]], [8, 16])
    for r in result["combine"]:
      self.assertGreater(r["sparse_ms"], 0)
      self.assertAlmostEqual(r["dense_over_sparse"], r["dense_ms"] / r["sparse_ms"])
      self.assertEqual(r["mesh_devices"], 2)
      self.assertAlmostEqual(r["dense_over_sparse_mesh"],
                             r["dense_mesh_ms"] / r["sparse_mesh_ms"])
    self.assertIn("The combine alone (ring), on one device and on the agents' mesh",
                  result["table"])
    # Bytes moved by one sharded combine: the ring sends boundary agents only, the full graph all.
    moved = {m["topology"]: m for m in result["combine_bytes"]}
    ring, full = moved["ring"], moved["full"]
    self.assertEqual(ring["bytes_by_collective"]["all-gather"], 0)
    self.assertEqual(ring["bytes_per_device"], 2 * 256 * 4)  # one agent from each side
    self.assertGreater(full["bytes_per_device"], 2 * ring["bytes_per_device"])
    self.assertIn("bytes received per device by one combine, ring, K = 8 on 2 devices",
                  result["table"])
    # The JSONL stream: the machine line, then every case as it finished.
    self.assertIn("machine", lines[0])
    self.assertEqual([ln["combine"] for ln in lines if "combine" in ln], result["combine"])
    self.assertEqual([ln["combine_bytes"] for ln in lines if "combine_bytes" in ln],
                     result["combine_bytes"])


class DataMemorySmokeTest(absltest.TestCase):

  def test_the_devices_split_the_examples_not_k_copies(self):
    result, lines = _measured(self, "data_memory", "--smoke", "--host_devices", "2", timeout=120)
    # The data-memory line: the 2 devices split the examples between them, not K copies.
    memory = result["data_memory"]
    self.assertEqual((memory["K"], memory["backend"]), (64, "shard"))
    self.assertLessEqual(memory["device_bytes"], memory["split_bytes"] + 2**20)
    self.assertLessEqual(memory["max_device_bytes"], memory["split_bytes"] // 2 + 2**20)
    self.assertEqual(memory["k_copies_bytes"], 64 * memory["split_bytes"])
    self.assertIn("data on device, synthetic", result["table"])
    self.assertEqual(lines[-1], {"data_memory": memory})


class AlgorithmsSmokeTest(absltest.TestCase):

  # One of each family keeps the subprocess short; the others run the same code path.
  VARIANTS = ("cta", "drt", "gradient_tracking", "choco(top_k 10%)")

  def test_every_variant_is_timed_against_atc(self):
    result, lines = _measured(self, "algorithms", "--smoke", "--variants",
                              ",".join(self.VARIANTS), timeout=300)
    rows = result["rows"]
    self.assertEqual([r["variant"] for r in rows], ["atc", *self.VARIANTS])
    atc = rows[0]
    self.assertEqual((atc["step_vs_atc"], atc["alg_vs_atc"]), (1.0, 1.0))
    for r in rows:
      self.assertEqual((r["backend"], r["K"]), ("vmap", 4))
      for field in ("step_ms", "alg_ms", "step_vs_atc", "alg_vs_atc", "loss"):
        self.assertTrue(math.isfinite(r[field]) and r[field] > 0, (r["variant"], field))
      self.assertAlmostEqual(r["step_vs_atc"], r["step_ms"] / atc["step_ms"])
    self.assertEqual(rows[-1]["options"], {"compressor": "top_k", "ratio": 0.1})
    self.assertIn("| vmap | choco(top_k 10%) |", result["table"])
    # The JSONL stream holds each case as it finished, before the ratios were known.
    self.assertEqual([ln for ln in lines if "variant" in ln],
                     [{k: v for k, v in r.items() if not k.endswith("_vs_atc")} for r in rows])


class SweepsSmokeTest(absltest.TestCase):

  def test_both_modes_are_timed_per_size_with_compile_included(self):
    result, lines = _measured(self, "sweeps", "--smoke", timeout=300)
    rows = result["rows"]
    self.assertEqual(result["settings"]["sizes"], [1, 2])
    self.assertEqual([(r["S"], r["mode"]) for r in rows],
                     [(1, "sequential"), (1, "vectorised"), (2, "sequential"), (2, "vectorised")])
    self.assertEqual(result["machine"]["platform"], "cpu")
    for r in rows:
      self.assertEqual(r["status"], "ok", r)
      self.assertEqual(r["members"], [{"seed": s} for s in range(r["S"])])
      self.assertEqual(r["member_status"], ["ok"] * r["S"])
      for field in ("total_s", "per_member_s", "seq_over_vec"):
        self.assertTrue(math.isfinite(r[field]) and r[field] > 0, (r["S"], r["mode"], field))
      self.assertAlmostEqual(r["per_member_s"], r["total_s"] / r["S"])
    for size in (1, 2):
      seq, vec = (next(r for r in rows if (r["S"], r["mode"]) == (size, m))
                  for m in ("sequential", "vectorised"))
      self.assertLen(seq["runs_s"], size)  # each sequential run timed, the first compiling
      self.assertAlmostEqual(seq["seq_over_vec"], seq["per_member_s"] / vec["per_member_s"])
      self.assertEqual(vec["seq_over_vec"], seq["seq_over_vec"])
      # The same members trained either way reach the same accuracy (to a prediction or so).
      for a, b in zip(seq["final_test_acc"], vec["final_test_acc"]):
        self.assertAlmostEqual(a, b, delta=0.01)
    self.assertIn("| 2 | vectorised |", result["table"])
    # The JSONL stream: the machine line, then each case as it finished (before its ratio).
    self.assertIn("machine", lines[0])
    self.assertEqual([ln for ln in lines if "mode" in ln],
                     [{k: v for k, v in r.items() if k != "seq_over_vec"} for r in rows])


if __name__ == "__main__":
  absltest.main()
