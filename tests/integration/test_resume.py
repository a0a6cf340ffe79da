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
    stale = {"hash": stage_hash(cfg, "adapter_sft", []), "run_id": "f" * 32, "complete": False}
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
