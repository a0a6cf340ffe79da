"""The only name -> object map. YAML names ids from here, never import paths.

Entries are loaded lazily (`module:attribute` strings internal to this project) so that
`personafuse --help` and config validation do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from datamodules.io import did_you_mean


class Registry:
    """Named entries of one kind (stages, systems, ...), resolved on first use."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str | Callable[..., Any] | Any] = {}
        self._docs: dict[str, str] = {}

    def add(self, name: str, target: str | Any, doc: str = "") -> None:
        if name in self._entries:
            raise KeyError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = target
        self._docs[name] = doc

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        target = self._entries[name]
        if isinstance(target, str) and ":" in target:
            module, attr = target.split(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, self._entries)
        return f"unknown {self.kind} '{name}'{hint} (registered: {', '.join(sorted(self._entries))})"

    def describe(self) -> dict[str, str]:
        return dict(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


STAGES = Registry("stage")
SYSTEMS = Registry("system")
BENCHMARKS = Registry("benchmark")
TEACHERS = Registry("teacher")
LAUNCHERS = Registry("launcher")
STRATEGIES = Registry("strategy")
ENCODERS = Registry("router encoder")
GATES = Registry("gate normalisation")

# Strategies: Lightning's own names, or a shipped DeepSpeed YAML under experiments/strategies/.
STRATEGIES.add("auto", "auto", "Lightning picks (single device)")
STRATEGIES.add("ddp", "ddp", "DistributedDataParallel")
STRATEGIES.add("ddp_cpu", "ddp", "DDP on CPU processes (gloo), for testing")
STRATEGIES.add("fsdp", "fsdp", "Fully sharded data parallel")
STRATEGIES.add("deepspeed_zero2", "experiments/strategies/deepspeed_zero2.yaml", "DeepSpeed ZeRO-2")
STRATEGIES.add("deepspeed_zero3", "experiments/strategies/deepspeed_zero3.yaml", "DeepSpeed ZeRO-3")

GATES.add("sigmoid", "sigmoid", "independent sigmoid per pole")
GATES.add("softmax", "softmax", "softmax over poles with temperature")
GATES.add("topk", "topk", "softmax over the top-k poles, others zero")

ENCODERS.add("base_hidden", "base_hidden", "mean-pooled hidden states of the frozen base model")
ENCODERS.add("minilm", "minilm", "the bundled all-MiniLM-L6-v2 sentence encoder")

TEACHERS.add("local", "local", "a transformers model through Lightning's predict loop")
TEACHERS.add("openai", "openai", "any OpenAI-compatible chat-completions endpoint")
TEACHERS.add("curated", "curated", "replays the curated Persona-CoT corpus (datagen only; generates nothing)")

LAUNCHERS.add("local", "experiments.sweep.launchers:LocalLauncher", "sweep trials as subprocesses on this machine (parallel: N at once)")
LAUNCHERS.add("slurm", "experiments.sweep.launchers:SlurmLauncher", "one SLURM job per sweep trial (or a job array) through submitit")


def register_builtin_entries() -> None:
    """Stages, systems and benchmarks that exist; each later module adds one line here."""
    from experiments.systems import builtin_systems

    for name, spec in builtin_systems().items():
        SYSTEMS.add(name, spec, spec.description)
    STAGES.add("datagen", "lightning_modules.datagen:run", "Persona-CoT data generation with a local or OpenAI-compatible teacher")
    STAGES.add("adapter_sft", "lightning_modules.adapter_sft:run", "train the persona experts (one run, mixed poles)")
    for bench, cls in (("eq_bench", "EQBench"), ("emobench_eu", "EmoBenchEU"), ("emobench_ea", "EmoBenchEA"),
                       ("mpi", "MPI"), ("gsm8k", "GSM8K"), ("mmlu", "MMLU"), ("xstest", "XSTest")):
        BENCHMARKS.add(bench, f"datamodules.benchmarks:{cls}", f"built-in benchmark ({cls})")
    STAGES.add("evaluate", "lightning_modules.evaluate:run", "benchmarks and downstream tasks for every system")
    STAGES.add("joint", "lightning_modules.joint:run", "optional low-lr joint tuning of router and experts")
    STAGES.add("router", "lightning_modules.router:run", "train the router on situation activation labels")
    STAGES.add("sft_baseline", "lightning_modules.adapter_sft:run_sft_baseline", "one LoRA on all fused responses (SFT baseline)")


register_builtin_entries()
