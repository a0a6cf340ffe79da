"""Resume loads checkpoints with weights_only=True on every torch that pyproject allows.

torch >= 2.6 defaults torch.load to weights_only=True, but torch 2.4 and 2.5 default to False, and
Lightning passes its own default (None) through. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes this torch
behave like the old ones wherever a caller leaves weights_only unset, so these tests fail if any
resume path stops passing weights_only=True explicitly.
"""
from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
OLD_TORCH_DEFAULT = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
# Everything a checkpoint of ours may name: tensors, their storages, and OrderedDict (the README's list).
PLAIN_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2"}


def sft_cmd(out: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"), "stages=[adapter_sft]",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2",
            "adapter_sft.batch_size=4", "adapter_sft.export=best", f"output_dir={out}", f"tracking.tracking_uri={uri}",
            *extra]


def pickled_globals(checkpoint: Path) -> set[str]:
    """The module/name pairs a torch.save file's pickle refers to, read without unpickling anything."""
    with zipfile.ZipFile(checkpoint) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(" ".join(strings[-2:]))
        elif op.name == "GLOBAL":
            found.add(arg)
    return found


def test_our_checkpoints_hold_only_tensors_and_plain_values_and_resume_as_such(tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = subprocess.run(sft_cmd(out, uri), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = sorted((out / "adapter_sft" / "checkpoints").glob("*.ckpt"))
    assert {c.name for c in checkpoints} >= {"last.ckpt", "best-step=2.ckpt"}
    for checkpoint in checkpoints:  # weights, optimizer, loops, loader position, Python + torch RNG state
        extra = {g for g in pickled_globals(checkpoint) if not g.startswith("torch ") or not g.endswith("Storage")}
        assert extra <= PLAIN_GLOBALS, (checkpoint.name, extra - PLAIN_GLOBALS)
    # As if killed before it finished: the rerun resumes from last.ckpt, and validates the best step.
    state_file = out / "adapter_sft" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "complete": False}))
    again = subprocess.run(sft_cmd(out, uri), cwd=ROOT, env=OLD_TORCH_DEFAULT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads(state_file.read_text())
    assert resumed["complete"] and resumed["run_id"] == state["run_id"] and resumed["result"]["steps"] == 2


class _Payload:
    """What a tampered checkpoint could carry: unpickling it calls os.mkdir(canary)."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return os.mkdir, (self.canary,)


def test_a_checkpoint_that_names_code_is_refused_not_run(tmp_path):
    import torch

    out, uri, canary = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "payload-ran"
    planted = out / "adapter_sft" / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 1, "payload": _Payload(canary)}, planted)
    done = subprocess.run(sft_cmd(out, uri), cwd=ROOT, env=OLD_TORCH_DEFAULT, capture_output=True, text=True, timeout=300)
    assert not canary.exists(), "the checkpoint's payload ran"
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{planted}: refused to load this checkpoint" in done.stderr and "mkdir" in done.stderr
    assert "Traceback" not in done.stderr
