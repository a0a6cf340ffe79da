"""Adapter SFT under FSDP (2 CPU processes, gloo): the exported PEFT adapters hold whole tensors and
equal those of one process trained on the same global batch, also after a resume; PEFT loads them.

The data and the driver are `adapter_sft_driver.py`'s (every step sees the whole training set, every
example has the same number of loss tokens), so the sharded and the single-process runs take the same
optimizer steps and their experts may differ only by float rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp_two_cpu_processes_export_and_resume_to_the_experts_one_process_trains(tmp_path, mlflow_uri,
                                                                                      tiny_model_path):
    """3 steps under FSDP (whole adapters, PEFT loads them), then a resume from its full-state last.ckpt
    to step 5: the exported experts equal 5 uninterrupted steps of one process."""
    import torch
    from safetensors.torch import load_file
    from adapter_sft_driver import run_stage, write_records

    records = write_records(tmp_path / "records.jsonl")
    common = [f"adapter_sft.data={records}", "adapter_sft.include_persona_examples=false", "lora.dropout=0",
              "lora.r=4", "trainer.checkpoint_every_n_steps=100", "adapter_sft.lr=0.01"]
    fsdp = common + ["trainer.strategy=fsdp_cpu", "trainer.devices=2", "adapter_sft.batch_size=10"]
    first = run_stage(tmp_path, "fsdp", mlflow_uri, fsdp + ["trainer.max_steps=3"], "fsdp_cpu_test")
    assert json.loads((tmp_path / "fsdp" / "result.json").read_text()) == {
        "world_size": 2, "steps": 3, "fsdp_units": 2 + 1}  # the tiny model's 2 blocks + the root: really sharded
    expert = first / "openness_high"
    assert_peft_loads(expert, tiny_model_path, load_file(str(expert / "adapter_model.safetensors")))
    resumed = run_stage(tmp_path, "fsdp", mlflow_uri, fsdp + ["trainer.max_steps=5"], "fsdp_cpu_test")
    assert json.loads((tmp_path / "fsdp" / "result.json").read_text())["steps"] == 5
    single = run_stage(tmp_path, "single", mlflow_uri, common + ["trainer.max_steps=5", "trainer.strategy=auto",
                                                                 "trainer.accelerator=cpu", "trainer.devices=1",
                                                                 "adapter_sft.batch_size=20"], "fsdp_cpu_test")
    experts = sorted(p.name for p in single.iterdir())
    assert len(experts) == 10 and sorted(p.name for p in resumed.iterdir()) == experts
    trained = 0.0
    for expert in experts:
        a = load_file(str(resumed / expert / "adapter_model.safetensors"))
        b = load_file(str(single / expert / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape, f"{expert}: {key} exported as a shard {tuple(a[key].shape)}"
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{expert}: {key}")
            if ".lora_B." in key:
                trained += float(b[key].abs().sum())
    assert trained > 0  # B starts at zero: the experts really moved


def assert_peft_loads(folder: Path, base_path: str, tensors: dict) -> None:
    """PeftModel.from_pretrained takes the FSDP export unchanged and holds exactly its tensors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(folder))
    loaded = {k: v for k, v in peft.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)


def test_cli_pipeline_under_fsdp_two_cpu_processes(tmp_path, tiny_model_path):
    """`personafuse run … trainer.strategy=fsdp_cpu trainer.devices=2` through adapter_sft and router:
    Lightning starts rank 1 by re-running the command; adapter_sft.export=best reloads the kept step
    from its FSDP checkpoint and exports exactly it; the router (an MLP) trains data-parallel; rank 0
    alone logs, one MLflow run per stage; the adapters and the router are saved whole."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from lightning_modules.components.router import load_router

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"),
           "stages=[adapter_sft,router]", "trainer.strategy=fsdp_cpu", "trainer.devices=2", "trainer.max_steps=2",
           "adapter_sft.export=best", "trainer.val_check_interval=1", f"output_dir={out}", f"tracking.tracking_uri={uri}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    for stage in ("adapter_sft", "router"):
        assert json.loads((out / stage / "state.json").read_text())["complete"], stage
    adapters = sorted((out / "adapter_sft" / "adapters").iterdir())
    assert len(adapters) == 10
    tensors = load_file(str(adapters[0] / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if ".lora_B." in k)  # trained, not the zero init
    assert_peft_loads(adapters[0], tiny_model_path, tensors)
    result = json.loads((out / "adapter_sft" / "state.json").read_text())["result"]
    assert result["exported"].startswith("best-step="), result["exported"]
    kept = torch.load(out / "adapter_sft" / "checkpoints" / result["exported"], weights_only=True)["state_dict"]
    e = result["experts"].index(adapters[0].name)
    for key, value in tensors.items():  # PEFT's per-expert slice of the stacked [E, ...] checkpoint tensor
        stacked = kept["model.base_model." + key.removeprefix("base_model.model.").removesuffix(".weight")]
        assert torch.equal(value, stacked[e]), key
    router, _ = load_router(out / "router" / "router")  # load_state_dict is strict: whole tensors or an error
    assert all(torch.isfinite(p).all() for p in router.parameters())
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["adapter_sft", "pipeline", "router"]
    assert {r.info.status for r in runs} == {"FINISHED"}
