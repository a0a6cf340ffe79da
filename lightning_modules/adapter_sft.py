"""Stage `adapter_sft`: train all persona experts in one run, base frozen, loss on responses only.

A batch mixes poles; each example is gated one-hot to its own expert. Each expert is exported as a
standard PEFT LoRA adapter (`adapters/<pole_id>/`). Stage `sft_baseline` reuses this code with one
expert trained on the union of fused responses (the SFT baseline system).

    personafuse run experiments/smoke.yaml stages=[adapter_sft]
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from datamodules.io import DataError
from datamodules.personas import load_personas
from datamodules.sft import IGNORE_INDEX, PersonaSFTDataModule, SFTRecord, load_sft_records, persona_example_records
from lightning_modules.common import (
    adamw, best_checkpoint, build_trainer, clip_gradients, fsdp_wrapped, gathered_parameters, last_checkpoint,
    persona_model_factory, refusing_unsafe_checkpoint, seed_everything, zero3_model_init,
)


VAL_LOSS = "val/loss"


class AdapterSFTModule(L.LightningModule):
    """LM loss on response tokens with every example gated to its own expert."""

    def __init__(self, model_factory: Callable, expert_names: Sequence[str], lr: float = 2e-4, weight_decay: float = 0.0):
        super().__init__()
        self.model_factory = model_factory
        self.model = None
        self.expert_names = list(expert_names)
        self.lr, self.weight_decay = lr, weight_decay
        self.val_loss = torch.nn.ModuleDict({p: MeanMetric() for p in self.expert_names})
        self.val_loss_all = MeanMetric()  # over every pole's tokens: what adapter_sft.export=best minimises
        self.strict_loading = False  # checkpoints hold the experts only

    def configure_model(self) -> None:
        # Built here, not in __init__, so DeepSpeed ZeRO-3 can shard it as it is created; FSDP wraps it once.
        if self.model is None:
            strategy = self._trainer.strategy if self._trainer is not None else None
            with zero3_model_init(strategy):
                self.model = fsdp_wrapped(strategy, self.model_factory())

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["pole"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        _, per_example, tokens = self._step(batch)
        self.val_loss_all.update(per_example, weight=tokens)
        self.log(VAL_LOSS, self.val_loss_all, on_epoch=True, batch_size=per_example.shape[0])
        for e, pole in enumerate(self.expert_names):
            mask = batch["pole"] == e
            if mask.any():
                # Token-weighted mean, so the metric equals the loss over all of the pole's tokens.
                self.val_loss[pole].update(per_example[mask], weight=tokens[mask])
                self.log(f"val/loss/{pole}", self.val_loss[pole], on_epoch=True, batch_size=int(mask.sum()))

    def _step(self, batch):
        gates = F.one_hot(batch["pole"], len(self.expert_names)).to(self.dtype_of_experts())
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], gates=gates).logits
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).view(labels.shape)
        tokens = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        per_example = token_loss.sum(dim=1) / tokens
        loss = token_loss.sum() / tokens.sum()
        return loss, per_example.detach(), tokens

    def dtype_of_experts(self) -> torch.dtype:
        return next(self.model.persona_layers()).lora_A.dtype

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return adamw(params, self.lr, self.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, self.model, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP: on its root

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" in k}


def train_experts(ctx, records: list[SFTRecord], expert_names: Sequence[str]) -> dict:
    """Fit experts on records, resume from the last checkpoint, export PEFT adapters; shared by both stages."""
    cfg, sft = ctx.cfg, ctx.cfg.adapter_sft
    seed_everything(cfg.seed)
    factory = persona_model_factory(cfg.model, cfg.lora, expert_names)
    module = AdapterSFTModule(factory, expert_names, sft.lr, sft.weight_decay)
    from lightning_modules.components.base_model import load_configured_tokenizer

    tokenizer = load_configured_tokenizer(cfg.model)
    data = PersonaSFTDataModule(records, tokenizer, expert_names, sft.batch_size, sft.max_length, sft.val_fraction, cfg.seed)
    max_steps = sft.max_steps if sft.max_steps is not None else cfg.trainer.max_steps
    trainer = build_trainer(cfg.trainer, ctx.stage_dir, ctx.tracking_uri, ctx.run_id, max_steps,
                            keep_best=VAL_LOSS if sft.export == "best" else None)
    resume = last_checkpoint(ctx.stage_dir)
    before = {} if resume else _val_losses(trainer.validate(module, datamodule=data, verbose=False))
    with refusing_unsafe_checkpoint(resume):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    exported = _exported_checkpoint(trainer) if sft.export == "best" else None  # None: the last step's weights
    with refusing_unsafe_checkpoint(exported):
        after = _val_losses(trainer.validate(module, datamodule=data, ckpt_path=exported, weights_only=True, verbose=False))
    adapters = ctx.stage_dir / "adapters"
    experts = [p for layer in module.model.persona_layers() for p in (layer.lora_A, layer.lora_B)]
    with gathered_parameters(trainer.strategy, experts):  # ZeRO-3 / FSDP: whole experts where they are written
        if trainer.is_global_zero:
            for name in expert_names:
                module.model.export_peft(name, adapters / name, cfg.model.name_or_path, cfg.model.revision)
    if trainer.is_global_zero:
        ctx.log_artifact(adapters, "adapters")
    return {"adapters": str(adapters), "experts": list(expert_names), "steps": int(trainer.global_step),
            "exported": "last" if exported is None else Path(exported).name,
            "val_loss_before": before, "val_loss_after": after, "train_records": len(records)}


def _exported_checkpoint(trainer) -> Optional[str]:
    """The kept best step to load before export, or None (with a warning) to export the last step."""
    best = best_checkpoint(trainer)
    if best is None:
        rank_zero_warn("adapter_sft.export=best: no validated step was checkpointed; exporting the last step")
    return best


def _val_losses(results: list[dict]) -> dict[str, float]:
    merged = {k: float(v) for r in results for k, v in r.items()}
    return {k.split("/")[-1]: v for k, v in merged.items() if k.startswith("val/loss/")}


def sft_records(ctx, personas) -> list[SFTRecord]:
    """Datagen's accepted pole responses when the pipeline has them, plus the persona examples."""
    sft = ctx.cfg.adapter_sft
    records: list[SFTRecord] = []
    source = sft.data
    if source == "auto":
        source = ctx.outputs.get("datagen", {}).get("sft") or "persona_examples"
    if source != "persona_examples":
        records += load_sft_records(source, personas.ids, ctx.cfg.data.on_bad_line)  # resolved at config load
    if sft.include_persona_examples or source == "persona_examples":
        records += persona_example_records(personas)
    if not records:
        raise DataError(f"adapter_sft: no training examples: {source} holds no pole responses and "
                        "adapter_sft.include_persona_examples is false")
    return records


def run(ctx) -> dict:
    personas = load_personas(ctx.cfg.personas.file)
    return train_experts(ctx, sft_records(ctx, personas), personas.ids)


def run_sft_baseline(ctx) -> dict:
    """One LoRA on the union of fused responses (or, without datagen, of all persona examples)."""
    personas = load_personas(ctx.cfg.personas.file)
    fused = ctx.outputs.get("datagen", {}).get("joint")
    if fused:
        from datamodules.io import read_jsonl

        records = [SFTRecord(tuple((m["role"], m["content"]) for m in r["messages"]), r["response"], "sft")
                   for r in read_jsonl(fused)]
    else:
        records = []
    if not records:
        records = [SFTRecord(r.messages, r.response, "sft") for r in persona_example_records(personas)]
    return train_experts(ctx, records, ["sft"])
