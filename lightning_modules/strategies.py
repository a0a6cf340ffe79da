"""Distributed strategies by id: each entry builds what Lightning's Trainer takes as `strategy` from
the `trainer` config section.

Torch-free at import (Lightning is imported inside the builders), so experiments/registry.py can
list and validate ids cheaply. Add a strategy: one builder function and one `STRATEGIES.add` line.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from datamodules.io import ConfigError, Registry, project_path

STRATEGIES = Registry("strategy")
DEEPSPEED_CONFIGS = {
    2: "experiments/strategies/deepspeed_zero2.yaml",
    3: "experiments/strategies/deepspeed_zero3.yaml",
}
"""The shipped DeepSpeed config per ZeRO stage, relative to the project root."""


class DeepSpeedId(NamedTuple):
    stage: int
    offload: bool = False


DEEPSPEED_IDS = {
    "deepspeed_zero2": DeepSpeedId(2),
    "deepspeed_zero3": DeepSpeedId(3),
    # Lightning's own names, so a command line written for Lightning works unchanged ("deepspeed" is stage 2 there).
    "deepspeed": DeepSpeedId(2),
    "deepspeed_stage_2": DeepSpeedId(2),
    "deepspeed_stage_2_offload": DeepSpeedId(2, offload=True),
    "deepspeed_stage_3": DeepSpeedId(3),
    "deepspeed_stage_3_offload": DeepSpeedId(3, offload=True),
}
LIGHTNING_OWNED_KEYS = ("gradient_accumulation_steps", "train_batch_size")
"""DeepSpeed keys Lightning sets from the Trainer and refuses to find in a user's file."""
OFFLOAD = {"device": "cpu", "pin_memory": True}


def auto_strategy(t: Any, find_unused_parameters: bool = False):
    return "auto"


def fsdp_strategy(t: Any, find_unused_parameters: bool = False, backend=None, strategy_class=None):
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


def fsdp_cpu_strategy(t: Any, find_unused_parameters: bool = False):
    """FSDP over CPU processes (gloo), for testing: Lightning's FSDPStrategy with two CPU workarounds.

    torch's FSDP runs on CPU when given device_id=cpu (common.fsdp_wrapped passes the root device),
    but Lightning's Trainer refuses an FSDPStrategy with a non-CUDA accelerator. It checks the exact
    type (`type(strategy) is FSDPStrategy`), so a subclass passes. The subclass also gathers full
    checkpoints without Lightning's offload_to_cpu=True, which crashes on CPU (see _cpu_fsdp_class).
    """
    return fsdp_strategy(t, find_unused_parameters, backend="gloo", strategy_class=_cpu_fsdp_class())


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


def ddp_strategy(t: Any, find_unused_parameters: bool = False, backend=None):
    """find_unused_parameters: for modules whose loss may skip some parameters (the router's
    contrastive head when that loss is off); DDP would otherwise stop with an error."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend=backend, find_unused_parameters=find_unused_parameters)


def ddp_cpu_strategy(t: Any, find_unused_parameters: bool = False):
    return ddp_strategy(t, find_unused_parameters, backend="gloo")


def deepspeed_strategy(t: Any, find_unused_parameters: bool = False):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(t))


def deepspeed_config(t: Any) -> dict:
    """The dict DeepSpeedStrategy gets for `t.strategy`: the user's file (`trainer.deepspeed_config`) or
    the shipped one for its ZeRO stage, plus CPU offload when asked. Precision is not in the shipped
    files: Lightning writes it from `trainer.precision`; a user's file that sets it must agree.
    Raises ConfigError naming the file and key, so preflight catches it before any compute."""
    ds = DEEPSPEED_IDS[t.strategy]
    path = project_path(t.deepspeed_config or DEEPSPEED_CONFIGS[ds.stage])
    config = read_deepspeed_file(path)
    where = f"{path} (trainer.deepspeed_config)" if t.deepspeed_config else str(path)
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage != ds.stage:
        raise ConfigError(f"{where}: zero_optimization.stage is {stage!r} but trainer.strategy={t.strategy} is ZeRO "
                          f"stage {ds.stage}; make them agree")
    for key in LIGHTNING_OWNED_KEYS:
        if key in config:
            raise ConfigError(f"{where}: remove '{key}': Lightning sets it from the trainer section "
                              "(trainer.accumulate_grad_batches and the stage's batch_size)")
    check_deepspeed_precision(config, t.precision, where)
    if ds.offload or t.deepspeed_offload:
        add_offload(config, ds.stage)
    return config


def read_deepspeed_file(path: Path) -> dict:
    """A DeepSpeed config from JSON or YAML (YAML parses JSON too); errors name the file."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"key 'trainer.deepspeed_config': file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable DeepSpeed JSON/YAML file: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a mapping, got {type(config).__name__}")
    return json.loads(json.dumps(config))  # plain dicts, and proof it serialises as DeepSpeed needs


def _precision_kind(precision: str) -> str:
    text = str(precision)
    return "bf16" if "bf16" in text else "fp16" if text.startswith("16") else "fp32"


def check_deepspeed_precision(config: dict, precision: str, where: str) -> None:
    """bf16/fp16 blocks in a DeepSpeed file must say what `trainer.precision` says, or DeepSpeed would
    cast the model one way while Lightning's precision plugin assumes another."""
    wanted = _precision_kind(precision)
    for block in ("bf16", "fp16"):
        enabled = bool((config.get(block) or {}).get("enabled", False)) if block in config else None
        if enabled and block != wanted:
            raise ConfigError(f"{where}: {block}.enabled is true but trainer.precision is '{precision}' ({wanted}); set "
                              f"trainer.precision={'bf16-mixed' if block == 'bf16' else '16-mixed'} or remove the "
                              f"{block} block (precision comes from trainer.precision)")
        if enabled is False and block == wanted:
            raise ConfigError(f"{where}: {block}.enabled is false but trainer.precision is '{precision}'; remove the "
                              f"{block} block or set it to true")


def add_offload(config: dict, stage: int) -> None:
    """ZeRO-Offload: optimizer states (and under ZeRO-3 the parameters) in CPU RAM. The LightningModules
    use torch AdamW, so DeepSpeed must be told not to insist on its compiled DeepSpeedCPUAdam (the
    expert set is small; torch's fused CPU AdamW is fast enough and needs no compiled op)."""
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("offload_optimizer", dict(OFFLOAD))
    if stage == 3:
        zero.setdefault("offload_param", dict(OFFLOAD))
    config.setdefault("zero_force_ds_cpu_optimizer", False)


STRATEGIES.add("auto", auto_strategy, "Lightning picks (single device)")
STRATEGIES.add("ddp", ddp_strategy, "DistributedDataParallel")
STRATEGIES.add("ddp_cpu", ddp_cpu_strategy, "DDP on CPU processes (gloo), for testing")
STRATEGIES.add("fsdp", fsdp_strategy, "Fully sharded data parallel, one unit per transformer block")
STRATEGIES.add("fsdp_cpu", fsdp_cpu_strategy, "FSDP on CPU processes (gloo), for testing")
for _name, _ds in DEEPSPEED_IDS.items():
    _alias = "" if _name.startswith("deepspeed_zero") else " (Lightning's name)"
    STRATEGIES.add(_name, deepspeed_strategy, f"DeepSpeed ZeRO-{_ds.stage}{' + CPU offload' if _ds.offload else ''}{_alias}")
