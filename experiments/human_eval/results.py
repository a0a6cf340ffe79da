"""`personafuse human-eval import OUT`: verdicts -> win/tie/loss rates with intervals, and agreement.

Rates: per comparison X vs Y, the share of verdicts preferring X (win), neither (tie) or Y (loss).
Their 95% intervals resample pairs, not verdicts (datamodules/benchmarks/stats.py, the suite's one
bootstrap), because the raters of one pair share its replies. Agreement: Cohen's kappa when two
raters rated the overlap, Fleiss' kappa for more, both from torchmetrics (a declared dependency),
on the raw A/B/tie answers of the overlap pairs every one of those raters has rated.

Everything goes to the evaluate stage's MLflow run (metrics `human/<X>_vs_<Y>/win_rate` ...,
`human/kappa`), to its comparison table (columns `human/win_rate_vs_<Y>` on X's row) and charts
(human_eval.png). The verdict files are read, never rewritten.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datamodules.benchmarks.stats import bootstrap_intervals
from datamodules.io import DataError, read_json
from experiments.human_eval import CHOICES, VERDICTS_DIR
from experiments.human_eval.study import load_key, load_study, unblind
from experiments.human_eval.verdicts import read_verdicts

OUTCOMES = ("win", "tie", "loss")


@dataclass
class Comparison:
    """Rates for one comparison X vs Y; `rates` holds `<outcome>_rate` and their `_ci_low/_ci_high`."""

    left: str
    right: str
    verdicts: int
    pairs: int
    rates: dict[str, float]

    @property
    def name(self) -> str:
        return f"{self.left}_vs_{self.right}"


def collect_verdicts(out: str | Path) -> dict[str, dict[str, str]]:
    """pair id -> rater -> choice, from every verdicts/<rater>.jsonl (each line checked)."""
    out = Path(out)
    _, assignments = load_study(out)
    by_pair: dict[str, dict[str, str]] = {}
    for path in sorted((out / VERDICTS_DIR).glob("*.jsonl")):
        rater = path.stem
        if rater not in assignments:
            raise DataError(f"{path}: no rater '{rater}' in assignments.json (raters: {', '.join(assignments)})")
        for verdict in read_verdicts(out, rater, assignments[rater]):
            by_pair.setdefault(verdict["pair_id"], {})[rater] = verdict["choice"]
    return by_pair


def _aggregate(records: list[dict]) -> dict[str, float]:
    counts = Counter(o for r in records for o in r["outcomes"])
    total = sum(counts.values())
    return {f"{o}_rate": counts[o] / total if total else math.nan for o in OUTCOMES}


def comparisons(key: dict, by_pair: dict[str, dict[str, str]], samples: int, seed: int) -> list[Comparison]:
    """Win/tie/loss rates of each comparison, seen from its first system, with pair-resampled intervals."""
    out = []
    for left, right in key["comparisons"]:
        records = []
        for pair_id, entry in key["pairs"].items():
            if entry["comparison"] != [left, right] or pair_id not in by_pair:
                continue
            preferred = [unblind(key, pair_id, c) for c in by_pair[pair_id].values()]
            records.append({"outcomes": ["tie" if p is None else "win" if p == left else "loss" for p in preferred]})
        rates = _aggregate(records)
        rates.update(bootstrap_intervals(_aggregate, records, samples, seed))
        out.append(Comparison(left, right, sum(len(r["outcomes"]) for r in records), len(records), rates))
    return out


def agreement(by_pair: dict[str, dict[str, str]], overlap: list[str]) -> dict:
    """{kappa, method, items, raters} on the overlap pairs that every rater who rated any of them rated."""
    raters = sorted({r for p in overlap for r in by_pair.get(p, {})})
    items = [p for p in overlap if raters and all(r in by_pair.get(p, {}) for r in raters)]
    result = {"kappa": math.nan, "method": "none", "items": len(items), "raters": len(raters)}
    if len(raters) < 2 or not items:
        return result
    labels = [[CHOICES.index(by_pair[p][r]) for r in raters] for p in items]
    result.update(kappa=kappa(labels), method="cohen" if len(raters) == 2 else "fleiss")
    return result


def kappa(labels: list[list[int]], categories: int = len(CHOICES)) -> float:
    """Cohen's kappa for two raters, Fleiss' for more; labels[item][rater] in 0..categories-1.
    NaN when chance agreement is total (every answer the same): kappa is undefined there."""
    import torch
    from torchmetrics.functional.classification import multiclass_cohen_kappa
    from torchmetrics.functional.nominal import fleiss_kappa

    table = torch.tensor(labels)
    if table.shape[1] == 2:
        value = multiclass_cohen_kappa(table[:, 0], table[:, 1], num_classes=categories)
    else:
        counts = torch.nn.functional.one_hot(table, categories).sum(dim=1)
        value = fleiss_kappa(counts, mode="counts")
    return float(value)


def human_metrics(results: list[Comparison], agree: dict) -> dict[str, float]:
    """The evaluate run's metrics: `human/<X>_vs_<Y>/<rate>` (+ interval), counts, and `human/kappa`."""
    out: dict[str, float] = {}
    for c in results:
        out.update({f"human/{c.name}/{k}": v for k, v in c.rates.items()})
        out[f"human/{c.name}/verdicts"], out[f"human/{c.name}/pairs"] = float(c.verdicts), float(c.pairs)
    out["human/kappa_items"], out["human/kappa_raters"] = float(agree["items"]), float(agree["raters"])
    if math.isfinite(agree["kappa"]):
        out["human/kappa"] = agree["kappa"]
    return out


