"""adapter_sft.export=best exports the validated step with the lowest val/loss, not the last step.

The tiny random model's loss barely moves, so here best is usually the last step: these tests check
that the best step is the minimum of the logged val/loss and that the adapters are its weights.
The slow test below makes the embedded model overfit, where best != last.
"""
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


def run_sft_command(out: Path, uri: str, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"),
            "stages=[adapter_sft]", f"trainer.max_steps={steps}", "trainer.val_check_interval=2",
            "trainer.checkpoint_every_n_steps=2", "adapter_sft.batch_size=4",
            f"output_dir={out}", f"tracking.tracking_uri={uri}", *overrides]


def run_sft(out: Path, uri: str, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(run_sft_command(out, uri, steps, *overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def exported_vs_checkpoint(checkpoint: Path, adapter: Path, expert: int) -> list[bool]:
    """For every LoRA matrix of one exported adapter: is it the checkpoint's tensor for that expert?"""
    import torch
    from safetensors.torch import load_file

    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    same = []
    for key, tensor in load_file(str(adapter / "adapter_model.safetensors")).items():
        # base_model.model.<layer>.lora_A.weight  ->  model.base_model.<layer>.lora_A  ([experts, ...])
        ckpt_key = "model.base_model." + key[len("base_model.model."):-len(".weight")]
        same.append(torch.equal(state[ckpt_key][expert], tensor))
    return same


def best_run(out: Path, uri: str, steps: int, *overrides: str) -> tuple[Path, dict]:
    """Run adapter_sft with export=best; check the exported experts are the best checkpoint's."""
    done = run_sft(out, uri, steps, "adapter_sft.export=best", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "adapter_sft" / "state.json").read_text())["result"]
    best = sorted((out / "adapter_sft" / "checkpoints").glob("best-step=*.ckpt"))
    assert len(best) == 1 and result["exported"] == best[0].name and result["steps"] == steps
    adapter = out / "adapter_sft" / "adapters" / result["experts"][0]
    assert all(exported_vs_checkpoint(best[0], adapter, 0))
    return best[0], result


def test_export_best_is_the_lowest_logged_validation_loss(tmp_path):
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    best, _ = best_run(out, uri, 6)
    client = mlflow.MlflowClient(uri)
    sft_run = next(r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
                   if r.data.tags.get("stage") == "adapter_sft")
    # val/loss during training: the first point (before training) and the last (the final check) are not steps
    history = [m.value for m in client.get_metric_history(sft_run.info.run_id, "val/loss")[1:-1]]
    assert len(history) == 3  # validated after steps 2, 4 and 6
    assert best.name == f"best-step={2 * (history.index(min(history)) + 1)}.ckpt"
    # last.ckpt (what a killed run resumes from) knows the best step found at its own step's validation
    assert best_tracked_in(out / "adapter_sft" / "checkpoints" / "last.ckpt") == (best.name, pytest.approx(min(history)))


def written_after(later: Path, earlier: Path) -> bool:
    try:
        return later.stat().st_mtime_ns > earlier.stat().st_mtime_ns
    except FileNotFoundError:  # not written yet, or replaced while we looked
        return False


def best_tracked_in(checkpoint: Path) -> tuple[str, float]:
    """(file name, score) of the best step as the best-step callback's state in a checkpoint has it."""
    import torch

    states = torch.load(checkpoint, weights_only=False)["callbacks"]
    state = next(v for k, v in states.items() if k.startswith("ModelCheckpoint") and "val/loss" in k)
    return Path(state["best_model_path"]).name, float(state["best_model_score"])


def test_export_best_after_a_kill_past_a_new_best_equals_an_uninterrupted_run(tmp_path):
    """Killed once validation at step 4 found a new best and last.ckpt was written again: the
    resumed run picks up from that checkpoint and exports the same best experts."""
    whole, uri = tmp_path / "whole", f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole_best, whole_result = best_run(whole, uri, 6)
    out = tmp_path / "killed"
    checkpoints = out / "adapter_sft" / "checkpoints"
    proc = subprocess.Popen(run_sft_command(out, uri, 6, "adapter_sft.export=best"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if written_after(checkpoints / "last.ckpt", checkpoints / "best-step=4.ckpt"):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before step 4's validation was checkpointed"
    assert best_tracked_in(checkpoints / "last.ckpt")[0] == "best-step=4.ckpt"
    best, result = best_run(out, uri, 6)
    assert best.name == whole_best.name and result["exported"] == whole_result["exported"]
    for expert in result["experts"]:
        assert (out / "adapter_sft/adapters" / expert / "adapter_model.safetensors").read_bytes() == \
            (whole / "adapter_sft/adapters" / expert / "adapter_model.safetensors").read_bytes()


def test_export_rejects_an_unknown_choice(tmp_path):
    done = run_sft(tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}", 2, "adapter_sft.export=newest")
    assert done.returncode == 2
    assert "adapter_sft.export" in done.stderr and "newest" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_best_on_an_overfitting_embedded_model(tmp_path):
    """SmolLM2-135M at a learning rate far too high: val/loss rises after the first steps, so the
    exported experts are an early step's, not the last step's."""
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    best, result = best_run(out, uri, 6, "model.name_or_path=smollm2-135m-instruct", "adapter_sft.lr=1e-2",
                            "adapter_sft.max_length=64")
    assert int(best.stem.split("=")[1]) < 6
    adapter = out / "adapter_sft" / "adapters" / result["experts"][0]
    assert not all(exported_vs_checkpoint(out / "adapter_sft" / "checkpoints" / "last.ckpt", adapter, 0))
