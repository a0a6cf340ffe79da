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

from datamodules.io import atomic_write_bytes, atomic_write_text
from datamodules.personas import BIG_FIVE

TRAITS = BIG_FIVE


def comparison_rows(metrics: dict[str, dict[str, float]], headline: Sequence[str]) -> tuple[list[str], list[list]]:
    """Headline keys first (those present), then every other key any system reported."""
    present = {k for m in metrics.values() for k in m}
    keys = [k for k in headline if k in present] + sorted(present - set(headline))
    rows = [[system] + [metrics[system].get(k) for k in keys] for system in metrics]
    return keys, rows


def log_comparison(ctx, metrics: dict[str, dict[str, float]], headline: Sequence[str]) -> Path:
    import mlflow

    keys, rows = comparison_rows(metrics, headline)
    folder = ctx.stage_dir
    atomic_write_text(folder / "comparison.csv", _csv(["system"] + keys, rows))
    md = folder / "comparison.md"
    atomic_write_text(md, _markdown(["system"] + keys, rows))
    client = mlflow.MlflowClient(ctx.tracking_uri)
    client.log_table(ctx.run_id, {"system": [r[0] for r in rows], **{k: [r[i + 1] for r in rows] for i, k in enumerate(keys)}},
                     artifact_file="comparison_table.json")
    shifts = trait_shift_rows(metrics)
    shift_md = None
    if shifts:
        shift_md = folder / "trait_check.md"
        atomic_write_text(shift_md, _markdown(TRAIT_SHIFT_HEADER, shifts))
    for path in (folder / "comparison.csv", md, shift_md, plot_benchmarks(metrics, keys, folder / "benchmarks_by_system.png"),
                 plot_big_five(metrics, folder / "big_five_by_system.png")):
        if path is not None:
            ctx.log_artifact(path)
    _print(["system"] + [k for k in keys if k in headline], [[r[0]] + [r[i + 1] for i, k in enumerate(keys) if k in headline] for r in rows])
    if shifts:
        _print(TRAIT_SHIFT_HEADER, shifts, title="Trait check: expert_<trait>_high − expert_<trait>_low on MPI-120")
    return md


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
        ax.bar(range(len(systems)), values, color=[colors[i % 10] for i in range(len(systems))])
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    atomic_write_bytes(path, _figure_bytes(fig))
    return path


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
        ax.bar([j + i * width for j in range(len(TRAITS))], values, width, label=system, color=colors[i % len(colors)])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TRAITS))], TRAITS)
    ax.set_ylim(1, 5)
    ax.set_ylabel("MPI-120 expected score (1–5)" if suffix else "MPI-120 score (1–5)")
    ax.set_title("Big Five profile by system")
    ax.legend(fontsize=7, ncol=min(4, len(systems)), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path
