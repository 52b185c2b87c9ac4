"""Figures of training histories (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_METRICS = (
    ("test_acc_mean", "mean test accuracy"),
    ("gen_gap", "generalization gap (train - test acc)"),
    ("consensus_distance", "consensus distance"),
    ("output_disagreement", "output disagreement"),
)


def plot_histories(histories: dict, path: str, metrics=DEFAULT_METRICS) -> str:
  """One panel per metric, one line per run; ``histories`` maps a label to a history list."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
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
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
