"""`personafuse export RUN_DIR OUT [--merge]`: a finished pipeline's models as standard artifacts.

    personafuse export outputs/quickstart exports/quickstart            # adapters, router, model card
    personafuse export outputs/quickstart exports/quickstart --merge    # + one plain model per pole
    personafuse export RUN OUT --gates extraversion_high=1,agreeableness_high=0.5   # + merged/gated/
    personafuse export RUN OUT --system expert_openness_high                       # + merged/<system>/

OUT holds `adapters/<pole>/` (PEFT LoRA adapters whose adapter_config.json names a loadable base),
`router/`, `sft_baseline/` (when the run trained it), `personafuse.json` (so `personafuse chat OUT`
loads it) and a README.md model card; with --merge, `merged/<pole>/` and `merged/sft_baseline/`:
the base with that adapter merged in (PEFT merge_and_unload), which plain transformers loads. With
--gates (any fixed gate vector) or --system (an evaluated system whose gates are fixed), the ten
experts are folded into the base under those gates by the same merge the routed model uses when it
generates (PersonaLoRAModel.merged), so the plain model generates what the routed model with those
gates generates. The experts come from the joint stage when it finished, else from adapter_sft + router.

Everything is written into a temporary sibling folder that is renamed to OUT at the end, so a kill
leaves no half-written OUT (only a `.OUT.partial-*` folder to delete).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from datamodules.io import DataError, atomic_write_text, did_you_mean, read_json

SFT = "sft_baseline"


class ExportError(DataError):
    """A run folder that cannot be exported (naming what is missing), or an OUT that would be overwritten."""


@dataclass
class RunModels:
    """What a finished run holds, found through its stages' state.json (paths relative to the run folder,
    so a moved run folder still exports)."""

    run_dir: Path
    model: dict
    """The run's `model` config section (name_or_path, dtype, revision, trust_remote_code)."""
    lora: dict
    experts: list[str]
    trained_by: str
    """joint, or adapter_sft (experts) + router."""
    adapters: Path
    router: Path
    sft: Optional[Path] = None
    results: dict[str, dict] = field(default_factory=dict)


def find_run_models(run_dir: str | Path) -> RunModels:
    """Check the run folder before anything is written; one error lists every missing piece."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{run_dir}: not a pipeline output folder (no {config_file.name}; `personafuse run` writes it)")
    cfg = yaml.safe_load(config_file.read_text())
    results = {s: _finished(run_dir, s) for s in ("adapter_sft", "router", "joint", SFT)}
    missing = [f"{run_dir / s / 'state.json'}: stage {s} has not finished" for s in ("adapter_sft", "router")
               if results[s] is None]
    if missing:
        raise ExportError(f"{run_dir}: cannot export: " + "; ".join(missing) + " (run it with `personafuse run`)")
    source = "joint" if results["joint"] is not None else None
    experts = list(results["adapter_sft"]["experts"])
    models = RunModels(run_dir, cfg["model"], cfg["lora"], experts, source or "adapter_sft + router",
                       run_dir / (source or "adapter_sft") / "adapters", run_dir / (source or "router") / "router",
                       run_dir / SFT / "adapters" / "sft" if results[SFT] is not None else None,
                       {k: v for k, v in results.items() if v is not None})
    _require_files(models)
    return models


def _finished(run_dir: Path, stage: str) -> Optional[dict]:
    """A stage's result when its state.json says it completed, else None."""
    state = read_json(run_dir / stage / "state.json") or {}
    return state.get("result", {}) if state.get("complete") else None


