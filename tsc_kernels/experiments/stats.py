"""Mean ± std over seeds (sample std, ddof=1; 0 for one seed)."""
from __future__ import annotations

import statistics


def summary(values) -> dict:
    values = [float(v) for v in values]
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"
