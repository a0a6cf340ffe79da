"""Distributed strategies by id: each entry builds what Lightning's Trainer takes as `strategy`.

Torch-free at import (Lightning is imported inside the builders), so experiments/registry.py can
list and validate ids cheaply. Add a strategy: one builder function and one `STRATEGIES.add` line.
"""
from __future__ import annotations

import yaml

from datamodules.io import Registry, project_root

STRATEGIES = Registry("strategy")
DEEPSPEED_CONFIGS = {
    "deepspeed_zero2": "experiments/strategies/deepspeed_zero2.yaml",
    "deepspeed_zero3": "experiments/strategies/deepspeed_zero3.yaml",
}
"""The shipped DeepSpeed configs, relative to the project root."""


def auto_strategy(find_unused_parameters: bool = False):
    return "auto"


def fsdp_strategy(find_unused_parameters: bool = False):
    return "fsdp"


def ddp_strategy(find_unused_parameters: bool = False, backend=None):
    """find_unused_parameters: for modules whose loss may skip some parameters (the router's
    contrastive head when that loss is off); DDP would otherwise stop with an error."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend=backend, find_unused_parameters=find_unused_parameters)


def ddp_cpu_strategy(find_unused_parameters: bool = False):
    return ddp_strategy(find_unused_parameters, backend="gloo")


def _deepspeed(name: str):
    def build(find_unused_parameters: bool = False):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=yaml.safe_load((project_root() / DEEPSPEED_CONFIGS[name]).read_text()))

    return build


STRATEGIES.add("auto", auto_strategy, "Lightning picks (single device)")
STRATEGIES.add("ddp", ddp_strategy, "DistributedDataParallel")
STRATEGIES.add("ddp_cpu", ddp_cpu_strategy, "DDP on CPU processes (gloo), for testing")
STRATEGIES.add("fsdp", fsdp_strategy, "Fully sharded data parallel")
STRATEGIES.add("deepspeed_zero2", _deepspeed("deepspeed_zero2"), "DeepSpeed ZeRO-2")
STRATEGIES.add("deepspeed_zero3", _deepspeed("deepspeed_zero3"), "DeepSpeed ZeRO-3")