def _require_files(models: RunModels) -> None:
    """Every file the export copies, so a folder deleted by hand fails here, not half-way."""
    needed = [models.adapters / e / f for e in models.experts for f in ("adapter_config.json", "adapter_model.safetensors")]
    needed += [models.router / "router.json", models.router / "router.safetensors"]
    if models.sft is not None:
        needed += [models.sft / "adapter_config.json", models.sft / "adapter_model.safetensors"]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        raise ExportError(f"{models.run_dir}: cannot export: missing {', '.join(absent)}")


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, gates: Optional[str] = None,
               system: Optional[str] = None) -> Path:
    """Write OUT whole or not at all (temporary sibling folder, renamed at the end)."""
    models = find_run_models(run_dir)
    fixed = fixed_gates(models.experts, gates, system)  # checked before anything is written
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: choose another OUT or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        merged = _write(models, tmp, merge)
        if fixed is not None:
            name = system or "gated"
            merge_gates(models, fixed, tmp / "merged" / name)
            merged.append(name)
        atomic_write_text(tmp / "README.md", model_card(models, merged))
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(models: RunModels, tmp: Path, merge: bool) -> list[str]:
    """Adapters, router, manifest and (with merge) merged models into tmp; returns the merged names."""
    from lightning_modules.components.personafuse import write_manifest

    for name in models.experts:
        copy_adapter(models.adapters / name, tmp / "adapters" / name, models.model)
    shutil.copytree(models.router, tmp / "router")
    write_manifest(tmp, models.model["name_or_path"], models.experts,
                   {k: models.lora[k] for k in ("r", "alpha", "target_modules")})
    sources = {name: tmp / "adapters" / name for name in models.experts}
    if models.sft is not None:
        copy_adapter(models.sft, tmp / SFT, models.model)
        sources[SFT] = tmp / SFT
    if not merge:
        return []
    from lightning_modules.components.base_model import load_tokenizer

    m = models.model
    tokenizer = load_tokenizer(m["name_or_path"], m.get("trust_remote_code", False), m.get("revision"))
    for name, adapter in sources.items():
        merge_adapter(m, adapter, tmp / "merged" / name, tokenizer)
    return list(sources)


def copy_adapter(src: Path, dest: Path, model: dict) -> None:
    """Copy a PEFT adapter, naming a base that loads anywhere on this machine (loadable_name), so
    adapters exported before that fix, or naming an alias, load with AutoPeftModelForCausalLM too."""
    from peft import PeftConfig

    from lightning_modules.components.base_model import loadable_name

    shutil.copytree(src, dest)
    config = PeftConfig.from_pretrained(str(src))
    config.base_model_name_or_path = loadable_name(model["name_or_path"])
    config.revision = model.get("revision")
    config.save_pretrained(str(dest))


