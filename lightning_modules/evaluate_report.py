"""The reviewer's view of an evaluation: comparison table, benchmark bars, Big Five profiles.

Written into the evaluate stage folder and logged to its MLflow run; the table is also printed.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from datamodules.benchmarks.stats import bootstrap_intervals, is_interval_key, paired_difference
from datamodules.io import atomic_write_bytes, atomic_write_text
from datamodules.personas import BIG_FIVE

TRAITS = BIG_FIVE


def comparison_rows(
    metrics: dict[str, dict[str, float]], headline: Sequence[str], intervals: bool = False
) -> tuple[list[str], list[list]]:
    """Headline keys first (those present), then every other key any system reported; interval keys
    (`<metric>_ci_low/_ci_high`) only with `intervals` (the CSV has them, the tables show them inline)."""
    present = {k for m in metrics.values() for k in m if intervals or not is_interval_key(k)}
    keys = [k for k in headline if k in present] + sorted(present - set(headline))
    rows = [[system] + [metrics[system].get(k) for k in keys] for system in metrics]
    return keys, rows


def add_intervals(by_system: dict[str, dict], benchmarks: dict, samples: int, seed: int) -> None:
    """Give every benchmark metric of every system its 95% bootstrap interval, from its item records."""
    for entry in by_system.values():
        for name, records in entry["records"].items():
            if name in benchmarks and records:
                entry["metrics"].update(bootstrap_intervals(benchmarks[name].aggregate, records, samples, seed))


VS_BASELINE_HEADER = ["system", "metric", "difference", "95% interval", "interval excludes 0"]


def baseline_rows(by_system: dict[str, dict], benchmarks: dict, baseline: str, samples: int, seed: int,
                  headline: Sequence[str]) -> list[list]:
    """Each system minus the baseline on the same items (paired bootstrap), headline metrics first.

    A difference whose interval includes 0 is not a result at this sample size: the table says so."""
    if baseline not in by_system or samples < 1:
        return []
    rows = []
    for system, entry in by_system.items():
        if system == baseline:
            continue
        for name, records in entry["records"].items():
            base = by_system[baseline]["records"].get(name)
            if name not in benchmarks or not records or not base or len(base) != len(records):
                continue
            diffs = paired_difference(benchmarks[name].aggregate, records, base, samples, seed)
            order = sorted(diffs, key=lambda k: (k not in headline, k))
            for key in order:
                d = diffs[key]
                if key in headline or key.count("/") == 1:
                    rows.append([system, key, d["diff"], f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
                                 "yes" if d["excludes_zero"] else "no"])
    return rows


def log_comparison(ctx, metrics: dict[str, dict[str, float]], headline: Sequence[str],
                   vs_baseline: Sequence[list] = ()) -> Path:
    import mlflow

    all_keys, all_rows = comparison_rows(metrics, headline, intervals=True)
    keys, rows = comparison_rows(metrics, headline)
    folder = ctx.stage_dir
    atomic_write_text(folder / "comparison.csv", _csv(["system"] + all_keys, all_rows))
    md = folder / "comparison.md"
    atomic_write_text(md, _markdown(["system"] + keys, _with_intervals(keys, rows, metrics)))
    client = mlflow.MlflowClient(ctx.tracking_uri)
    replace_table(client, ctx.run_id, ["system"] + all_keys, all_rows, "comparison_table.json")
    vs_md = None
    if vs_baseline:
        vs_md = folder / "vs_baseline.md"
        atomic_write_text(vs_md, _markdown(VS_BASELINE_HEADER, vs_baseline))
    shifts = trait_shift_rows(metrics)
    shift_md = None
    if shifts:
        shift_md = folder / "trait_check.md"
        atomic_write_text(shift_md, _markdown(TRAIT_SHIFT_HEADER, shifts))
    for path in (folder / "comparison.csv", md, shift_md, vs_md, plot_benchmarks(metrics, keys, folder / "benchmarks_by_system.png"),
                 plot_big_five(metrics, folder / "big_five_by_system.png")):
        if path is not None:
            ctx.log_artifact(path)
    shown = [k for k in keys if k in headline]
    _print(["system"] + shown, [[r[0]] + [r[i + 1] for i, k in enumerate(keys) if k in headline] for r in rows])
    if vs_baseline:
        header, pivot = _pivot_differences(vs_baseline, shown)
        _print(header, pivot, title="Each system minus the baseline on the same items; * = its 95% paired bootstrap "
                                    "interval excludes 0 (intervals: comparison.md, vs_baseline.md)")
    if shifts:
        _print(TRAIT_SHIFT_HEADER, shifts, title="Trait check: expert_<trait>_high − expert_<trait>_low on MPI-120")
    return md


def replace_table(client, run_id: str, columns: list[str], rows: list[list], artifact_file: str) -> None:
    """An MLflow table artifact, replaced when logged again (a resumed evaluation, `human-eval import`):
    MlflowClient.log_table appends to an existing one, which would list every system twice."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    cells = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in rows]
    client.log_dict(run_id, {"columns": columns, "data": cells}, artifact_file)  # log_table's own layout
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:  # the tag that makes the UI show it as a table
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged + [entry]))


