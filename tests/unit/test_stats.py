"""Bootstrap intervals and paired differences (datamodules/benchmarks/stats.py)."""
from __future__ import annotations

import math

import pytest

from datamodules.benchmarks.base import mean
from datamodules.benchmarks.stats import bootstrap_intervals, paired_difference


def accuracy(records: list[dict]) -> dict[str, float]:
    return {"toy/accuracy": mean(r["correct"] for r in records)}


def test_interval_of_a_proportion_matches_the_normal_approximation():
    records = [{"correct": float(i % 2)} for i in range(100)]  # p = 0.5, n = 100: se = 0.05
    ci = bootstrap_intervals(accuracy, records, samples=2000, seed=1)
    assert ci["toy/accuracy_ci_low"] == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02)
    assert ci["toy/accuracy_ci_high"] == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_intervals(accuracy, records, samples=200, seed=1) == bootstrap_intervals(accuracy, records, samples=200, seed=1)


def test_interval_narrows_with_more_items():
    small = bootstrap_intervals(accuracy, [{"correct": float(i % 2)} for i in range(20)], samples=500)
    large = bootstrap_intervals(accuracy, [{"correct": float(i % 2)} for i in range(400)], samples=500)
    width = lambda ci: ci["toy/accuracy_ci_high"] - ci["toy/accuracy_ci_low"]  # noqa: E731
    assert width(large) < width(small) / 3


def test_paired_difference_is_zero_for_the_same_answers_and_clear_for_a_consistent_gain():
    base = [{"correct": float(i % 3 == 0)} for i in range(60)]
    same = paired_difference(accuracy, base, base, samples=300)["toy/accuracy"]
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "excludes_zero": False}
    better = [{"correct": 1.0 if i % 3 == 0 or i % 3 == 1 else 0.0} for i in range(60)]
    gain = paired_difference(accuracy, better, base, samples=300)["toy/accuracy"]
    assert gain["diff"] == pytest.approx(1 / 3) and gain["excludes_zero"] and gain["ci_low"] > 0.2


def test_a_small_noisy_difference_is_not_called_a_gain():
    base = [{"correct": float(i % 2)} for i in range(20)]
    flipped = [dict(r) for r in base]
    flipped[0]["correct"] = 1.0  # one item better out of 20
    diff = paired_difference(accuracy, flipped, base, samples=500)["toy/accuracy"]
    assert diff["diff"] == pytest.approx(0.05) and not diff["excludes_zero"]


def test_undefined_metrics_give_nan_bounds_and_misaligned_records_fail():
    def parsed_score(records):
        scores = [r["score"] for r in records if r["score"] is not None]
        return {"toy/score": mean(scores) if scores else math.nan}

    ci = bootstrap_intervals(parsed_score, [{"score": None}] * 10, samples=200)
    assert math.isnan(ci["toy/score_ci_low"])
    with pytest.raises(ValueError, match="item-aligned"):
        paired_difference(accuracy, [{"correct": 1.0}], [], samples=10)
