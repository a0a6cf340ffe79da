"""Distributed strategies by id: each entry builds what Lightning's Trainer takes as `strategy`.

Torch-free at import (Lightning is imported inside the builders), so experiments/registry.py can
list and validate ids cheaply. Add a strategy: one builder function and one `STRATEGIES.add` line.
"""
from __future__ import annotations

import functools

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


def fsdp_strategy(find_unused_parameters: bool = False, backend=None, strategy_class=None):
    """torch's FullyShardedDataParallel through Lightning, one shard unit per transformer block.

    Units are transformers' GradientCheckpointingLayer, the base class of every decoder layer in
    transformers >= 4.52 (Llama, Qwen, Mistral, ...), so any causal LM is sharded block by block
    without naming its layer class; a model without such layers is one unit (correct, less sharded).
    use_orig_params: the base is frozen and only the LoRA experts inside those blocks train; FSDP
    mixes frozen and trainable tensors in one unit only with it. Stages wrap their model themselves
    (common.fsdp_wrapped). find_unused_parameters is a DDP check with no FSDP counterpart.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.modeling_layers import GradientCheckpointingLayer

    return (strategy_class or FSDPStrategy)(auto_wrap_policy={GradientCheckpointingLayer}, use_orig_params=True,
                                            process_group_backend=backend)


def fsdp_cpu_strategy(find_unused_parameters: bool = False):
    """FSDP over CPU processes (gloo), for testing: Lightning's FSDPStrategy with two CPU workarounds.

    torch's FSDP runs on CPU when given device_id=cpu (common.fsdp_wrapped passes the root device),
    but Lightning's Trainer refuses an FSDPStrategy with a non-CUDA accelerator. It checks the exact
    type (`type(strategy) is FSDPStrategy`), so a subclass passes. The subclass also gathers full
    checkpoints without Lightning's offload_to_cpu=True, which crashes on CPU (see _cpu_fsdp_class).
    """
    return fsdp_strategy(find_unused_parameters, backend="gloo", strategy_class=_cpu_fsdp_class())


@functools.cache
def _cpu_fsdp_class():
    """Lightning's FSDPStrategy whose full-state checkpoints stay where the tensors are (built on
    first use, so that this module imports without Lightning).

    Lightning always asks FSDP to "offload" a full state dict to CPU; with the tensors already on
    CPU, torch 2.13's FSDP then segfaults in `state_dict()` (reproduced with two gloo processes and
    a plain FullStateDictConfig(offload_to_cpu=True); offload_to_cpu=False works). The subclass
    swaps Lightning's one helper for that context, around the three methods that use it.
    """
    from contextlib import contextmanager
    from unittest import mock

    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def full_state_in_place(module, world_size: int, rank0_only: bool = True):
        return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    @contextmanager
    def no_offload():
        with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", full_state_in_place):
            yield

    class CPUFSDPStrategy(lightning_fsdp.FSDPStrategy):
        def lightning_module_state_dict(self):
            with no_offload():
                return super().lightning_module_state_dict()

        def optimizer_state(self, optimizer):
            with no_offload():
                return super().optimizer_state(optimizer)

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            with no_offload():
                return super().load_checkpoint(checkpoint_path, weights_only)

    return CPUFSDPStrategy


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
STRATEGIES.add("fsdp", fsdp_strategy, "Fully sharded data parallel, one unit per transformer block")
STRATEGIES.add("fsdp_cpu", fsdp_cpu_strategy, "FSDP on CPU processes (gloo), for testing")
STRATEGIES.add("deepspeed_zero2", _deepspeed("deepspeed_zero2"), "DeepSpeed ZeRO-2")
STRATEGIES.add("deepspeed_zero3", _deepspeed("deepspeed_zero3"), "DeepSpeed ZeRO-3")
