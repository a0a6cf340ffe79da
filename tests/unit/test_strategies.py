"""The shipped DeepSpeed configs pass DeepSpeed's own parser once Lightning has filled in its part."""
from __future__ import annotations

import copy
from pathlib import Path
from unittest import mock

import pytest
import yaml

from lightning_modules.strategies import DEEPSPEED_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}

deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed: `DS_BUILD_OPS=0 pip install -e .[deepspeed]` to check the configs"
)


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / DEEPSPEED_CONFIGS[name]).read_text())


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
    assert config["bf16"]["enabled"] is True
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

    strategy = build_strategy(name, "gpu")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config == shipped(name)
    assert is_zero3(strategy) == (name == "deepspeed_zero3")
    import torch

    with gathered_parameters(build_strategy("auto", "cpu"), [torch.nn.Parameter(torch.ones(2))]):
        pass  # a no-op without ZeRO-3
