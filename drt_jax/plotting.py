"""Figures of training histories, written to PNG files.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), not pyplot, so
they need no display and leave the caller's matplotlib backend (e.g. a notebook's) untouched.
"""

from matplotlib.figure import Figure

from drt_jax import workdir

DEFAULT_METRICS = (
    ("test_acc_mean", "mean test accuracy"),
    ("gen_gap", "generalization gap (train - test acc)"),
    ("consensus_distance", "consensus distance"),
    ("output_disagreement", "output disagreement"),
)


def plot_histories(histories: dict, path: str, metrics=DEFAULT_METRICS) -> str:
  """One panel per metric, one line per run; ``histories`` maps a label to a history list."""
  fig = Figure(figsize=(4.2 * len(metrics), 3.4))
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  for ax, (key, title) in zip(axes, metrics):
    for label, history in histories.items():
      rows = [r for r in history if r.get(key) is not None]
      ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if key in ("consensus_distance", "output_disagreement"):
      ax.set_yscale("symlog", linthresh=1e-6)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  workdir.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110))
  return path


def plot_self_weights(history: list, path: str, title: str | None = None) -> str | None:
  """DRT's mean self-weight per layer vs step (``self_weight/<layer>`` columns); None if absent."""
  layers = sorted({k.split("/", 1)[1] for r in history for k in r if k.startswith("self_weight/")})
  if not layers:
    return None
  fig = Figure(figsize=(5.6, 3.6))
  ax = fig.subplots()
  for layer in layers:
    rows = [r for r in history if r.get(f"self_weight/{layer}") is not None]
    ax.plot([r["step"] for r in rows], [r[f"self_weight/{layer}"] for r in rows], label=layer)
  ax.set_xlabel("step")
  ax.set_ylabel("mean self-weight a_kk")
  ax.set_title(title or "DRT self-weight per layer", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  fig.tight_layout()
  workdir.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110))
  return path