def table_columns(results: list[Comparison]) -> dict[str, dict[str, float]]:
    """Comparison-table cells: on X's row, `human/<rate>_vs_<Y>` and their intervals."""
    rows: dict[str, dict[str, float]] = {}
    for c in results:
        for key, value in c.rates.items():
            rate, _, suffix = key.partition("_rate")
            rows.setdefault(c.left, {})[f"human/{rate}_rate_vs_{c.right}{suffix}"] = value
    return rows


def _fmt(c: Comparison, outcome: str) -> str:
    r = c.rates
    value, low, high = r[f"{outcome}_rate"], r.get(f"{outcome}_rate_ci_low"), r.get(f"{outcome}_rate_ci_high")
    if math.isnan(value):
        return "—"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None and math.isfinite(low) else f"{value:.3f}"


def markdown(results: list[Comparison], agree: dict) -> str:
    """human_eval.md: one row per comparison, then the agreement line."""
    lines = ["| comparison | pairs | verdicts | win [95% CI] | tie [95% CI] | loss [95% CI] |", "|---|---|---|---|---|---|"]
    lines += [f"| {c.left} vs {c.right} | {c.pairs} | {c.verdicts} | " + " | ".join(_fmt(c, o) for o in OUTCOMES) + " |"
              for c in results]
    k = agree["kappa"]
    shown = f"{k:.3f}" if math.isfinite(k) else "undefined"
    lines += ["", f"Agreement: {agree['method']} kappa = {shown} on {agree['items']} overlap pairs, {agree['raters']} raters."]
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: Path) -> tuple[str, Optional[str]]:
    """(evaluate stage's MLflow run id, the pipeline's tracking URI) from the run folder's state files."""
    state = read_json(run_dir / "evaluate" / "state.json") or {}
    if not state.get("run_id"):
        raise DataError(f"{run_dir / 'evaluate' / 'state.json'}: no evaluate run id (has the evaluate stage run?)")
    return state["run_id"], (read_json(run_dir / "run_state.json") or {}).get("tracking_uri")


def summarise(out: str | Path, samples: int, seed: int) -> tuple[list[Comparison], dict]:
    """Check every verdict file, then compute the rates and the agreement."""
    key, by_pair = load_key(out), collect_verdicts(out)
    if not by_pair:
        raise DataError(f"{Path(out) / VERDICTS_DIR}: no verdicts yet (raters use `personafuse human-eval serve`)")
    return comparisons(key, by_pair, samples, seed), agreement(by_pair, key.get("overlap_pairs", []))
