"""Bootstrap intervals for every benchmark metric, and paired differences between two systems.

Generic on purpose: a benchmark's metrics are `aggregate(records)`, so resampling its records with
replacement and aggregating again gives each metric's sampling distribution without any
per-benchmark code (percentile bootstrap, seeded, so reruns give the same interval). Two systems
evaluated on the same items are compared item by item: the same resampled indices feed both, and
the interval of the difference says whether it is distinguishable from 0 at this sample size.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Aggregate = Callable[[list[dict]], dict[str, float]]
CI_SUFFIXES = ("_ci_low", "_ci_high")


def _indices(n: int, samples: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(samples)]


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of the finite values (NaN when fewer than half are finite)."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if len(finite) < max(1, len(values) // 2):
        return math.nan
    pos = q * (len(finite) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return finite[lo] + (finite[hi] - finite[lo]) * (pos - lo)


def bootstrap_intervals(
    aggregate: Aggregate, records: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """`<metric>_ci_low` / `<metric>_ci_high` for every metric `aggregate` returns on `records`."""
    if not records or samples < 1:
        return {}
    draws: dict[str, list[float]] = {}
    for idx in _indices(len(records), samples, seed):
        for key, value in aggregate([records[i] for i in idx]).items():
            draws.setdefault(key, []).append(float(value))
    return _bounds(draws, level)


def paired_difference(
    aggregate: Aggregate, records: list[dict], baseline: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float]]:
    """metric -> {diff, ci_low, ci_high, excludes_zero} for system minus baseline on the same items.

    Records must be item-aligned (the same benchmark items in the same order), which the benchmarks
    guarantee: their items are a deterministic function of (file, limit, seed).
    """
    if len(records) != len(baseline) or not records:
        raise ValueError(f"paired bootstrap needs item-aligned records ({len(records)} vs {len(baseline)})")
    point_a, point_b = aggregate(records), aggregate(baseline)
    draws: dict[str, list[float]] = {}
    for idx in _indices(len(records), samples, seed):
        a, b = aggregate([records[i] for i in idx]), aggregate([baseline[i] for i in idx])
        for key in a.keys() & b.keys():
            draws.setdefault(key, []).append(float(a[key]) - float(b[key]))
    bounds = _bounds(draws, level)
    out = {}
    for key in sorted(draws):
        low, high = bounds[f"{key}_ci_low"], bounds[f"{key}_ci_high"]
        out[key] = {"diff": float(point_a[key]) - float(point_b[key]), "ci_low": low, "ci_high": high,
                    "excludes_zero": bool(low > 0 or high < 0)}
    return out


def _bounds(draws: dict[str, list[float]], level: float) -> dict[str, float]:
    tail = (1 - level) / 2
    out = {}
    for key, values in draws.items():
        out[f"{key}_ci_low"] = _percentile(values, tail)
        out[f"{key}_ci_high"] = _percentile(values, 1 - tail)
    return out


def is_interval_key(key: str) -> bool:
    return key.endswith(CI_SUFFIXES)
