"""DeepSpeed ZeRO-2 / ZeRO-3 on one CPU process: the shipped configs drive two optimizer steps of the
ten-expert model through `deepspeed.initialize`, and the gathered export writes real adapters.

Lightning's DeepSpeedStrategy refuses a CPU accelerator, so this calls DeepSpeed directly, the way
the strategy does (config filled in as Lightning fills it, model built under deepspeed.zero.Init
through the project's own helpers). Why earlier tries hung, and what this test does about it:
- `deepspeed.init_distributed` JIT-builds a shared-memory all-reduce op (~90 s on 2 cores the first
  time) under a lock file in ~/.cache/torch_extensions; a build that was killed leaves the lock
  behind and every later run waits on it forever (torch.utils.file_baton.FileBaton.wait). The op
  only serves inference all-reduce across local ranks, so it is marked unavailable here.
- Without RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, init_distributed falls back to MPI discovery.
Each stage runs in its own process (zero.Init patches torch globally) under a hard timeout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPERTS = [f"{trait}_{pole}" for trait in ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
           for pole in ("high", "low")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_stage_2_offload"])
def test_two_zero_steps_on_cpu_and_a_real_adapter(strategy, tmp_path, tiny_model_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install -e .[deepspeed])")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, __file__, strategy, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["zero_stage"] == (3 if strategy == "deepspeed_zero3" else 2)
    assert result["offload"] == strategy.endswith("_offload")
    assert all(loss == loss for loss in result["losses"])  # finite
    assert result["losses"][1] < result["losses"][0]  # the second step sees the first update
    assert result["steps"] == 2
    assert result["trained_b_abs_sum"] > 0 and result["untrained_b_abs_sum"] == 0
    assert result["export_matches_gathered"]
    assert result["sharded_outside_gather"] == (strategy == "deepspeed_zero3")  # so the gather is what made it whole


# --------------------------------------------------------------------------- the worker process


def worker(strategy_name: str, out_dir: Path) -> None:
    """Build, initialise, step twice, export one trained and one untrained expert; write a JSON result."""
    import deepspeed
    import deepspeed.ops
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from safetensors.torch import load_file

    from experiments.config import LoraConfig, ModelConfig, TrainerConfig
    from lightning_modules.strategies import deepspeed_config
    from lightning_modules.common import gathered_parameters, persona_model_factory, zero3_model_init

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    config = deepspeed_config(TrainerConfig(strategy=strategy_name))  # fp32, as trainer.precision's default
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    strategy = DeepSpeedStrategy(config=config)  # only its config and zero_stage_3 are used on CPU

    torch.manual_seed(0)
    factory = persona_model_factory(ModelConfig(name_or_path="tiny-random-llama"),
                                    LoraConfig(r=4, alpha=8.0, dropout=0.0), EXPERTS)
    with deepspeed.zero.Init(enabled=strategy.zero_stage_3, config_dict_or_path=config), zero3_model_init(strategy):
        model = factory()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      optimizer=torch.optim.AdamW(params, lr=1e-2))
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    gates = F.one_hot(torch.tensor([0, 3]), len(EXPERTS)).to(next(model.persona_layers()).lora_A.dtype)
    losses = []
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids, gates=gates).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    experts = [p for layer in model.persona_layers() for p in (layer.lora_A, layer.lora_B)]
    # ZeRO-3 owns the experts (ds_id) and keeps large tensors, like the embedding, as shards outside a gather.
    embedding = model.base_model.get_input_embeddings().weight
    sharded = all(hasattr(p, "ds_id") for p in experts) and embedding.numel() == 0
    with gathered_parameters(strategy, experts):
        trained = sum(float(layer.lora_B[0].detach().float().abs().sum()) for layer in model.persona_layers())
        untrained = sum(float(layer.lora_B[5].detach().float().abs().sum()) for layer in model.persona_layers())
        folder = model.export_peft(EXPERTS[0], out_dir / "adapters" / EXPERTS[0], "tiny-random-llama")
        name = model.layer_names[0]
        first = next(model.persona_layers())
        saved = load_file(str(folder / "adapter_model.safetensors"))
        matches = (torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], first.lora_B[0].detach().cpu())
                   and saved[f"base_model.model.{name}.lora_A.weight"].numel() > 0)
    result = {"zero_stage": engine.zero_optimization_stage(), "losses": losses, "steps": int(engine.global_steps),
              "trained_b_abs_sum": trained, "untrained_b_abs_sum": untrained, "export_matches_gathered": bool(matches),
              "sharded_outside_gather": sharded,
              "offload": engine.zero_cpu_offload()}
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
