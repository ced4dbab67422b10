"""Mean ± std over seeds (sample std, ddof=1; 0 for one seed), and paired comparisons of two variants.

``paired(a, b)`` compares two lists of per-seed values that are paired by seed (the same seed gives
both variants the same initial convs, batch order and augmentation): the differences a - b, a paired
t-test (two-sided p, 95 % t interval; scipy, which scikit-learn, the experiments extra, requires)
and a seeded percentile bootstrap interval of the mean difference (numpy). With 5 seeds the
bootstrap interval is narrower than the t interval (it cannot see beyond the 5 values); the t
interval is the one the docs' "held?" column reads.
"""
from __future__ import annotations

import math
import statistics

import numpy as np


def summary(values) -> dict:
    values = [float(v) for v in values]
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def paired(a, b, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Paired comparison of per-seed values ``a`` and ``b`` (lists, or ``summary`` dicts): a - b.

    Returns ``{"n", "diff" (summary of a - b), "t", "p", "ci_t" [lo, hi], "ci_boot" [lo, hi],
    "wins" (seeds with a > b), "confidence"}``. With one pair, or when every difference is the same
    (no spread), t, p and the intervals are None where undefined (JSON-safe: no NaN); constant
    differences give the degenerate interval [d, d] from the bootstrap.
    """
    a = a["values"] if isinstance(a, dict) else a
    b = b["values"] if isinstance(b, dict) else b
    try:
        a, b = [float(v) for v in a], [float(v) for v in b]
    except TypeError:
        raise TypeError("paired expects two sequences of numbers (or summary dicts with 'values')") from None
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be non-empty and paired by seed (same length), got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    out = {"n": n, "diff": summary(d.tolist()), "t": None, "p": None, "ci_t": None, "ci_boot": None,
           "wins": int((d > 0).sum()), "confidence": confidence}
    if n < 2:
        return out
    alpha = 1.0 - confidence
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    out["ci_boot"] = [float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))]
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(float(d.mean()))):  # every seed gives the same difference (to rounding): no t
        return out
    try:
        from scipy import stats as sps
    except ImportError:  # scikit-learn requires scipy, so only a bare install gets here
        return out
    se = sd / math.sqrt(n)
    t = float(d.mean()) / se
    half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * se
    out["t"] = _finite_or_none(t)
    out["p"] = _finite_or_none(2 * sps.t.sf(abs(t), n - 1))
    out["ci_t"] = [float(d.mean()) - half, float(d.mean()) + half]
    return out


def fmt_paired(c: dict, scale: float = 100.0, digits: int = 1) -> list[str]:
    """[difference, t interval, p, bootstrap interval, wins/n] of ``paired``'s result as table cells."""
    def interval(ci):
        return "–" if ci is None else f"[{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"

    p = "–" if c["p"] is None else (f"{c['p']:.3f}" if c["p"] >= 0.001 else f"{c['p']:.1e}")
    return [f"{c['diff']['mean'] * scale:+.{digits}f}", interval(c["ci_t"]), p, interval(c["ci_boot"]),
            f"{c['wins']}/{c['n']}"]


# the comparisons of issue 24, (a, b) read as a - b: does the controller beat the plain network, its own
# initial value as a constant, and a learned per-block scalar; and does the constant alone beat plain?
COMPARISONS = (("tsc_lstm", "plain"), ("tsc_lstm", "dt=0.5"), ("tsc_lstm", "tsc_indp"), ("dt=0.5", "plain"))


def comparisons(values: dict, pairs=COMPARISONS) -> dict:
    """``{"a - b": paired(values[a], values[b])}`` for every pair whose two variants are in ``values``
    (variant -> per-seed values or summary)."""
    return {f"{a} - {b}": paired(values[a], values[b]) for a, b in pairs if a in values and b in values}
