"""Is this config runnable? Every check that can fail a run, done before its first stage writes anything.

Two tiers, because `load_config` must stay cheap (every shipped YAML loads in the unit tests, with
no torch and no environment):
- `check_ranges`: numbers and choices, from the config alone (called by `load_config`);
- `preflight`: what the config points at (files, benchmark data, teacher endpoints and keys, the
  stages a system needs), called by `personafuse run` before the output folder is created, so a
  typo costs seconds instead of the training that ran before it.
Every error is one `ConfigError` line naming the key (and the file where one applies): exit 2.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from datamodules.io import ConfigError, DataError, did_you_mean

# Key -> allowed interval, in the usual notation ("(0, inf)": > 0, "[0, 1]": a fraction).
# `None` is allowed wherever the schema allows it (it means "off" or "use the default").
RANGES: dict[str, str] = {
    "trainer.max_steps": "[1, inf)", "trainer.num_nodes": "[1, inf)", "trainer.log_every_n_steps": "[1, inf)",
    "trainer.accumulate_grad_batches": "[1, inf)", "trainer.checkpoint_every_n_steps": "[1, inf)",
    "trainer.val_check_interval": "[1, inf)", "trainer.gradient_clip_val": "(0, inf)",
    "lora.r": "[1, inf)", "lora.alpha": "(0, inf)", "lora.dropout": "[0, 1)",
    "data.val_fraction": "[0, 1)", "data.test_fraction": "[0, 1)",
    "datagen.limit": "[1, inf)", "datagen.parse_retries": "[0, inf)", "datagen.activation_threshold": "[0, 1]",
    "datagen.retry_temperature": "[0, inf)", "datagen.analysis_max_new_tokens": "[1, inf)",
    "datagen.min_words": "[0, inf)", "datagen.max_words": "[1, inf)", "datagen.duplicate_threshold": "[0, 1]",
    "datagen.min_accepted_fraction": "[0, 1]", "datagen.max_error_fraction": "[0, 1]",
    "adapter_sft.lr": "(0, inf)", "adapter_sft.weight_decay": "[0, inf)", "adapter_sft.batch_size": "[1, inf)",
    "adapter_sft.max_length": "[1, inf)", "adapter_sft.max_steps": "[1, inf)", "adapter_sft.val_fraction": "[0, 1)",
    "router.hidden": "[1, inf)", "router.temperature": "(0, inf)", "router.top_k": "[1, inf)",
    "router.lr": "(0, inf)", "router.batch_size": "[1, inf)", "router.max_epochs": "[1, inf)", "router.dropout": "[0, 1)",
    "router.loss.bce": "[0, inf)", "router.loss.contrastive": "[0, inf)", "router.loss.load_balance": "[0, inf)",
    "router.loss.pole_exclusivity": "[0, inf)",
    "joint.lr": "(0, inf)", "joint.router_loss_weight": "[0, inf)", "joint.batch_size": "[1, inf)",
    "joint.max_length": "[1, inf)", "joint.max_steps": "[1, inf)",
    "evaluate.batch_size": "[1, inf)", "evaluate.bootstrap_samples": "[0, inf)",
    "evaluate.judge.limit": "[1, inf)", "evaluate.judge.reply_max_new_tokens": "[1, inf)",
}
TEACHER_RANGES = {"max_concurrency": "[1, inf)", "timeout_s": "(0, inf)", "max_retries": "[0, inf)",
                  "backoff_s": "[0, inf)", "temperature": "[0, inf)", "max_new_tokens": "[1, inf)", "batch_size": "[1, inf)"}
TEACHER_SECTIONS = ("datagen.teacher", "evaluate.judge.teacher")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.on_bad_line": ("fail", "skip"),
    "datagen.split": ("train", "val", "test", "all"),
}


# --------------------------------------------------------------------------- from the config alone


def check_ranges(cfg: Any, source: str) -> None:
    """Numbers inside their meaningful range, and choices among the known words (e.g. max_steps=-1
    would train forever, lora.r=0 divides by zero)."""
    node = OmegaConf.structured(cfg)
    limits = dict(RANGES)
    limits.update({f"{s}.{k}": v for s in TEACHER_SECTIONS for k, v in TEACHER_RANGES.items()})
    limits.update({f"evaluate.benchmarks.{name}.limit": "[0, inf)" for name in cfg.evaluate.benchmarks})
    for key, interval in limits.items():
        value = OmegaConf.select(node, key)
        if value is not None and not _inside(value, interval):
            raise ConfigError(f"{source}: key '{key}': must be in {interval}, got {value!r}")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(node, key)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{key}': must be one of {list(allowed)}, got {value!r}"
                              f"{did_you_mean(str(value), allowed)}")
    _check_cross_fields(cfg, source)


def _inside(value: float, interval: str) -> bool:
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval).groups()
    low, high = float(low), float(high)
    if isinstance(value, float) and math.isnan(value):
        return False
    above = value >= low if low_bracket == "[" else value > low
    below = value <= high if high_bracket == "]" else value < high
    return above and below


def _check_cross_fields(cfg: Any, source: str) -> None:
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f"{source}: keys 'data.val_fraction' + 'data.test_fraction' must be < 1 (nothing would be "
                          f"left to train on), got {cfg.data.val_fraction} + {cfg.data.test_fraction}")
    if cfg.datagen.min_words > cfg.datagen.max_words:
        raise ConfigError(f"{source}: key 'datagen.min_words' ({cfg.datagen.min_words}) is above "
                          f"'datagen.max_words' ({cfg.datagen.max_words}): every response would be rejected")


# --------------------------------------------------------------------------- what the config points at


def preflight(cfg: Any) -> None:
    """Load what every configured stage will read and check each service it will call; write nothing."""
    stages = set(cfg.stages)
    personas = _load(_personas, cfg)
    if stages & {"datagen", "router", "joint", "evaluate"}:
        _load(_situations, cfg, personas)
    if "datagen" in stages:
        _datagen_inputs(cfg)
    for section in ("adapter_sft", "joint"):
        data = getattr(cfg, section).data
        if section in stages and data not in ("auto", "persona_examples") and not Path(data).is_file():
            raise ConfigError(f"key '{section}.data': file not found: {data}")
    if "evaluate" in stages:
        from lightning_modules.evaluate import check_evaluation

        if cfg.evaluate.judge.enabled:
            check_teacher(cfg.evaluate.judge.teacher, "evaluate.judge.teacher")
        check_evaluation(cfg, list(cfg.stages))
    _check_strategy(cfg.trainer)
    _check_fsdp(cfg)


def _load(loader, *args):
    """Run a loader; a data error is a config error (exit 2) naming the file it came from."""
    try:
        return loader(*args)
    except DataError as err:
        raise ConfigError(str(err)) from None


def _personas(cfg: Any):
    from datamodules.personas import load_personas

    return load_personas(cfg.personas.file)


def _situations(cfg: Any, personas):
    from datamodules.situations import load_situations

    try:  # an empty file, or one whose every line was skipped, fails in load_situations itself
        return load_situations(cfg.data.situations, personas, cfg.data.on_bad_line)
    except DataError as err:
        raise ConfigError(f"key 'data.situations': {err}") from None


def _datagen_inputs(cfg: Any) -> None:
    from lightning_modules.components.persona_cot import PromptSet

    PromptSet.load(cfg.datagen.prompt_file, cfg.datagen.prompts)
    if cfg.datagen.teacher.kind != "curated":
        check_teacher(cfg.datagen.teacher, "datagen.teacher")


def check_teacher(teacher: Any, section: str) -> None:
    """An HTTP teacher needs an endpoint, a model name and, unless api_key_env is '', its key's variable."""
    if teacher.kind != "openai":
        return
    for key in ("base_url", "model"):
        if not getattr(teacher, key):
            raise ConfigError(f"key '{section}.{key}' is required for an openai teacher")
    if not re.match(r"https?://[^/]", teacher.base_url):
        raise ConfigError(f"key '{section}.base_url': must be an http(s):// URL")
    if teacher.api_key_env and not os.environ.get(teacher.api_key_env):
        raise ConfigError(f"key '{section}.api_key_env': environment variable {teacher.api_key_env} is not set; "
                          f"export it, or set {section}.api_key_env='' for an endpoint that needs no key")


