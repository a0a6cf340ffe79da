"""A finished trial's objective, read from the MLflow runs its pipeline logged."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from datamodules.io import read_json
from experiments.sweep.schema import ObjectiveSpec


class ObjectiveMissing(RuntimeError):
    """The trial ran but its runs do not log the objective (or log it ambiguously)."""


def trial_run_id(trial_dir: Path) -> Optional[str]:
    """The trial's pipeline run, as its pipeline recorded it."""
    state = read_json(trial_dir / "run_state.json") or {}
    return state.get("run_id")


def descendant_runs(client, experiment_id: str, run_id: str, depth: int = 3) -> list:
    """The run and its children down to `depth` levels (pipeline -> stage -> per-system runs)."""
    runs = [client.get_run(run_id)]
    frontier = [run_id]
    for _ in range(depth):
        children = []
        for parent in frontier:
            children += client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        runs += children
        frontier = [r.info.run_id for r in children]
        if not frontier:
            break
    return runs


def objective_value(runs: list, objective: ObjectiveSpec) -> float:
    """The objective from exactly one run; a glob metric is the mean of that run's matching metrics."""
    from fnmatch import fnmatchcase

    hits = []
    for run in runs:
        tags = run.data.tags
        if objective.stage and tags.get("stage") != objective.stage:
            continue
        if objective.system and tags.get("system") != objective.system:
            continue
        # NaN is an undefined metric (e.g. EQ-Bench with no parsed answer): not a value to rank by
        values = [v for k, v in run.data.metrics.items() if fnmatchcase(k, objective.metric) and v == v]
        if values:
            hits.append((run, sum(values) / len(values)))
    if not hits:
        logged = sorted({k for r in runs for k in r.data.metrics})
        raise ObjectiveMissing(f"no run of this trial logs '{objective.metric}'"
                               f"{f' (stage {objective.stage})' if objective.stage else ''}; logged: {', '.join(logged[:12]) or 'nothing'}")
    if len(hits) > 1:
        names = ", ".join(f"{r.info.run_name} (stage {r.data.tags.get('stage')}, system {r.data.tags.get('system')})" for r, _ in hits)
        raise ObjectiveMissing(f"'{objective.metric}' is logged by {len(hits)} runs ({names}): set objective.stage / objective.system")
    return float(hits[0][1])
