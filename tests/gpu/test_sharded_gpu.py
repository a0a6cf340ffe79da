"""Adapter SFT through Lightning's DeepSpeed strategy (ZeRO-2 and ZeRO-3) and FSDP, bf16, on one GPU:
the exported PEFT adapters hold the full, trained expert weights (ZeRO-3 and FSDP gather before export).

Each run is a `personafuse run` in its own process: DeepSpeed's zero.Init patches torch globally.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA: Lightning's DeepSpeed and FSDP strategies refuse a CPU accelerator", allow_module_level=True)


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_deepspeed_adapter_sft_exports_trained_adapters(strategy, tmp_path, mlflow_uri, tiny_model_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e .[deepspeed])")
    from safetensors.torch import load_file

    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "experiments.cli", "run", "experiments/smoke.yaml", "stages=[adapter_sft]",
           f"output_dir={out}", f"trainer.strategy={strategy}", "trainer.precision=bf16-mixed",
           "trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=3", "adapter_sft.batch_size=8",
           "adapter_sft.lr=0.01", "lora.r=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    adapters = out / "adapter_sft" / "adapters"
    experts = sorted(p for p in adapters.iterdir() if p.is_dir())
    assert len(experts) == 10
    trained = 0.0
    for folder in experts:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert tensors and (folder / "adapter_config.json").is_file()
        for key, value in tensors.items():
            assert value.numel() > 0, f"{folder.name}: {key} is empty (exported a ZeRO-3 shard?)"
            if ".lora_A." in key:
                assert value.shape[0] == 8 and bool(value.ne(0).any()), f"{folder.name}: {key} is all zero"
            else:
                trained += float(value.float().abs().sum())
    assert trained > 0, "every lora_B is still zero: the experts did not train or the export missed the update"