SUMMARY_COLUMNS = 6
"""Headline metrics in a run description: enough to compare systems at a glance; the rest is in comparison.md."""


def summary_table(metrics: dict[str, dict[str, float]], headline: Sequence[str]) -> str:
    """A short markdown table (systems x the first headline metrics present) for run descriptions."""
    keys, rows = comparison_rows(metrics, headline)
    shown = [k for k in keys if k in headline][:SUMMARY_COLUMNS]
    return _markdown(["system"] + shown, [[r[0]] + [r[1 + keys.index(k)] for k in shown] for r in rows])


def system_note(system: str, description: str, metrics: dict[str, float], headline: Sequence[str]) -> str:
    """A per-system run's description: what the system is, and its headline metrics with intervals."""
    keys, rows = comparison_rows({system: metrics}, headline)
    cells = _with_intervals(keys, rows, {system: metrics})[0][1:]
    lines = [f"- {k}: {_fmt(v)}" for k, v in zip(keys, cells) if k in headline]
    return "\n".join([f"**{system}**: {description}", "", *lines])


TRAIT_SHIFT_HEADER = ["trait", "high − low (expected)", "high − low (adjusted)", "acquiescence high", "acquiescence low"]


def trait_shift_rows(metrics: dict[str, dict[str, float]]) -> list[list]:
    """Does each trait's high-pole expert score above its low-pole expert? One row per trait with both
    evaluated on MPI: the difference of expected scores, and of acquiescence-adjusted scores, which
    is what remains once each expert's agree-with-everything bias is taken out."""
    rows = []
    for trait in TRAITS:
        high, low = metrics.get(f"expert_{trait}_high"), metrics.get(f"expert_{trait}_low")
        if not high or not low or f"mpi/{trait}_expected" not in high or f"mpi/{trait}_expected" not in low:
            continue
        adjusted = [m.get(f"mpi/{trait}_adjusted") for m in (high, low)]
        rows.append([trait, high[f"mpi/{trait}_expected"] - low[f"mpi/{trait}_expected"],
                     None if None in adjusted else adjusted[0] - adjusted[1],
                     high.get("mpi/acquiescence"), low.get("mpi/acquiescence")])
    return rows


def _pivot_differences(rows: Sequence[list], keys: Sequence[str]) -> tuple[list[str], list[list]]:
    """The long vs-baseline rows as one row per system, one "diff [low, high]" cell per metric."""
    cells: dict[str, dict[str, str]] = {}
    for system, key, diff, interval, excludes in rows:
        cells.setdefault(system, {})[key] = "—" if math.isnan(diff) else f"{diff:+.3f}{' *' if excludes == 'yes' else ''}"
    shown = [k for k in keys if any(k in c for c in cells.values())]
    return ["system", *shown], [[system, *(c.get(k, "—") for k in shown)] for system, c in cells.items()]


