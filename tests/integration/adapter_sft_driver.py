"""Driver for the multi-process adapter_sft tests (DDP and FSDP on 2 CPU processes).

`run_stage` starts this file as a script; Lightning re-executes the same script for rank 1, so every
rank runs `main`, which calls `lightning_modules.adapter_sft.run` with a fresh MLflow run set up the
way the pipeline sets one up. Rank 0 writes result.json: world size, steps and the number of FSDP
units alive (proof that an FSDP run really sharded; 0 under DDP).

`write_records` is the data both tests train on: every step sees the whole training set and every
example has the same number of loss tokens, so a sharded run and one process with the same global
batch take the same optimizer steps (see test_ddp_cpu.py's docstring).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESPONSE = "Thank you for telling me. Here is what I would do next, step by step."
USERS = ["My landlord ignores my emails about the broken heater.", "I failed my driving test again today.",
         "Can you help me plan a surprise party for my sister?"]


def write_records(path: Path) -> Path:
    """3 records per pole (1 held out for validation, 2 trained): 20 training examples."""
    from datamodules.personas import load_personas
    from experiments.config import project_path

    poles = load_personas(project_path("experiments/personas/big_five.yaml")).ids
    lines = [json.dumps({"messages": [{"role": "user", "content": user}], "response": RESPONSE, "pole": pole})
             for pole in poles for user in USERS]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_stage(tmp_path: Path, name: str, uri: str, overrides: list[str], experiment: str) -> Path:
    """One adapter_sft stage in a fresh process (this file as the driver); returns its adapters folder."""
    from experiments import tracking

    exp_id = tracking.get_or_create_experiment(experiment, uri)
    run_id = tracking.start_run(uri, exp_id, name, {"stage": "adapter_sft"})
    out = tmp_path / name
    cmd = [sys.executable, __file__, str(out), uri, exp_id, run_id, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out / "adapter_sft" / "adapters"


def main(out: Path, uri: str, exp_id: str, run_id: str, overrides: list[str]) -> None:
    import gc

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from experiments.config import load_config
    from experiments.pipeline import StageContext
    from lightning_modules import adapter_sft

    cfg = load_config(ROOT / "experiments" / "smoke.yaml", overrides + [f"output_dir={out}"])
    stage_dir = out / "adapter_sft"
    stage_dir.mkdir(parents=True, exist_ok=True)
    result = adapter_sft.run(StageContext(cfg, "adapter_sft", stage_dir, out, uri, exp_id, run_id))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    units = sum(isinstance(o, FullyShardedDataParallel) for o in gc.get_objects())
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        (out / "result.json").write_text(json.dumps({"world_size": world, "steps": result["steps"], "fsdp_units": units}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
