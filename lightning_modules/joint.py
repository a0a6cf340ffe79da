"""Stage `joint` (optional): tune router and experts together at a low learning rate.

Loss = LM loss on fused responses under the router's own (differentiable) gates
     + router_loss_weight × router loss against the activation labels.
The base model stays frozen; the encoder's context embedding is computed without gradients.

    personafuse run experiments/smoke.yaml stages=[datagen,adapter_sft,router,joint]
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.io import DataError, iter_jsonl, require_keys
from datamodules.loaders import train_loader
from datamodules.personas import PersonaSet, load_personas
from datamodules.sft import IGNORE_INDEX, SFTDataset, collate
from lightning_modules.common import (
    adamw, build_trainer, last_checkpoint, load_experts, refusing_unsafe_checkpoint, seed_everything,
)
from lightning_modules.components.personafuse import assemble_folder
from lightning_modules.components.router import router_loss, save_router


class JointModule(L.LightningModule):
    """Router + experts trained on fused responses; `build` returns (PersonaFuse) inside configure_model."""

    def __init__(self, build: Callable, loss_weights, trait_pairs, router_weight: float, lr: float):
        super().__init__()
        self.build, self.loss_weights = build, loss_weights
        self.trait_pairs, self.router_weight, self.lr = list(trait_pairs), router_weight, lr
        self.fuse = None
        self.strict_loading = False  # checkpoints hold experts and router only

    def configure_model(self) -> None:
        if self.fuse is None:
            self.fuse = self.build()

    def training_step(self, batch, batch_idx):
        terms = self._step(batch)
        self.log_dict({f"joint/train_{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=len(batch["conversation"]))
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        terms = self._step(batch)
        self.log_dict({f"joint/val_{k}": v for k, v in terms.items()}, batch_size=len(batch["conversation"]))

    def _step(self, batch) -> dict[str, torch.Tensor]:
        fuse = self.fuse
        with torch.no_grad():
            pooled = fuse.encoder(batch["conversation"]).to(self.device)
        logits = fuse.router(pooled)
        gates = fuse.router.normalise(logits)  # the gate settings the router was trained and saved with
        out = fuse.persona_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], gates=gates).logits
        labels = batch["labels"][:, 1:]
        lm = F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        routed = router_loss(fuse.router, logits, batch["label"].to(logits.dtype), pooled, self.loss_weights, self.trait_pairs)
        return {"loss": lm + self.router_weight * routed["loss"], "lm_loss": lm.detach(), "router_loss": routed["loss"].detach()}

    def configure_optimizers(self):
        params = [p for p in self.fuse.persona_model.parameters() if p.requires_grad] + list(self.fuse.router.parameters())
        return adamw(params, self.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" in k or ".router." in k}


def fused_dataset(records: Sequence[dict], tokenizer, personas: PersonaSet, max_length: int) -> SFTDataset:
    """{messages, response, label} -> masked tokens, the label vector, and the conversation to route."""
    return SFTDataset(((r["messages"], r["response"], {"conversation": r["messages"],
                        "label": personas.label_vector(r["label"], r.get("where", "joint data"))}) for r in records),
                      tokenizer, max_length)


def load_fused_records(path: Path, on_bad_line: str = "fail") -> list[dict]:
    records = []
    for lineno, raw in iter_jsonl(path, on_bad_line):
        require_keys(raw, ("messages", "response", "label"), f"{path}:{lineno}")
        records.append({**raw, "where": f"{path}:{lineno}"})
    if not records:
        raise DataError(f"{path}: no fused responses to train the joint stage on")
    return records


def _split(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded held-out part (at least one record when there are two or more)."""
    order = list(range(len(records)))
    random.Random(f"{seed}-joint").shuffle(order)
    n_val = max(1, round(len(records) * val_fraction)) if len(records) >= 2 and val_fraction > 0 else 0
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def _builder(cfg, outputs: dict) -> Callable:
    def build():
        from lightning_modules.components.personafuse import PersonaFuse
        from lightning_modules.components.router import load_router
        personas = load_personas(cfg.personas.file)
        model, tok = load_experts(cfg.model, cfg.lora, outputs["adapter_sft"]["adapters"], personas.ids)
        model.train()
        router, meta = load_router(Path(outputs["router"]["router"]))
        return PersonaFuse(model, tok, router.train(), meta)

    return build


def run(ctx) -> dict:
    cfg, jc = ctx.cfg, ctx.cfg.joint
    for needed in ("adapter_sft", "router"):
        if needed not in ctx.outputs:
            raise DataError(f"stage joint needs stage '{needed}' earlier in `stages`")
    seed_everything(cfg.seed)
    personas = load_personas(cfg.personas.file)
    source = jc.data if jc.data != "auto" else ctx.outputs.get("datagen", {}).get("joint")
    if not source:
        raise DataError("stage joint needs fused responses: run datagen first or set joint.data to a JSONL file")
    from lightning_modules.components.base_model import load_configured_tokenizer

    tok = load_configured_tokenizer(cfg.model)
    train, val = _split(load_fused_records(source, cfg.data.on_bad_line), cfg.adapter_sft.val_fraction, cfg.seed)
    loaders = [train_loader(fused_dataset(part, tok, personas, jc.max_length), jc.batch_size, cfg.seed,
                            collate(tok.pad_token_id, ("label",)), shuffle)
               for part, shuffle in ((train, True), (val or train, False))]
    rc = cfg.router
    module = JointModule(_builder(cfg, ctx.outputs), rc.loss, personas.trait_pairs(), jc.router_loss_weight, jc.lr)
    trainer = build_trainer(cfg.trainer, ctx.stage_dir, ctx.tracking_uri, ctx.run_id,
                            jc.max_steps if jc.max_steps is not None else cfg.trainer.max_steps,
                            find_unused_parameters=True)  # the router's contrastive head when that loss is off
    resume = last_checkpoint(ctx.stage_dir)
    before = None if resume else _lm_loss(trainer.validate(module, loaders[1], verbose=False))
    with refusing_unsafe_checkpoint(resume):
        trainer.fit(module, loaders[0], loaders[1], ckpt_path=resume, weights_only=True)
    after = _lm_loss(trainer.validate(module, loaders[1], verbose=False))
    return _export(ctx, module.fuse, personas, {"lm_loss_before": before, "lm_loss_after": after, "steps": int(trainer.global_step)})


def _lm_loss(results: list[dict]) -> Optional[float]:
    return float(results[0]["joint/val_lm_loss"]) if results else None


def _export(ctx, fuse, personas: PersonaSet, result: dict) -> dict:
    """Tuned adapters and router in the same layout as adapter_sft and router, plus one PersonaFuse folder."""
    if not ctx.is_rank_zero:
        return result
    cfg = ctx.cfg
    adapters, router_dir = ctx.stage_dir / "adapters", ctx.stage_dir / "router"
    for name in personas.ids:
        fuse.persona_model.export_peft(name, adapters / name, cfg.model.name_or_path, cfg.model.revision)
    save_router(fuse.router, router_dir, fuse.meta)
    lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)}
    folder = assemble_folder(ctx.stage_dir / "personafuse", adapters, router_dir, cfg.model.name_or_path, personas.ids, lora)
    ctx.log_artifact(folder, "personafuse")
    return {**result, "adapters": str(adapters), "router": str(router_dir), "personafuse": str(folder)}