def _with_intervals(keys: Sequence[str], rows: list[list], metrics: dict[str, dict[str, float]]) -> list[list]:
    """Cells as "value [low, high]" where the system has the metric's interval."""
    out = []
    for row in rows:
        m = metrics[row[0]]
        cells = [row[0]]
        for key, value in zip(keys, row[1:]):
            low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
            cells.append(value if low is None or high is None or value is None else f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]")
        out.append(cells)
    return out


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[r[0]] + ["" if v is None else v for v in r[1:]] for r in rows])
    return buffer.getvalue()


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([r[0]] + [_fmt(v) for v in r[1:]]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _print(header: list[str], rows: list[list], title: str = "PersonaFuse evaluation") -> None:
    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h, justify="right" if h != "system" else "left", overflow="fold")
    for r in rows:
        table.add_row(r[0], *[_fmt(v) for v in r[1:]])
    Console(width=max(120, 14 * len(header))).print(table)


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_benchmarks(metrics: dict[str, dict[str, float]], keys: Sequence[str], path: Path) -> Path | None:
    """One small panel per benchmark metric (scales differ), one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in keys if not k.startswith("mpi/") and "/" in k and k.count("/") == 1][:12]
    if not shown:
        return None
    systems = list(metrics)
    cols = min(4, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colors = plt.cm.tab10.colors
    for ax, key in zip(axes.flat, shown):
        values = [metrics[s].get(key) or 0.0 for s in systems]
        ax.bar(range(len(systems)), values, color=[colors[i % 10] for i in range(len(systems))],
               yerr=_error_bars(metrics, systems, key, values), capsize=3, ecolor="0.3")
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    atomic_write_bytes(path, _figure_bytes(fig))
    return path


def _error_bars(metrics: dict[str, dict[str, float]], systems: list[str], key: str, values: list[float]):
    """matplotlib yerr (2 x n distances below / above) from the 95% intervals; 0 where a system has none."""
    lows, highs = [], []
    for system, value in zip(systems, values):
        low, high = metrics[system].get(f"{key}_ci_low"), metrics[system].get(f"{key}_ci_high")
        ok = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
        lows.append(max(0.0, value - low) if ok else 0.0)
        highs.append(max(0.0, high - value) if ok else 0.0)
    return [lows, highs]


def plot_big_five(metrics: dict[str, dict[str, float]], path: Path) -> Path | None:
    """MPI-120 trait scores (1–5) per system as grouped bars: does each system show the profile we want?

    Expected scores where the run has them: on small models the most likely option is the same for
    most items, so argmax means sit on the same few values for every system and hide the differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in metrics if any(f"mpi/{t}" in metrics[s] for t in TRAITS)]
    if not systems:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6 + 0.2 * ((len(systems) + 3) // 4)))
    width = 0.8 / len(systems)
    suffix = "_expected" if all(f"mpi/{t}_expected" in metrics[s] for s in systems for t in TRAITS) else ""
    colors = (plt.cm.tab10 if len(systems) <= 10 else plt.cm.tab20).colors  # one colour per system
    for i, system in enumerate(systems):
        values = [metrics[system].get(f"mpi/{t}{suffix}", 0.0) for t in TRAITS]
        bars = [_error_bars(metrics, [system], f"mpi/{t}{suffix}", [v]) for t, v in zip(TRAITS, values)]
        yerr = [[b[0][0] for b in bars], [b[1][0] for b in bars]]
        ax.bar([j + i * width for j in range(len(TRAITS))], values, width, label=system, color=colors[i % len(colors)],
               yerr=yerr, capsize=2, ecolor="0.3", error_kw={"elinewidth": 0.8})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TRAITS))], TRAITS)
    ax.set_ylim(1, 5)
    ax.set_ylabel("MPI-120 expected score (1–5)" if suffix else "MPI-120 score (1–5)")
    ax.set_title("Big Five profile by system")
    ax.legend(fontsize=7, ncol=min(4, len(systems)), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path
