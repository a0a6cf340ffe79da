"""Where `human-eval import` puts its results: the evaluate stage folder and its MLflow run.

Files (in <run>/evaluate/, logged under the run's artifacts): human_eval.md and .csv (one row per
comparison), human_eval.png (win/tie/loss bars with the win rate's interval), and the comparison
table (comparison.csv/.md, the MLflow `comparison_table.json`, the benchmark chart) redrawn with
the human columns. A copy of the key and the verdict files goes to `human_eval/study/`, so the
evidence behind the numbers sits with them.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

import yaml

from datamodules.io import atomic_write_bytes, atomic_write_text
from experiments.human_eval import KEY_FILE, VERDICTS_DIR
from experiments.human_eval.results import (OUTCOMES, Comparison, evaluate_run, human_metrics, markdown, summarise,
                                            table_columns)
from experiments.human_eval.study import load_key

COLOURS = {"win": "#3a7d44", "tie": "#b0b0b0", "loss": "#b5473a"}


def import_study(out: str | Path, run_dir: Optional[str | Path] = None, tracking_uri: Optional[str] = None) -> dict:
    """Compute, write and log everything; returns {comparisons, agreement, run_id, table}."""
    from experiments import tracking
    from experiments.pipeline import StageContext
    import mlflow

    out = Path(out)
    key = load_key(out)
    run_dir = Path(run_dir or key["run_dir"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    results, agree = summarise(out, config["evaluate"]["bootstrap_samples"], config["evaluate"]["bootstrap_seed"])
    run_id, logged_uri = evaluate_run(run_dir)
    uri = tracking_uri or logged_uri or tracking.resolve_tracking_uri()
    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    ctx = StageContext(config, "evaluate", run_dir / "evaluate", run_dir, uri, experiment_id, run_id)
    ctx.log_metrics(human_metrics(results, agree))
    for path in _write_files(ctx.stage_dir, results, agree):
        ctx.log_artifact(path, "human_eval")
    ctx.log_artifact(out / KEY_FILE, "human_eval/study")
    if (out / VERDICTS_DIR).is_dir():
        ctx.log_artifact(out / VERDICTS_DIR, f"human_eval/study/{VERDICTS_DIR}")
    table = _update_comparison(ctx, results)
    return {"comparisons": results, "agreement": agree, "run_id": run_id, "table": table}


def _write_files(folder: Path, results: list[Comparison], agree: dict) -> list[Path]:
    md, table, chart = folder / "human_eval.md", folder / "human_eval.csv", folder / "human_eval.png"
    atomic_write_text(md, markdown(results, agree))
    atomic_write_text(table, _csv(results))
    atomic_write_bytes(chart, plot(results, agree))
    return [md, table, chart]


def _csv(results: list[Comparison]) -> str:
    keys = [f"{o}_rate{s}" for o in OUTCOMES for s in ("", "_ci_low", "_ci_high")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["system", "other", "pairs", "verdicts", *keys])
    writer.writerows([[c.left, c.right, c.pairs, c.verdicts, *(c.rates.get(k, "") for k in keys)] for c in results])
    return buffer.getvalue()


def _update_comparison(ctx, results: list[Comparison]) -> Path:
    """The evaluate comparison table with this import's human columns (an earlier import's replaced)."""
    from lightning_modules.evaluate import HEADLINE_METRICS
    from lightning_modules.evaluate_report import log_comparison

    metrics = read_comparison(ctx.stage_dir / "comparison.csv")
    metrics = {s: {k: v for k, v in m.items() if not k.startswith("human/")} for s, m in metrics.items()}
    for system, cells in table_columns(results).items():
        metrics.setdefault(system, {}).update(cells)
    return log_comparison(ctx, metrics, HEADLINE_METRICS)


def read_comparison(path: Path) -> dict[str, dict[str, float]]:
    """comparison.csv back as system -> metric -> value (blank cells absent)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0][1:]
    return {row[0]: {k: float(v) for k, v in zip(header, row[1:]) if v != ""} for row in rows[1:]}


def plot(results: list[Comparison], agree: dict) -> bytes:
    """Stacked win/tie/loss bars per comparison, the win rate's 95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.55 * len(results)))
    labels = [f"{c.left} vs {c.right} (n={c.verdicts})" for c in results]
    left = [0.0] * len(results)
    for outcome in OUTCOMES:
        values = [_finite(c.rates[f"{outcome}_rate"]) for c in results]
        ax.barh(labels, values, left=left, color=COLOURS[outcome], label=outcome)
        left = [a + b for a, b in zip(left, values)]
    wins = [_finite(c.rates["win_rate"]) for c in results]
    low = [w - _finite(c.rates.get("win_rate_ci_low"), w) for w, c in zip(wins, results)]
    high = [_finite(c.rates.get("win_rate_ci_high"), w) - w for w, c in zip(wins, results)]
    ax.errorbar(wins, labels, xerr=[low, high], fmt="none", ecolor="black", capsize=3)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    kappa = agree["kappa"]
    ax.set_title(f"Human preference ({agree['method']} kappa "
                 f"{kappa:.2f})" if math.isfinite(kappa) else "Human preference (agreement undefined)", fontsize=10)
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _finite(value, default: float = 0.0) -> float:
    return value if value is not None and math.isfinite(value) else default
