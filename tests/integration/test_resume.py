"""A killed training stage resumes from its last checkpoint, finishes with the same step count,
and continues the same MLflow runs instead of creating duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cmd(out: Path, uri: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"),
            "stages=[adapter_sft]", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2",
            "adapter_sft.batch_size=4", f"output_dir={out}", f"tracking.tracking_uri={uri}"]


def test_kill_9_during_sft_then_resume(tmp_path):
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(_cmd(out, uri), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "adapter_sft" / "checkpoints" / "step=4.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint appeared before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "adapter_sft" / "state.json").read_text())
    assert state["complete"] is False
    done = subprocess.run(_cmd(out, uri), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((out / "adapter_sft" / "state.json").read_text())
    assert final["complete"] and final["result"]["steps"] == 8
    assert final["run_id"] == state["run_id"]  # the same MLflow stage run continued
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 2  # one pipeline run + one adapter_sft run, no duplicates
    # the checkpoint holds only the experts, not the frozen base model
    import torch

    sd = torch.load(ckpt if ckpt.exists() else out / "adapter_sft/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert sd and all(".lora_" in k for k in sd)


def test_interrupted_pipeline_whose_store_was_deleted_starts_fresh_runs(tmp_path):
    """State files that name MLflow runs the store no longer has (the user deleted mlruns/, or
    points tracking elsewhere) must not crash the rerun: it starts new runs and finishes."""
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    (out / "adapter_sft").mkdir(parents=True)
    (out / "run_state.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": uri}))
    from experiments.config import load_config
    from experiments.pipeline import stage_hash

    cfg = load_config(ROOT / "experiments/smoke.yaml", _cmd(out, uri)[5:])
    stale = {"hash": stage_hash(cfg, "adapter_sft", {}), "run_id": "f" * 32, "complete": False}
    (out / "adapter_sft" / "state.json").write_text(json.dumps(stale))
    done = subprocess.run(_cmd(out, uri), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not in" in done.stderr and "starting a new run" in done.stderr
    final = json.loads((out / "adapter_sft" / "state.json").read_text())
    assert final["complete"] and final["run_id"] != "f" * 32
    client = mlflow.MlflowClient(uri)
    assert client.get_run(final["run_id"]).info.status == "FINISHED"


def test_changed_config_sets_old_stage_outputs_aside_instead_of_resuming_them(tmp_path):
    """A rerun with other settings must not resume the old run's checkpoints: its folder is kept
    aside as <stage>.superseded-<hash> and the stage trains from step 0 under the new config."""
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = subprocess.run(_cmd(out, uri) + ["trainer.max_steps=4", "trainer.log_every_n_steps=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    old_state = json.loads((out / "adapter_sft" / "state.json").read_text())
    second = subprocess.run(_cmd(out, uri) + ["trainer.max_steps=6", "adapter_sft.lr=1e-3", "trainer.log_every_n_steps=1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "config changed since its last run" in second.stderr
    kept = out / f"adapter_sft.superseded-{old_state['hash'][:8]}"
    assert (kept / "checkpoints" / "step=4.ckpt").exists()  # the old outputs are kept, not deleted
    new_state = json.loads((out / "adapter_sft" / "state.json").read_text())
    assert new_state["run_id"] != old_state["run_id"] and new_state["result"]["steps"] == 6
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(new_state["run_id"], "train/loss")
    assert min(m.step for m in history) < 4  # trained from step 0 again, not resumed from the old step 4


def test_rerun_and_reset_redo_finished_stages_from_the_named_one_on(tmp_path):
    """`run --rerun STAGE` redoes a finished stage and every later one in new MLflow runs, keeping the
    old outputs aside; `reset STAGE` sets them aside without running; earlier stages stay skipped."""
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _cmd(out, uri) + ["stages=[adapter_sft,sft_baseline]", "trainer.max_steps=2"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    def states() -> dict[str, dict]:
        return {s: json.loads((out / s / "state.json").read_text()) for s in ("adapter_sft", "sft_baseline")}

    run()
    first = states()
    assert run().stderr.count("unchanged since its last run — skipped") == 2
    again = run("--rerun", "adapter_sft")
    second = states()
    assert all(second[s]["run_id"] != first[s]["run_id"] and second[s]["complete"] for s in second)
    assert again.stderr.count("a rerun was asked for") == 2
    for stage, state in first.items():  # old outputs kept beside the new ones
        assert (out / f"{stage}.superseded-{state['hash'][:8]}" / "state.json").exists()
    reset = subprocess.run(cmd[:3] + ["reset", "sft_baseline"] + cmd[4:], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert reset.returncode == 0, reset.stderr[-2000:]
    assert not (out / "sft_baseline" / "state.json").exists() and (out / "adapter_sft" / "state.json").exists()
    third = run()
    assert third.stderr.count("unchanged since its last run — skipped") == 1
    assert states()["adapter_sft"]["run_id"] == second["adapter_sft"]["run_id"]
    assert states()["sft_baseline"]["run_id"] != second["sft_baseline"]["run_id"]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("stage") in ("adapter_sft", "sft_baseline")]
    assert len(stage_runs) == 5 and all(r.info.status == "FINISHED" for r in runs)


def test_rerun_names_a_stage_the_config_does_not_run(tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(_cmd(out, uri) + ["--rerun", "routr"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "stage 'routr' is not in this config's stages ['adapter_sft']" in done.stderr
    assert not out.exists()


def test_an_evaluation_setting_does_not_redo_datagen_or_the_experts(tmp_path):
    """evaluate.batch_size=8, then 4, then 8: datagen and adapter_sft run once and are skipped after,
    and --plan says so first (tests/unit/test_pipeline.py: what it says when a setting they read changes)."""
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _cmd(out, uri)[:5] + ["stages=[datagen,adapter_sft]", "trainer.max_steps=2", f"output_dir={out}",
                                f"tracking.tracking_uri={uri}"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    run("evaluate.batch_size=8")
    states = {s: (out / s / "state.json").read_bytes() for s in ("datagen", "adapter_sft")}
    planned = run("evaluate.batch_size=4", "--plan").stdout.splitlines()
    assert [line.split()[:2] for line in planned] == [["datagen", "skip"], ["adapter_sft", "skip"]]
    for batch_size in (4, 8):
        assert run(f"evaluate.batch_size={batch_size}").stderr.count("unchanged since its last run — skipped") == 2
    assert {s: (out / s / "state.json").read_bytes() for s in states} == states


def test_sigterm_marks_the_runs_killed_and_the_rerun_resumes_them(tmp_path):
    """A scheduler's SIGTERM mid-training ends the stage and pipeline runs KILLED (not RUNNING
    forever); the rerun continues the same runs to FINISHED."""
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _cmd(out, uri)  # 8 steps: SIGTERM lands well before the end
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "adapter_sft" / "checkpoints" / "step=2.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint appeared before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    state = json.loads((out / "adapter_sft" / "state.json").read_text())
    parent = json.loads((out / "run_state.json").read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    assert [client.get_run(r).info.status for r in (state["run_id"], parent)] == ["KILLED", "KILLED"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((out / "adapter_sft" / "state.json").read_text())
    assert final["run_id"] == state["run_id"] and final["result"]["steps"] == 8
    assert [client.get_run(r).info.status for r in (state["run_id"], parent)] == ["FINISHED", "FINISHED"]
