"""The embedded SmolLM2-135M-Instruct: cold conversion under concurrency, and expert SFT on it.

    .venv/bin/python -m pytest -m slow tests/slow
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LOAD = ("from lightning_modules.components.base_model import load_base_model;"
        "m, t = load_base_model('smollm2-135m-instruct'); print(sum(p.numel() for p in m.parameters()))")


def test_two_cold_processes_build_one_intact_cache(tmp_path):
    env = {**__import__("os").environ, "PERSONAFUSE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert all(o[0].strip().splitlines()[-1] == "134515008" for o in outs)
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".smollm2")) == ["smollm2-135m-instruct"]
    assert not [p for p in models.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp folder left
    again = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0


def test_expert_sft_on_embedded_model_lowers_each_pole_val_loss(tmp_path):
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    cfg = load_config(ROOT / "experiments/quickstart.yaml", [
        "stages=[adapter_sft]", "trainer.max_steps=12", "adapter_sft.max_length=96",
        f"output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    result = run_pipeline(cfg)["adapter_sft"]
    for pole, before in result["val_loss_before"].items():
        assert result["val_loss_after"][pole] < before, pole


def test_datagen_on_embedded_teacher(tmp_path):
    """Persona-CoT with the real 135M teacher: it runs, and every response is accepted or rejected with a reason."""
    import json

    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    cfg = load_config(ROOT / "experiments/quickstart.yaml", [
        "stages=[datagen]", "datagen.teacher.kind=local", "datagen.parse_retries=0", "datagen.teacher.batch_size=16",
        "datagen.limit=2", "datagen.teacher.max_new_tokens=24", "datagen.analysis_max_new_tokens=32",
        "datagen.min_accepted_fraction=0",  # this checks that every reply is judged, not how many pass
        f"output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    summary = run_pipeline(cfg)["datagen"]["summary"]
    assert summary["items"] == 2 and summary["responses"] == 22
    assert summary["accepted"] + sum(summary["rejected"].values()) >= summary["responses"]
    assert json.loads((tmp_path / "out" / "datagen" / "summary.json").read_text())["teacher"] == "local:smollm2-135m-instruct"
