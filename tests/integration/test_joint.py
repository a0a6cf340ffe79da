"""The optional joint stage runs end to end on the tiny model and lowers the LM loss on fused responses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.config import load_config
from experiments.pipeline import run_pipeline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _fused_records(path: Path) -> Path:
    """Fused replies written for a few corpus situations (the tiny model's own datagen output is empty)."""
    rows = [line for line in (ROOT / "datamodules/data/situations.jsonl").open()][:12]
    with path.open("w") as out:
        for i, line in enumerate(rows):
            item = json.loads(line)
            reply = ["I'm so sorry. Take a slow breath; I'm here with you.",
                     "Here is a clear plan: list the steps, set a date, and check each one off."][i % 2]
            out.write(json.dumps({"messages": item["messages"], "response": reply, "label": item["label"]}) + "\n")
    return path


def test_joint_stage_lowers_lm_loss(tmp_path):
    data = _fused_records(tmp_path / "fused.jsonl")
    cfg = load_config(ROOT / "experiments/smoke.yaml", [
        "stages=[adapter_sft,router,joint]", f"output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"joint.data={data}",
        "joint.lr=0.01", "joint.max_steps=6", "joint.batch_size=4", "adapter_sft.val_fraction=0.2",
    ])
    result = run_pipeline(cfg)["joint"]
    assert result["steps"] == 6
    assert result["lm_loss_after"] < result["lm_loss_before"]
    folder = Path(result["personafuse"])
    assert (folder / "personafuse.json").is_file() and (folder / "router" / "router.safetensors").is_file()