def merge_adapter(model: dict, adapter: Path, dest: Path, tokenizer) -> None:
    """The base with one adapter merged in, saved as a plain transformers model with its tokenizer.
    A fresh base per adapter: merge_and_unload writes into the base's weights. The merge runs in
    float32 and the result is cast to the run's dtype after, so B·A is rounded once, not per step."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_modules.components.base_model import resolve_model_path, torch_dtype

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model["name_or_path"]), dtype=torch.float32,
                                                revision=model.get("revision"),
                                                trust_remote_code=model.get("trust_remote_code", False))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.to(torch_dtype(model.get("dtype", "float32"))).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def fixed_gates(experts: list[str], gates: Optional[str], system: Optional[str]) -> Optional[dict[str, float]]:
    """--gates 'pole=w,pole=w' or --system NAME as {pole: gate}; None when neither was given. Only a
    system whose gates do not depend on the conversation can become one plain model."""
    if gates and system:
        raise ExportError("give --gates or --system, not both")
    if system:
        return _system_gates(system)
    if not gates:
        return None
    vector: dict[str, float] = {}
    for part in gates.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in experts:
            raise ExportError(f"--gates: '{name}' is not an expert of this run{did_you_mean(name, experts)} "
                              f"(experts: {', '.join(experts)})")
        try:
            vector[name] = float(value) if eq else float("nan")
        except ValueError:
            vector[name] = float("nan")
        if not math.isfinite(vector[name]):
            raise ExportError(f"--gates: '{part.strip()}' needs a number after '=' (e.g. {name}=0.5)")
    if not any(vector.values()):
        raise ExportError("--gates: every gate is 0, which is the base model itself; nothing to merge")
    return vector


def _system_gates(system: str) -> dict[str, float]:
    from lightning_modules.evaluate_systems import SYSTEMS

    try:
        spec = SYSTEMS.get(system)
    except KeyError as err:
        raise ExportError(f"--system: {err.args[0]}") from None
    if spec.gates == "pole":
        return {spec.pole: 1.0}
    why = {"single": "it is the SFT baseline's single LoRA: --merge writes it as merged/sft_baseline",
           None: "it has no experts to merge"}.get(spec.gates, f"its gates ({spec.gates}) depend on each conversation")
    if spec.persona_prompt:
        why = "its persona prompt is text, not weights"
    raise ExportError(f"--system {system}: cannot be one plain model: {why}. Systems with fixed gates: "
                      "expert_<pole>; any fixed vector: --gates pole=w,...")


def merge_gates(models: RunModels, gates: dict[str, float], dest: Path) -> None:
    """The base with the experts folded in under one gate vector, saved as a plain transformers model.
    Inside `merged` the persona layers hold plain nn.Linear modules, so save_pretrained writes the
    base architecture with merged weights and no LoRA keys."""
    import torch

    from experiments.config import LoraConfig, ModelConfig
    from lightning_modules.common import load_experts

    model_cfg = ModelConfig(**{**models.model, "device": "cpu"})
    lora = LoraConfig(**{k: models.lora[k] for k in ("r", "alpha", "target_modules")})
    model, tokenizer = load_experts(model_cfg, lora, str(models.adapters), models.experts)
    row = torch.tensor([[gates.get(name, 0.0) for name in model.expert_names]], dtype=next(model.parameters()).dtype)
    with torch.no_grad(), model.merged(row):
        model.base_model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    atomic_write_text(dest / "gates.json", json.dumps({name: gates.get(name, 0.0) for name in model.expert_names}, indent=2))


def model_card(models: RunModels, merged: list[str]) -> str:
    """README.md: what each folder is, the base model, how the experts were trained, metrics, how to load."""
    from huggingface_hub import ModelCardData

    from lightning_modules.components.base_model import loadable_name

    base = loadable_name(models.model["name_or_path"])
    revision = models.model.get("revision")
    router = json.loads((models.router / "router.json").read_text())
    meta = ModelCardData(base_model=base, library_name="peft", tags=["personafuse", "lora", "big-five"])
    lines = [f"---\n{meta.to_yaml()}\n---", f"# PersonaFuse experts exported from `{models.run_dir}`", "",
             f"- **Base model**: `{base}`" + (f" at revision `{revision}`" if revision else "")
             + f" (the run's `model.name_or_path = {models.model['name_or_path']}`)",
             f"- **Experts**: {len(models.experts)} LoRA adapters (r={models.lora['r']}, alpha={models.lora['alpha']}, "
             f"targets {', '.join(models.lora['target_modules'])}), trained by {models.trained_by}",
             f"- **Router**: {router.get('gate')} gates (top_k={router.get('top_k')}, temperature={router.get('temperature')}) "
             f"over {router.get('encoder')} features (layer {router.get('layer')})", ""]
    lines += _folders(models, merged) + [""] + _metrics(models) + _usage(models, merged)
    return "\n".join(lines) + "\n"


def _folders(models: RunModels, merged: list[str]) -> list[str]:
    rows = ["| folder | what |", "|---|---|",
            f"| `adapters/<pole>/` | one PEFT LoRA adapter per pole: {', '.join(models.experts)} |",
            "| `router/` | router.safetensors + router.json: reads the conversation, outputs one gate per pole |",
            "| `personafuse.json` | experts + router as one model: `personafuse chat OUT` |"]
    if models.sft is not None:
        rows.append(f"| `{SFT}/` | the SFT baseline: one LoRA on all fused responses (PEFT adapter) |")
    if merged:
        rows.append("| `merged/<name>/` | base + that adapter (or, for `gated` and systems, the experts under the gates in "
                    "its gates.json) merged: a plain transformers model with its tokenizer |")
    return rows


def _metrics(models: RunModels) -> list[str]:
    """The run's headline numbers: the evaluation summary when the run evaluated, else the training results."""
    lines = ["## Results", ""]
    evaluate = read_json(models.run_dir / "evaluate" / "state.json") or {}
    summary = (evaluate.get("result") or {}).get("summary") if evaluate.get("complete") else None
    if summary:
        return lines + [summary, ""]
    sft, router = models.results["adapter_sft"], models.results["router"]
    lines.append(f"- adapter_sft: {sft.get('steps')} steps on {sft.get('train_records')} examples; exported step: {sft.get('exported')}")
    if router.get("test"):
        headline = {k: v for k, v in router["test"].items() if "/test_f1/" not in k}  # per-pole F1s: in MLflow
        lines.append("- router test: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(headline.items())))
    return lines + ["", "The run folder was not evaluated (no finished `evaluate` stage).", ""]


def _usage(models: RunModels, merged: list[str]) -> list[str]:
    pole = models.experts[0]
    base = models.model["name_or_path"]
    code = ["```python", "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("adapters/{pole}")  # loads the base it names']
    if merged:
        code += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'model = AutoModelForCausalLM.from_pretrained("merged/{pole}")  # no peft needed',
                 f'tokenizer = AutoTokenizer.from_pretrained("merged/{pole}")']
    return ["## Load", ""] + code + ["```", "",
            f"The routed model (gates chosen per conversation) needs PersonaFuse: `personafuse chat OUT`. "
            f"Base alias in personafuse.json: `{base}`."]
