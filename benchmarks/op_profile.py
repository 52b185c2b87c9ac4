r"""Where a compiled step spends its device time, per kind of XLA operation.

Whole-program throughput says *that* K vmapped agents run slower than one model; this says
*where*. :func:`profile` traces a few calls of a compiled program with ``jax.profiler``, reads the
trace back (``jax.profiler.ProfileData``), and attributes every device event to an instruction of
that program's optimised HLO (``compiled.as_text()``), which puts it in one category:

* ``conv``: convolutions (XLA ``convolution`` or a cuDNN custom call / fusion);
* ``matmul``: ``dot`` and GEMM library calls;
* ``reduce``: fusions with a reduction (BatchNorm statistics, pooling, the loss, optimiser norms);
* ``transpose/copy``: data movement: anything that transposes or copies (with whatever elementwise
  work is fused into it), and pure pads, slices and concatenations;
* ``gather/scatter``: indexed reads and writes (batch sampling, the sparse combine);
* ``collective``: all-reduce, all-gather, collective-permute and friends;
* ``elementwise``: every other fusion or op (activations, the optimiser update, casts);
* ``control``: ``while``/``conditional``/``call``, whose events enclose their bodies'; listed but
  left out of the totals so nothing is counted twice.

Events whose instruction is not in the program (another program in the trace, or a runtime event)
are left out; ``coverage`` is the attributed share of the device events that name an HLO op, so a
trace that could not be attributed shows up as a low number instead of a wrong table.

Where the events come from: on a GPU or TPU the ``/device:...`` planes, from their ``XLA Ops``
line when the profiler wrote one and otherwise from kernel events carrying an ``hlo_op`` stat; on
a CPU the ``/host:CPU`` plane's thunk events (which may overlap on a thread pool, so their sum can
exceed the wall time). Used by ``benchmarks/train_step.py --profile_steps N``; also a command
that summarises a saved trace against a saved HLO text:

  python -m benchmarks.op_profile TRACE.xplane.pb PROGRAM.hlo.txt --steps 3
"""

import collections
import glob
import os
import re
import sys
import tempfile
from typing import NamedTuple

import jax

CATEGORIES = ("conv", "matmul", "reduce", "transpose/copy", "gather/scatter", "collective",
              "elementwise")
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_COLLECTIVE = {"all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter",
               "all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
               "collective-permute-start", "collective-permute-done", "collective-broadcast"}
_MOVEMENT = {"transpose", "copy", "pad", "slice", "concatenate", "dynamic-slice",
             "dynamic-update-slice", "reverse", "copy-start", "copy-done"}
_FREE = {"parameter", "constant", "bitcast", "reshape", "broadcast", "tuple", "get-tuple-element",
         "convert", "iota", "bitcast-convert"}


class Op(NamedTuple):
  """One instruction of an optimised HLO module."""

  name: str
  opcode: str
  category: str
  shape: str
  source: str  # the JAX op_name metadata (name stack / primitive), '' if none


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")


