"""Evaluated systems are configurations, not code: which adapters, which gates, which prompt.

An ablation is one more `SystemSpec` in `builtin_systems` (SYSTEMS is the registry of them; torch-free).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from datamodules.io import Registry
from datamodules.personas import BIG_FIVE


@dataclass(frozen=True)
class SystemSpec:
    description: str
    adapters: Optional[str] = None
    """Stage whose adapters the system loads: adapter_sft (persona experts) or sft_baseline."""
    gates: Optional[str] = None
    """router, router_top1, uniform, oracle (curated labels) or None (no adapters / the single SFT LoRA)."""
    persona_prompt: bool = False
    """Prepend the direct persona-prompting system prompt."""
    drop_trait: Optional[str] = None
    """Zero the gates of both poles of this trait (the no_<trait> ablations)."""
    pole: Optional[str] = None
    """With gates=pole: switch on this one expert alone (the expert_<pole> trait checks)."""

    @property
    def needs_router(self) -> bool:
        return self.gates in ("router", "router_top1")


def builtin_systems() -> dict[str, SystemSpec]:
    systems = {
        "base": SystemSpec("the base model as is"),
        "prompting": SystemSpec("direct persona prompting: read the situation, adopt fitting traits", persona_prompt=True),
        "sft": SystemSpec("one LoRA trained on all fused responses", adapters="sft_baseline", gates="single"),
        "personafuse": SystemSpec("persona experts mixed by the router", adapters="adapter_sft", gates="router"),
        "uniform_gates": SystemSpec("experts with equal gates (ablation)", adapters="adapter_sft", gates="uniform"),
        "oracle_gates": SystemSpec("experts gated by the curated labels, normalised as the router's gates (ablation)", adapters="adapter_sft", gates="oracle"),
        "top1": SystemSpec("only the router's top expert (ablation)", adapters="adapter_sft", gates="router_top1"),
        "prompting+personafuse": SystemSpec("persona prompt plus routed experts", adapters="adapter_sft", gates="router",
                                            persona_prompt=True),
    }
    for trait in BIG_FIVE:
        systems[f"no_{trait}"] = SystemSpec(f"router gates with both {trait} poles off (ablation)",
                                            adapters="adapter_sft", gates="router", drop_trait=trait)
        for pole in ("high", "low"):
            systems[f"expert_{trait}_{pole}"] = SystemSpec(f"only the {trait}_{pole} expert, gate 1 (trait check)",
                                                           adapters="adapter_sft", gates="pole", pole=f"{trait}_{pole}")
    return systems


SYSTEMS = Registry("system")
for _name, _spec in builtin_systems().items():
    SYSTEMS.add(_name, _spec, _spec.description)


def system_params(name: str, spec: SystemSpec) -> dict[str, str]:
    """A system's spec as MLflow params (`system.gates`, ...), so the compare view says how systems differ."""
    return {"system": name, **{f"system.{k}": str(v) for k, v in asdict(spec).items()}}
