"""Paired differences with confidence intervals, and the verdict words of a claim.

A claim compares two methods run with the same seeds (same seed: same partition, same initial
weights, same batches), so the unit of evidence is the per-seed difference. Its 95 % interval is
Student's t interval of the mean difference (n - 1 degrees of freedom); no normal approximation,
which would be too narrow at 8 seeds. The t quantile is found by bisection on the t distribution's
CDF (a regularized incomplete beta function), so nothing beyond jax and numpy is needed.

Verdicts, for a claim that method A is better than method B by at least ``margin`` (a smallest
effect of interest, declared with the claim): with the interval [lo, hi] of the difference
oriented so that positive favours A,

  supported        lo > 0: A is better, beyond the seeds' noise;
  not supported    hi < margin: any advantage of A is smaller than the margin (or A is worse);
  inconclusive     otherwise: the seeds cannot tell.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

VERDICTS = ("supported", "not supported", "inconclusive")


def _t_cdf(t: float, df: int) -> float:
  from jax.scipy.special import betainc  # noqa: PLC0415 -- keeps `import stats` light

  x = df / (df + t * t)
  tail = 0.5 * float(betainc(df / 2.0, 0.5, x))
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
  """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0.5 < p < 1)."""
  if not 0.5 < p < 1.0 or df < 1:
    raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
  lo, hi = 0.0, 1e3
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
  return 0.5 * (lo + hi)


class Paired(NamedTuple):
  """A paired difference: its mean, 95 % interval, the number of pairs and the seeds used."""

  mean: float
  lo: float
  hi: float
  n: int
  seeds: tuple


def paired(a: dict, b: dict, level: float = 0.95) -> Paired | None:
  """The difference a - b over the seeds both have: ``a``, ``b`` map seed -> value.

  None with fewer than two common seeds (no interval).
  """
  seeds = tuple(sorted(set(a) & set(b)))
  if len(seeds) < 2:
    return None
  d = np.array([a[s] - b[s] for s in seeds], dtype=float)
  mean, sd = float(d.mean()), float(d.std(ddof=1))
  half = t_quantile(0.5 + level / 2.0, len(d) - 1) * sd / math.sqrt(len(d))
  return Paired(mean, mean - half, mean + half, len(d), seeds)


def verdict(diff: Paired, margin: float) -> str:
  """One of :data:`VERDICTS` for a difference oriented so that positive supports the claim."""
  if diff.lo > 0:
    return "supported"
  if diff.hi < margin:
    return "not supported"
  return "inconclusive"


def interval(diff: Paired, fmt: str = "+.4f") -> str:
  """``+0.0123 [+0.0050, +0.0196]``: the mean difference and its interval, as reports print it."""
  return f"{format(diff.mean, fmt)} [{format(diff.lo, fmt)}, {format(diff.hi, fmt)}]"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