def _split_shape(rest: str) -> tuple[str, str]:
  """'f32[2]{0} add(%a, %b), ...' -> ('f32[2]{0}', 'add(%a, %b), ...'); tuples in parentheses."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _parse(hlo_text: str):
  """{computation: [(name, opcode, shape, rest)]} for every computation of the module."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    m = None if line.startswith(" ") else _COMPUTATION.match(line)  # instructions are indented
    if m:
      current = comps.setdefault(m.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      shape, tail = _split_shape(m.group(2))
      opcode = re.match(r"([\w\-]+)", tail)
      current.append((m.group(1), opcode.group(1) if opcode else "?", shape, tail))
  return comps


def _contents(comps, name: str, seen=None) -> tuple[set, str]:
  """Every opcode in computation ``name`` and those it calls, and their custom-call targets."""
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return set(), ""
  seen.add(name)
  opcodes, targets = set(), ""
  for _, opcode, _, tail in comps[name]:
    opcodes.add(opcode)
    targets += " " + _target(tail)
    for called in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", tail):
      more, more_targets = _contents(comps, called, seen)
      opcodes |= more
      targets += more_targets
  return opcodes, targets


def _target(tail: str) -> str:
  """An instruction's custom-call target and backend fusion kind (cuDNN, Triton GEMM), if any."""
  target = re.search(r'custom_call_target="([^"]*)"', tail)
  kind = re.search(r'"kind":"([^"]*)"', tail)
  return " ".join(m.group(1) for m in (target, kind) if m)


def _categorise(opcodes: set, target: str) -> str:
  """The category of an op (or fusion) made of ``opcodes``, calling library ``target`` if any."""
  target = target.lower()
  rules = (  # first match wins
      ("conv", "convolution" in opcodes or "conv" in target),
      ("matmul", "dot" in opcodes or any(t in target for t in ("gemm", "matmul", "cublas"))),
      ("collective", bool(opcodes & _COLLECTIVE)),
      ("gather/scatter", bool(opcodes & {"gather", "scatter"})),
      ("reduce", bool(opcodes & {"reduce", "reduce-window", "select-and-scatter", "sort"})),
      ("transpose/copy", bool(opcodes & {"transpose", "copy"})
       or bool(opcodes & _MOVEMENT and not opcodes - _MOVEMENT - _FREE)),
  )
  return next((name for name, hit in rules if hit), "elementwise")


def hlo_ops(hlo_text: str) -> dict[str, Op]:
  """Every instruction of an optimised HLO module (``compiled.as_text()``), categorised."""
  comps = _parse(hlo_text)
  ops = {}
  for instructions in comps.values():
    for name, opcode, shape, tail in instructions:
      target = _target(tail)
      if opcode in _CONTROL:
        category = "control"
      elif opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", tail)
        opcodes, targets = _contents(comps, called.group(1)) if called else (set(), "")
        category = _categorise(opcodes, target + targets)
      else:
        category = _categorise({opcode}, target)
      source = re.search(r'op_name="([^"]*)"', tail)
      ops[name] = Op(name, opcode, category, shape[:120], source.group(1) if source else "")
  return ops


def module_name(hlo_text: str) -> str:
  m = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  return m.group(1) if m else ""


def _op_events(data):
  """(hlo op name, module or None, duration ns) for every device event naming an HLO op.

  An event names its op by an ``hlo_op`` (and ``hlo_module``) stat, by a kernel ``annotation``
  stat in XLA's ``...#hlo_op=<op>,hlo_module=<module>,...#`` form (GPU kernels as the profiler
  records them), or, on an ``XLA Ops`` line, by its own name (``%fusion.3 = ...`` or
  ``fusion.3``). Where a device plane has an ``XLA Ops`` line, only that line is read, so a
  kernel is not counted both as itself and as its op.
  """
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  planes = planes or [p for p in data.planes if p.name.startswith("/host:CPU")]
  for plane in planes:
    lines = list(plane.lines)
    ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
    for line in ops_lines or lines:
      if line.name in ("XLA Modules", "Steps"):
        continue
      for event in line.events:
        stats = dict(event.stats)
        name, module = stats.get("hlo_op"), stats.get("hlo_module")
        annotation = str(stats.get("annotation") or stats.get("kernel_annotation") or "")
        if not name and "hlo_op=" in annotation:
          name = re.findall(r"hlo_op=([^,#\s]+)", annotation)[-1]
          modules = re.findall(r"hlo_module=([^,#\s]+)", annotation)
          module = module or (modules[-1] if modules else None)
        if not name and ops_lines:
          name = event.name
        if not name:
          continue
        name = str(name).split(" = ")[0].split(" ")[0].lstrip("%")
        yield name, (str(module) if module is not None else None), float(event.duration_ns)


def summarize(data, hlo_text: str, steps: int, top: int = 25) -> dict:
  """Per-step device time of the program in ``data`` (a ``ProfileData``), by category and op."""
  ops, module = hlo_ops(hlo_text), module_name(hlo_text)
  per_op = collections.defaultdict(lambda: [0.0, 0])
  missed = collections.defaultdict(float)  # op name -> ns, events of this module not in ops
  named = 0.0
  for name, ev_module, ns in _op_events(data):
    if ev_module is not None and module and not ev_module.startswith(module):
      continue
    named += ns
    if name in ops:
      per_op[name][0] += ns
      per_op[name][1] += 1
    else:
      missed[name] += ns
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  control, listed = 0.0, []
  for name, (ns, calls) in per_op.items():
    op, ms = ops[name], ns / 1e6 / steps
    if op.category == "control":
      control += ms
    else:
      by_category[op.category] += ms
      listed.append({"op": name, "category": op.category, "opcode": op.opcode, "ms": ms,
                     "calls_per_step": calls / steps, "shape": op.shape, "source": op.source})
  busy = sum(by_category.values())
  attributed = sum(ns for ns, _ in per_op.values())
  listed.sort(key=lambda r: -r["ms"])
  unattributed = [{"name": n, "ms": ns / 1e6 / steps}
                  for n, ns in sorted(missed.items(), key=lambda kv: -kv[1])[:8]]
  return {"steps": steps, "module": module, "busy_ms": busy, "control_ms": control,
          "by_category": by_category, "coverage": attributed / named if named else 0.0,
          "ops": len(listed), "top": listed[:top], "unattributed": unattributed}


def profile(step, state, hlo_text: str, steps: int, keep_dir: str | None = None):
  """Runs ``state = step(state)`` ``steps`` times under the profiler; returns (state, summary).

  ``step`` returns the next state (anything ``jax.block_until_ready`` accepts); ``hlo_text`` is
  the compiled program's ``as_text()``. With ``keep_dir`` the trace stays there (for TensorBoard
  or Perfetto, or this module's command line) beside the HLO text as ``program.hlo.txt``.
  """
  with tempfile.TemporaryDirectory(prefix="drt_jax_trace_") as tmp:
    trace_dir = keep_dir or tmp
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state = jax.block_until_ready(step(state))
    paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    if keep_dir:
      with open(os.path.join(keep_dir, "program.hlo.txt"), "w") as f:
        f.write(hlo_text)
    data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
    return state, summarize(data, hlo_text, steps)


def per_step(summary: dict, calls_per_step: int) -> dict:
  """``summary`` of a program that runs ``calls_per_step`` training steps per call, per step."""
  n = calls_per_step
  return {**summary, "busy_ms": summary["busy_ms"] / n, "control_ms": summary["control_ms"] / n,
          "by_category": {c: ms / n for c, ms in summary["by_category"].items()},
          "top": [{**r, "ms": r["ms"] / n, "calls_per_step": r["calls_per_step"] / n}
                  for r in summary["top"]],
          "unattributed": [{**m, "ms": m["ms"] / n} for m in summary.get("unattributed", [])]}


def category_table(profiles: dict[str, dict]) -> str:
  """Markdown: device ms per step by category, one column per variant (``{variant: summary}``)."""
  names = list(profiles)
  lines = ["| category | " + " | ".join(f"{n} ms/step" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  for cat in CATEGORIES:
    cells = [profiles[n]["by_category"][cat] for n in names]
    if any(cells):
      lines.append(f"| {cat} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
  lines.append("| **device busy** | " + " | ".join(
      f"**{profiles[n]['busy_ms']:.2f}**" for n in names) + " |")
  lines.append("| coverage | " + " | ".join(
      f"{profiles[n]['coverage']:.0%}" for n in names) + " |")
  return "\n".join(lines)


def top_table(summary: dict, count: int = 12) -> str:
  lines = ["| op | category | ms/step | calls/step | shape | JAX source |",
           "|---|---|---|---|---|---|"]
  for r in summary["top"][:count]:
    lines.append(f"| {r['op']} | {r['category']} | {r['ms']:.3f} | {r['calls_per_step']:g} | "
                 f"`{r['shape'][:48]}` | {r['source'][-60:]} |")
  missed = summary.get("unattributed")
  if missed and summary["coverage"] < 0.9:  # what the trace named that the program does not
    lines += ["", "Not in the program's HLO: " + ", ".join(
        f"{m['name'][:60]} ({m['ms']:.3f} ms/step)" for m in missed)]
  return "\n".join(lines)


def main(argv):
  import argparse
  parser = argparse.ArgumentParser(description="Summarise a saved trace against its HLO text.")
  parser.add_argument("trace", help="a .xplane.pb written by jax.profiler")
  parser.add_argument("hlo", help="the traced program's optimised HLO (compiled.as_text())")
  parser.add_argument("--steps", type=int, default=1, help="calls of the program in the trace")
  args = parser.parse_args(argv)
  with open(args.hlo) as f:
    hlo_text = f.read()
  s = summarize(jax.profiler.ProfileData.from_file(args.trace), hlo_text, args.steps)
  print(category_table({s["module"]: s}) + "\n\n" + top_table(s))


if __name__ == "__main__":
  main(sys.argv[1:])
