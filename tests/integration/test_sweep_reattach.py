"""`kill -9` of the sweep process alone leaves its local trial running; the relaunch must wait for that
trial, not start it a second time on the same folder (which failed on the pipeline lock and marked a
healthy trial FAILED), and then collect its result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments.sweep.launchers import process_started

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def one_trial_sweep(tmp_path: Path) -> Path:
    """One router trial on the corpus's first 80 situations: a few seconds of training after startup."""
    corpus = tmp_path / "situations.jsonl"
    corpus.write_text("".join((ROOT / "datamodules/data/situations.jsonl").read_text().splitlines(keepends=True)[:80]))
    spec = {"base": "experiments/smoke.yaml", "output_dir": str(tmp_path / "sweep"),
            "overrides": ["stages=[router]", "router.max_epochs=150", f"data.situations={corpus}"],
            "parameters": {"router.hidden": [16]}, "objective": {"metric": "router/val_f1_micro", "stage": "router"},
            "launcher": {"kind": "local", "parallel": 1}}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def the_trial(state_file: Path) -> dict:
    trials = json.loads(state_file.read_text())["trials"] if state_file.is_file() else {}
    return next(iter(trials.values()), {})


def test_relaunch_after_kill_9_of_the_sweep_waits_for_its_live_trial(tmp_path, mlflow_uri):
    cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(one_trial_sweep(tmp_path))]
    state_file = tmp_path / "sweep" / "sweep_state.json"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid = None
    try:
        deadline = time.time() + 120
        while not the_trial(state_file).get("pid"):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGKILL)  # the sweep process only: its trial runs on, orphaned
        first.wait()
        pid = the_trial(state_file)["pid"]
        assert process_started(pid) is not None

        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"following process {pid}, left running by an earlier launch" in second.stderr
        assert "has ended; running the trial again to collect its result" in second.stderr
    finally:
        if pid and process_started(pid) is not None:
            os.kill(pid, signal.SIGKILL)
    record = the_trial(state_file)
    assert record["status"] == "finished" and record["objective"] is not None and record["attempts"] == 2
    trial_log = (Path(record["output_dir"]) / "trial.log").read_text()
    assert "another pipeline is running" not in trial_log  # never two processes on one trial folder
    assert "router: unchanged since its last run — skipped" in trial_log  # the rerun only collected the result

    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    stages = sorted(r.data.tags.get("stage") for r in runs)
    assert stages == ["pipeline", "router", "sweep"] and {r.info.status for r in runs} == {"FINISHED"}


def test_tpe_relaunch_after_kill_9_reruns_the_asked_trial_as_the_same_optuna_trial(tmp_path, mlflow_uri):
    """Sweep and trial killed together while the first TPE trial runs: the relaunch loads the study from
    optuna.journal, reruns that trial as Optuna trial 0 (not a FAIL plus a new proposal), then asks trial 1."""
    import optuna

    corpus = tmp_path / "situations.jsonl"
    corpus.write_text("".join((ROOT / "datamodules/data/situations.jsonl").read_text().splitlines(keepends=True)[:80]))
    spec = {"base": "experiments/smoke.yaml", "output_dir": str(tmp_path / "sweep"), "method": "tpe", "trials": 2,
            "startup_trials": 1, "overrides": ["stages=[router]", "router.max_epochs=2", f"data.situations={corpus}"],
            "parameters": {"router.hidden": {"low": 8, "high": 64}}, "objective": {"metric": "router/val_f1_micro"}}
    path = tmp_path / "tpe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(path)]
    state_file = tmp_path / "sweep" / "sweep_state.json"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not the_trial(state_file).get("pid"):
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its trial
    first.wait()
    asked = the_trial(state_file)["params"]

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "sweep" / "optuna.journal")))
    trials = optuna.load_study(study_name="tpe", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials[0].params == asked
    records = json.loads(state_file.read_text())["trials"]
    assert sorted(r["objective"] for r in records.values()) == sorted(t.value for t in trials)
