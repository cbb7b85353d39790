"""Seed statistics and the verdict of one ablation comparison.

A comparison asks whether ``treatment`` beats ``control`` in the direction the paper claims
(``expect_higher``: the treatment's metric should be larger). With n_t and n_c seeds, means m_t,
m_c and sample standard deviations s_t, s_c, the difference d = m_t - m_c has the standard error

    se = sqrt(s_t^2 / n_t + s_c^2 / n_c)

and the verdict is

- ``reproduced``: d points the paper's way and |d| > 2 se (about a 95 % two-sided band) and
  |d| > ``min_effect`` (a floor in metric points, so that seeds which agree by chance, with a tiny
  se, cannot call a 0.1-point gap a result);
- ``reversed``: the same two conditions, the other way;
- ``within noise``: otherwise, and whenever either side has fewer than 2 seeds with a finite value
  (no spread can be estimated from one seed).
"""

import math
from typing import Dict, Iterable, Optional, Sequence

__all__ = ["REPRODUCED", "REVERSED", "WITHIN_NOISE", "seed_stats", "verdict", "fmt_stats"]

REPRODUCED, REVERSED, WITHIN_NOISE = "reproduced", "reversed", "within noise"


def _finite(values: Iterable) -> list:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def seed_stats(values: Sequence) -> Dict[str, float]:
    """Mean, sample standard deviation (n - 1) and count of the finite values (None / nan are
    left out: a metric undefined for one seed, e.g. a recall over zero triplets)."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n}


def verdict(
    treatment: Sequence, control: Sequence, expect_higher: bool = True, min_effect: float = 0.5
) -> Dict[str, float]:
    """Compare per-seed values of ``treatment`` against ``control`` (see the module doc).

    Returns {"verdict", "diff" (treatment - control), "se"}.
    """
    t, c = seed_stats(treatment), seed_stats(control)
    if t["n"] < 2 or c["n"] < 2:
        diff = t["mean"] - c["mean"] if t["n"] and c["n"] else float("nan")
        return {"verdict": WITHIN_NOISE, "diff": diff, "se": float("nan")}
    diff = t["mean"] - c["mean"]
    se = math.sqrt(t["std"] ** 2 / t["n"] + c["std"] ** 2 / c["n"])
    if abs(diff) <= max(2.0 * se, min_effect):
        result = WITHIN_NOISE
    elif (diff > 0) == expect_higher:
        result = REPRODUCED
    else:
        result = REVERSED
    return {"verdict": result, "diff": diff, "se": se}


def fmt_stats(values: Sequence, digits: Optional[int] = None) -> str:
    """``mean ± std`` with ``digits`` decimals; by default one, or 4 for values below 0.1 (``n/a``
    when no seed gave a finite value). A loss column passes 4, so that its rows read alike."""
    s = seed_stats(values)
    if s["n"] == 0:
        return "n/a"
    if digits is None:
        digits = 4 if 0 < abs(s["mean"]) < 0.1 else 1
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
