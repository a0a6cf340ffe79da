"""The ranked trial table: CSV and Markdown in the sweep folder, metrics on the parent run, the console."""
from __future__ import annotations

import csv
import io
from typing import Any

from rich.console import Console

from datamodules.io import atomic_write_text
from experiments.sweep.schema import Sweep
from experiments.sweep.state import FINISHED, SweepState


def ranked_rows(sweep: Sweep, state: SweepState, trial_ids: list[str]) -> list[dict[str, Any]]:
    """This plan's trials, best objective first; failed trials last."""
    sign = -1.0 if sweep.spec.objective.direction == "maximize" else 1.0
    records = [(tid, state.trials[tid]) for tid in trial_ids if tid in state.trials]
    done = sorted((r for r in records if r[1].get("objective") is not None), key=lambda r: sign * r[1]["objective"])
    rest = [r for r in records if r[1].get("objective") is None]
    rows = []
    for rank, (tid, rec) in enumerate(done + rest, 1):
        duration = (rec.get("ended") or 0) - (rec.get("started") or 0)
        rows.append({"rank": rank if rec.get("objective") is not None else None, "trial": tid,
                     "status": rec.get("status"), sweep.spec.objective.metric: rec.get("objective"),
                     **rec.get("params", {}),
                     "duration_s": round(duration, 1) if duration > 0 else None,
                     "pipeline_run_id": rec.get("pipeline_run_id"), "error": rec.get("error")})
    return rows


def failed_count(rows: list[dict[str, Any]]) -> int:
    """Rows whose trial did not finish."""
    return sum(r["status"] != FINISHED for r in rows)


def report(sweep: Sweep, rows: list[dict[str, Any]], uri: str, parent: str) -> None:
    """Ranked table: printed, written as CSV and Markdown in the sweep folder, logged on the parent run."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    shown = [c for c in columns if c not in ("pipeline_run_id", "error")]
    _write_tables(sweep, rows, columns, shown)
    _log_on_parent(sweep, rows, uri, parent)
    _print_table(sweep, rows, shown)


def _title(sweep: Sweep) -> str:
    return f"{sweep.spec.objective.metric} ({sweep.spec.objective.direction})"


def _write_tables(sweep: Sweep, rows: list[dict[str, Any]], columns: list[str], shown: list[str]) -> None:
    """trials.csv (every column) and trials.md (without run ids and errors) in the sweep folder."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep.folder / "trials.csv", buffer.getvalue())
    md = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    atomic_write_text(sweep.folder / "trials.md", f"# Sweep {sweep.name}: trials ranked by {_title(sweep)}\n\n" + "\n".join(md) + "\n")


def _log_on_parent(sweep: Sweep, rows: list[dict[str, Any]], uri: str, parent: str) -> None:
    """The tables as artifacts, trial counts and the best objective as metrics, the best trial as a tag."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    for name in ("trials.csv", "trials.md"):
        client.log_artifact(parent, str(sweep.folder / name), "sweep")
    best = next((r for r in rows if r["rank"] == 1), None)
    failed = failed_count(rows)
    client.log_metric(parent, "sweep/finished_trials", len(rows) - failed)
    client.log_metric(parent, "sweep/failed_trials", failed)
    if best:
        client.log_metric(parent, "sweep/best_objective", best[sweep.spec.objective.metric])
        client.set_tag(parent, "sweep.best_trial", best["trial"])


def _print_table(sweep: Sweep, rows: list[dict[str, Any]], shown: list[str]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{sweep.name}: ranked by {_title(sweep)}")
    for column in shown:
        table.add_column(column, overflow="fold")  # wrap, never cut, values in narrow (CI) consoles
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in shown))
    Console(soft_wrap=True).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
