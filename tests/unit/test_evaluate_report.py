"""The trait-check table: high − low MPI score per trait, raw and with acquiescence taken out."""
from __future__ import annotations

import pytest

from lightning_modules.evaluate_report import TRAIT_SHIFT_HEADER, _markdown, trait_shift_rows


def mpi(expected: float, adjusted: float, acquiescence: float, trait: str = "extraversion") -> dict:
    return {f"mpi/{trait}_expected": expected, f"mpi/{trait}_adjusted": adjusted, "mpi/acquiescence": acquiescence}


def test_trait_shift_rows_only_for_traits_with_both_poles_evaluated():
    metrics = {"base": mpi(3.3, 3.0, 3.6),
               "expert_extraversion_high": mpi(3.2, 3.1, 3.4), "expert_extraversion_low": mpi(3.5, 2.9, 3.8),
               "expert_openness_high": mpi(3.0, 3.0, 3.5, "openness")}   # no openness_low: no row
    rows = trait_shift_rows(metrics)
    assert [r[0] for r in rows] == ["extraversion"]
    assert rows[0][1:] == pytest.approx([-0.3, 0.2, 3.4, 3.8])
    table = _markdown(TRAIT_SHIFT_HEADER, rows)
    assert "| extraversion | -0.300 | 0.200 | 3.400 | 3.800 |" in table


def test_trait_shift_rows_without_adjusted_scores():
    metrics = {"expert_neuroticism_high": {"mpi/neuroticism_expected": 3.1},
               "expert_neuroticism_low": {"mpi/neuroticism_expected": 3.0}}
    (row,) = trait_shift_rows(metrics)
    assert row[1] == pytest.approx(0.1) and row[2:] == [None, None, None]
    assert trait_shift_rows({"base": {"mpi/neuroticism_expected": 3.0}}) == []
