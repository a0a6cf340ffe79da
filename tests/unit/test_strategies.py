"""The shipped DeepSpeed configs pass DeepSpeed's own parser once Lightning has filled in its part;
precision comes from trainer.precision; users' own files, offload and Lightning's names."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from unittest import mock

import pytest
import yaml

from datamodules.io import ConfigError
from experiments.config import TrainerConfig
from lightning_modules.strategies import DEEPSPEED_CONFIGS, deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}

deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed: `DS_BUILD_OPS=0 pip install -e .[deepspeed]` to check the configs"
)


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / DEEPSPEED_CONFIGS[STRATEGIES[name]]).read_text())


def as_lightning_fills(config: dict, micro_batch: int, accumulate: int, clip: float, precision: str) -> dict:
    """What DeepSpeedStrategy._format_config adds before deepspeed.initialize sees the dict."""
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    config = copy.deepcopy(config)
    config["gradient_accumulation_steps"] = accumulate
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    config.setdefault("gradient_clipping", clip)
    _format_precision_config(config=config, precision=precision, loss_scale=0, loss_scale_window=1000,
                             min_loss_scale=1, initial_scale_power=16, hysteresis=2)
    return config


class DataParallelOnly:
    """The model-parallel unit DeepSpeed asks for its data-parallel world size."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def parse(config: dict, world_size: int):
    from deepspeed.runtime import config as ds_config

    # DeepSpeedConfig reads the world size from the process group; stand in for an initialised one.
    with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0):
        return ds_config.DeepSpeedConfig(copy.deepcopy(config), mpu=DataParallelOnly(world_size))


@pytest.mark.parametrize("name, stage", STRATEGIES.items())
def test_config_leaves_batch_sizes_to_lightning(name, stage):
    config = shipped(name)
    for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_clipping", "optimizer"):
        assert key not in config, f"{name}: {key} is Lightning's to set"
    assert "bf16" not in config and "fp16" not in config, f"{name}: precision is trainer.precision's to set"
    assert config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("name, stage", STRATEGIES.items())
def test_deepspeed_parses_the_config(name, stage, world_size):
    config = as_lightning_fills(shipped(name), micro_batch=4, accumulate=2, clip=1.0, precision="bf16-mixed")
    parsed = parse(config, world_size)
    assert parsed.train_batch_size == 4 * 2 * world_size
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.gradient_clipping == 1.0
    assert parsed.zero_config.overlap_comm and parsed.zero_config.contiguous_gradients
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save


def test_deepspeed_parser_catches_typos_in_zero_options():
    """So the test above would notice a misspelt option in a shipped file."""
    config = as_lightning_fills(shipped("deepspeed_zero3"), 1, 1, 0.0, "bf16-mixed")
    config["zero_optimization"]["stage3_prefetch_bucket_sise"] = 1
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sise"):
        parse(config, 1)


@pytest.mark.parametrize("name", STRATEGIES)
def test_build_strategy_hands_the_yaml_to_lightning(name):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_modules.common import build_strategy, gathered_parameters, is_zero3

    strategy = build_strategy(TrainerConfig(strategy=name))
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config == shipped(name)
    assert is_zero3(strategy) == (name == "deepspeed_zero3")
    import torch

    with gathered_parameters(build_strategy(TrainerConfig()), [torch.nn.Parameter(torch.ones(2))]):
        pass  # a no-op without ZeRO-3


@pytest.mark.parametrize("precision, bf16, fp16", [("32-true", False, False), ("bf16-mixed", True, False),
                                                   ("16-mixed", False, True)])
def test_default_precision_gives_one_consistent_precision(precision, bf16, fp16):
    """The issue's check: trainer.strategy=deepspeed_zero2 alone used to run DeepSpeed in bf16 while
    Lightning assumed fp32. Now DeepSpeed gets what trainer.precision says, and nothing else."""
    config = deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", precision=precision))
    parsed = parse(as_lightning_fills(config, 2, 1, 1.0, precision), 1)
    assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == (bf16, fp16)


def test_a_users_file_that_disagrees_with_trainer_precision_is_refused(tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"ds\.json .*bf16\.enabled is true but trainer\.precision is '32-true'"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(own)))
    config = deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(own), precision="bf16-mixed"))
    assert config["bf16"] == {"enabled": True}
    own.write_text(json.dumps({"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="bf16.enabled is false but trainer.precision is 'bf16-true'"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(own), precision="bf16-true"))


def test_a_users_file_is_checked_against_the_strategy_and_lightnings_keys(tmp_path):
    own = tmp_path / "ds.yaml"
    own.write_text("zero_optimization:\n  stage: 3\n")
    with pytest.raises(ConfigError, match=r"zero_optimization.stage is 3 but trainer.strategy=deepspeed_stage_2 is ZeRO stage 2"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_stage_2", deepspeed_config=str(own)))
    assert deepspeed_config(TrainerConfig(strategy="deepspeed_zero3", deepspeed_config=str(own))) == {"zero_optimization": {"stage": 3}}
    own.write_text("zero_optimization: {stage: 2}\ngradient_accumulation_steps: 4\n")
    with pytest.raises(ConfigError, match="remove 'gradient_accumulation_steps'"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(own)))
    own.write_text("zero_optimization: [\n")
    with pytest.raises(ConfigError, match="ds.yaml: not a readable DeepSpeed JSON/YAML"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(own)))
    with pytest.raises(ConfigError, match="trainer.deepspeed_config.*file not found"):
        deepspeed_config(TrainerConfig(strategy="deepspeed_zero2", deepspeed_config=str(tmp_path / "missing.json")))


@pytest.mark.parametrize("strategy, offload, stage", [("deepspeed_zero2", True, 2), ("deepspeed_stage_2_offload", False, 2),
                                                      ("deepspeed_zero3", True, 3), ("deepspeed_stage_3_offload", False, 3)])
def test_offload_by_switch_or_lightning_name_parses(strategy, offload, stage):
    config = deepspeed_config(TrainerConfig(strategy=strategy, deepspeed_offload=offload, precision="bf16-mixed"))
    parsed = parse(as_lightning_fills(config, 2, 1, 1.0, "bf16-mixed"), 8)
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert (parsed.zero_config.offload_param is not None and parsed.zero_config.offload_param.device == "cpu") == (stage == 3)
    assert parsed.zero_force_ds_cpu_optimizer is False  # the LightningModules' torch AdamW is allowed


def test_lightning_names_are_accepted_and_typos_named():
    from experiments.config import load_config

    cfg = load_config(ROOT / "experiments/smoke.yaml", ["trainer.strategy=deepspeed_stage_3"])
    assert deepspeed_config(cfg.trainer)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="deepspeed_stage_3"):
        load_config(ROOT / "experiments/smoke.yaml", ["trainer.strategy=deepspeed_stage3"])


def test_preflight_refuses_deepspeed_keys_without_deepspeed():
    from experiments.config import load_config
    from experiments.validation import _check_strategy

    cfg = load_config(ROOT / "experiments/smoke.yaml", ["trainer.deepspeed_offload=true"])
    with pytest.raises(ConfigError, match="apply to the deepspeed strategies only; trainer.strategy is 'auto'"):
        _check_strategy(cfg.trainer)
