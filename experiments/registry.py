"""Every name -> builder map a YAML may name, in one place. YAML names ids from here, never import paths.

Each registry lives at the layer that dispatches on it and is collected here (imports run one way):
- STAGES, LAUNCHERS: defined here (the pipeline and the sweep runner dispatch on them);
- SYSTEMS: lightning_modules/evaluate_systems.py; STRATEGIES: lightning_modules/strategies.py;
- TEACHERS, GATES, ENCODERS: lightning_modules/components/registries.py;
- BENCHMARKS: datamodules/benchmarks/__init__.py (imported on first use: the benchmark classes need torch).

Entries are `module:attribute` strings where importing the target would pull in torch, so that
`personafuse --help` and config validation stay fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datamodules.io import Registry
from lightning_modules.components.registries import DATAGEN_NOT_CONTENT, ENCODERS, GATES, TEACHERS
from lightning_modules.evaluate_systems import SYSTEMS
from lightning_modules.strategies import STRATEGIES

STAGES = Registry("stage")
LAUNCHERS = Registry("launcher")

LAUNCHERS.add("local", "experiments.sweep.launchers:LocalLauncher", "sweep trials as subprocesses on this machine (parallel: N at once)")
LAUNCHERS.add("slurm", "experiments.sweep.launchers:SlurmLauncher", "one SLURM job per sweep trial (or a job array) through submitit")

# Add a stage: lightning_modules/<id>.py with run(ctx) -> dict, one line here, a config section.
STAGES.add("datagen", "lightning_modules.datagen:run", "Persona-CoT data generation with a local or OpenAI-compatible teacher")
STAGES.add("adapter_sft", "lightning_modules.adapter_sft:run", "train the persona experts (one run, mixed poles)")
STAGES.add("evaluate", "lightning_modules.evaluate:run", "benchmarks and downstream tasks for every system")
STAGES.add("joint", "lightning_modules.joint:run", "optional low-lr joint tuning of router and experts")
STAGES.add("router", "lightning_modules.router:run", "train the router on situation activation labels")
STAGES.add("sft_baseline", "lightning_modules.adapter_sft:run_sft_baseline", "one LoRA on all fused responses (SFT baseline)")



@dataclass(frozen=True)
class StageInputs:
    """What a stage's result depends on, so that a rerun redoes only the stages a change touches."""

    reads: tuple[str, ...]
    """Config sections or dotted settings the stage reads (it reads nothing else)."""
    consumes: tuple[str, ...] = ()
    """Earlier stages whose outputs it reads (when they are in `stages`)."""
    ignores: tuple[str, ...] = ()
    """Settings under `reads` that cannot change its result (transport, pass/fail thresholds)."""


_TRAINING = ("seed", "model", "personas", "data.on_bad_line", "lora", "trainer")
# A stage missing here depends on the whole config and on every earlier stage (always safe).
STAGE_INPUTS = {
    "datagen": StageInputs(("model", "personas", "data", "datagen"), (), tuple(f"datagen.{k}" for k in DATAGEN_NOT_CONTENT)),
    "adapter_sft": StageInputs((*_TRAINING, "adapter_sft"), ("datagen",)),
    "sft_baseline": StageInputs((*_TRAINING, "adapter_sft"), ("datagen",)),
    "router": StageInputs((*_TRAINING, "data", "router"), ("adapter_sft",)),
    "joint": StageInputs((*_TRAINING, "router", "joint", "adapter_sft.val_fraction"), ("datagen", "adapter_sft", "router")),
    "evaluate": StageInputs((*_TRAINING, "data", "evaluate", "datagen.teacher.replies"),
                            ("adapter_sft", "sft_baseline", "router", "joint")),
}

NEUTRAL_SETTINGS = {
    "trainer.deepspeed_config": "None",
    "trainer.deepspeed_offload": "False",
    "evaluate.benchmarks.*.systems": "None",
}
"""Settings added to the schema after runs existed, with the value (as flattened) that changes nothing.
A stage's hash leaves such a setting out while it holds that value, so upgrading the suite does not
redo finished stages; set to anything else, it counts as usual. Add a new setting here when its
default keeps every result as it was."""

__all__ = ["BENCHMARKS", "ENCODERS", "GATES", "LAUNCHERS", "NEUTRAL_SETTINGS", "STAGES", "STAGE_INPUTS", "STRATEGIES", "SYSTEMS", "TEACHERS"]


def __getattr__(name: str) -> Any:
    if name == "BENCHMARKS":  # lazily: the benchmark package imports torch
        from datamodules.benchmarks import BENCHMARKS

        return BENCHMARKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