def _check_strategy(trainer: Any) -> None:
    """A DeepSpeed strategy's config file is read and checked (stage, precision, Lightning's keys) here."""
    from lightning_modules.strategies import DEEPSPEED_IDS, deepspeed_config

    if trainer.strategy in DEEPSPEED_IDS:
        deepspeed_config(trainer)
    elif trainer.deepspeed_config or trainer.deepspeed_offload:
        raise ConfigError(f"keys 'trainer.deepspeed_config' / 'trainer.deepspeed_offload' apply to the deepspeed "
                          f"strategies only; trainer.strategy is '{trainer.strategy}'")


def _check_fsdp(cfg: Any) -> None:
    """The FSDP settings that would fail only once a Trainer starts (or, for joint, would train wrongly)."""
    strategy, accelerator = cfg.trainer.strategy, cfg.trainer.accelerator
    if strategy == "fsdp" and (accelerator == "cpu" or (accelerator == "auto" and not _cuda_available())):
        raise ConfigError(f"key 'trainer.strategy': fsdp needs a GPU (Lightning's FSDP refuses "
                          f"trainer.accelerator={accelerator}{'' if accelerator == 'cpu' else ' without CUDA'}); "
                          "use trainer.strategy=fsdp_cpu for FSDP over CPU processes (gloo, for testing)")
    if strategy in ("fsdp", "fsdp_cpu") and "joint" in cfg.stages:
        raise ConfigError(f"key 'trainer.strategy': {strategy} cannot run stage joint yet: Lightning would re-wrap its "
                          "model at each of its Trainer calls (validate, fit, validate; Lightning issue #19015) and "
                          "it saves experts and router without gathering their shards; use ddp or deepspeed_zero2 "
                          "for a run with joint")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
