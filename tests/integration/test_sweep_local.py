"""A local grid sweep end to end: 4 trials, MLflow parent/child runs, ranked table, kill -9 and relaunch.

The sweep is sweeps/smoke_grid.yaml (its parameters, objective and launcher) with two test-only
additions: the output folder under tmp_path, and a 6-per-domain slice of the situations corpus so
that each trial embeds ~80 situations instead of 420 (the embedding dominates a trial on CPU).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PER_DOMAIN = 6


def corpus_slice(path: Path) -> Path:
    """The first PER_DOMAIN situations of every domain: the split still has train/val/test per domain."""
    kept, counts = [], defaultdict(int)
    for line in (ROOT / "datamodules" / "data" / "situations.jsonl").read_text().splitlines():
        if line.strip():
            domain = json.loads(line)["domain"]
            counts[domain] += 1
            if counts[domain] <= PER_DOMAIN:
                kept.append(line)
    path.write_text("\n".join(kept) + "\n")
    return path


def sweep_file(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "smoke_grid.yaml").read_text())
    spec["overrides"] = spec["overrides"] + [f"data.situations={corpus_slice(tmp_path / 'situations.jsonl')}"]
    spec["output_dir"] = str(tmp_path / "sweep")
    path = tmp_path / "smoke_grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials(state_file: Path) -> dict[str, dict]:
    if not state_file.is_file():
        return {}
    return json.loads(state_file.read_text())["trials"]


def finished(state_file: Path) -> dict[str, dict]:
    return {tid: rec for tid, rec in trials(state_file).items() if rec["status"] == "finished"}


def test_local_grid_sweep_tracks_ranks_and_resumes_after_kill(tmp_path, mlflow_uri):
    path = sweep_file(tmp_path)
    state_file = tmp_path / "sweep" / "sweep_state.json"
    cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(path)]

    # First launch, killed (with its running trial: same process group) once 2 trials have finished.
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 240
        while len(finished(state_file)) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "2 trials did not finish in time"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = time.time()
    done_before = finished(state_file)
    assert 2 <= len(done_before) < 4

    # Relaunch: finished trials are skipped, the rest (including the killed one) run.
    second = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = trials(state_file)
    assert len(after) == 4 and all(rec["status"] == "finished" for rec in after.values())
    for tid, rec in after.items():
        if tid in done_before:
            assert rec["attempts"] == 1 and rec["ended"] == done_before[tid]["ended"]
        else:
            assert rec["ended"] > killed_at
    assert second.stderr.count("already finished") == len(done_before)

    # MLflow: one sweep parent, four trial pipeline runs as its children, each with its stage run.
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("smoke_grid")
    runs = client.search_runs([exp.experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    pipelines = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("stage") == "router"]
    assert len(sweeps) == 1 and len(pipelines) == 4 and len(stages) == 4
    parent = sweeps[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in pipelines} == {parent.info.run_id}
    assert {r.info.run_name for r in pipelines} == set(after)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {r.info.run_id for r in pipelines}
    for run in pipelines:
        rec = after[run.data.tags["sweep.trial"]]
        assert run.data.tags["sweep.param.router.hidden"] == str(rec["params"]["router.hidden"])
        # params and objective on the trial's own run: what MLflow's parallel-coordinates chart relates
        assert run.data.params["router.hidden"] == str(rec["params"]["router.hidden"])
        assert run.data.metrics["sweep/objective"] == pytest.approx(rec["objective"])
        assert rec["pipeline_run_id"] == run.info.run_id

    # The ranked table: printed, and logged on the parent as CSV and Markdown.
    assert "ranked by router/val_f1_micro" in second.stdout
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert logged == {"sweep/trials.csv", "sweep/trials.md"}
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").read_text().splitlines()))
    scores = [float(r["router/val_f1_micro"]) for r in rows]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"] and scores == sorted(scores, reverse=True)
    assert scores == sorted((rec["objective"] for rec in after.values()), reverse=True)
    assert client.get_run(parent.info.run_id).data.metrics["sweep/best_objective"] == pytest.approx(scores[0])
