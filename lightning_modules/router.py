"""Stage `router`: learn situation -> pole activations with the base model and experts frozen.

The encoder is frozen, so every situation is embedded once (cached in the stage folder) and the
MLP trains on those embeddings in seconds. Logs loss, micro/macro/per-pole F1 (labels thresholded
at 0.5), MAE, and a heatmap of the mean gate per domain.

    personafuse run experiments/smoke.yaml stages=[router]
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MultilabelF1Score
from tqdm.auto import tqdm

from datamodules.io import atomic_write_bytes, config_hash, to_container
from datamodules.loaders import train_loader
from datamodules.personas import load_personas
from datamodules.situations import Situation, load_situations, require_split, split_situations
from lightning_modules.common import build_trainer, seed_everything
from lightning_modules.components.personafuse import assemble_folder
from lightning_modules.components.router import GateSettings, Router, build_encoder, router_loss, save_router


class RouterModule(L.LightningModule):
    """BCE (+ optional contrastive, load-balance, pole-exclusivity) on cached context embeddings."""

    def __init__(self, router: Router, expert_names: Sequence[str], loss_weights, trait_pairs, lr: float = 1e-3):
        super().__init__()
        self.router, self.expert_names = router, list(expert_names)
        self.loss_weights, self.trait_pairs, self.lr = loss_weights, list(trait_pairs), lr
        n = len(self.expert_names)
        self.metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({
                "f1_micro": MultilabelF1Score(n, threshold=0.5, average="micro"),
                "f1_macro": MultilabelF1Score(n, threshold=0.5, average="macro"),
                "f1_pole": MultilabelF1Score(n, threshold=0.5, average="none"),
                "mae": MeanAbsoluteError(),
            }) for split in ("val", "test")
        })

    def training_step(self, batch, batch_idx):
        terms = self._losses(batch)
        for name, value in terms.items():
            self.log(f"router/train_{name}", value, on_step=False, on_epoch=True, batch_size=batch[0].shape[0])
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _losses(self, batch):
        pooled, labels = batch
        return router_loss(self.router, self.router(pooled), labels, pooled, self.loss_weights, self.trait_pairs)

    def _evaluate(self, batch, split: str) -> None:
        pooled, labels = batch
        probs = torch.sigmoid(self.router(pooled))
        targets = (labels >= 0.5).long()
        m = self.metrics[split]
        for key in ("f1_micro", "f1_macro", "f1_pole"):
            m[key].update(probs, targets)
        m["mae"].update(probs, labels)
        self.log(f"router/{split}_loss", self._losses(batch)["loss"], on_epoch=True, batch_size=labels.shape[0])

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, split: str) -> None:
        m = self.metrics[split]
        self.log(f"router/{split}_f1_micro", m["f1_micro"].compute())
        self.log(f"router/{split}_f1_macro", m["f1_macro"].compute())
        self.log(f"router/{split}_mae", m["mae"].compute())
        for pole, value in zip(self.expert_names, m["f1_pole"].compute()):
            self.log(f"router/{split}_f1/{pole}", value)
        for metric in m.values():
            metric.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def embed_situations(encoder, items: Sequence[Situation], batch_size: int = 16) -> torch.Tensor:
    """[N, dim] pooled context embeddings, in item order."""
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc="embed situations", unit="batch"):
        chunks.append(encoder([s.conversation() for s in items[start : start + batch_size]]).cpu())
    return torch.cat(chunks)


def cached_embeddings(ctx, items: Sequence[Situation]) -> torch.Tensor:
    """Embeddings of every situation, cached per (encoder config, model, corpus) in the stage folder."""
    from safetensors.torch import load_file, save

    cfg = ctx.cfg
    key = config_hash({"encoder": cfg.router.encoder, "layer": cfg.router.layer, "model": to_container(cfg.model),
                       "ids": [s.id for s in items], "texts": [s.messages for s in items]})
    path = ctx.stage_dir / f"embeddings-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"]
    encoder = _encoder(cfg)
    emb = embed_situations(encoder, items)
    if ctx.is_rank_zero:  # every rank embeds (each needs them); one writes the cache
        atomic_write_bytes(path, save({"embeddings": emb.contiguous()}))
    return emb


def _encoder(cfg):
    model = tokenizer = None
    if cfg.router.encoder == "base_hidden":
        from lightning_modules.components.base_model import load_configured, pick_device

        model, tokenizer = load_configured(cfg.model)
        model.to(pick_device(cfg.model.device))
    return build_encoder(cfg.router.encoder, cfg.router.layer, model, tokenizer)


def run(ctx) -> dict:
    cfg, rc = ctx.cfg, ctx.cfg.router
    seed_everything(cfg.seed)
    personas = load_personas(cfg.personas.file)
    items = load_situations(cfg.data.situations, personas, cfg.data.on_bad_line)
    splits = split_situations(items, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    for needed in ("train", "test"):  # it trains on one and reports the other
        require_split(splits, needed, "router", cfg.data.situations)
    ordered = [s for name in ("train", "val", "test") for s in splits[name]]
    emb = cached_embeddings(ctx, ordered)
    labels = torch.tensor([personas.label_vector(s.label, s.id) for s in ordered])
    bounds = _bounds([len(splits[n]) for n in ("train", "val", "test")])
    loaders = {n: _loader(emb[a:b], labels[a:b], rc.batch_size, n == "train", cfg.seed) for n, (a, b) in bounds.items()}
    router = Router(emb.shape[1], len(personas.ids), rc.hidden, rc.dropout, GateSettings(rc.gate, rc.temperature, rc.top_k))
    module = RouterModule(router, personas.ids, rc.loss, personas.trait_pairs(), rc.lr)
    trainer = build_trainer(cfg.trainer, ctx.stage_dir, ctx.tracking_uri, ctx.run_id, max_steps=-1,
                            max_epochs=rc.max_epochs, checkpoint=False, find_unused_parameters=True,
                            shard=False)  # an MLP on cached embeddings: whole on every rank, so saved whole
    trainer.fit(module, loaders["train"], loaders["val"])
    test = {k: float(v) for k, v in trainer.test(module, loaders["test"], verbose=False)[0].items()}
    folder = ctx.stage_dir / "router"
    if not ctx.is_rank_zero:
        return {"router": str(folder), "test": test}
    save_router(router, folder, {"encoder": rc.encoder, "layer": rc.layer, "expert_names": personas.ids,
                                 "embedding_dim": emb.shape[1]})
    gates = _gates(router, emb)
    heatmap = plot_gate_heatmap(gates, [s.domain for s in ordered], personas.ids, ctx.stage_dir / "gates_by_domain.png")
    ctx.log_artifact(folder, "router")
    ctx.log_artifact(heatmap)
    result = {"router": str(folder), "test": test, "splits": {n: len(v) for n, v in splits.items()}}
    if "adapter_sft" in ctx.outputs:  # experts + router as one loadable folder (`personafuse chat`)
        lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)}
        result["personafuse"] = str(assemble_folder(ctx.stage_dir / "personafuse", Path(ctx.outputs["adapter_sft"]["adapters"]),
                                                    folder, cfg.model.name_or_path, personas.ids, lora))
    return result


def _gates(router: Router, emb: torch.Tensor) -> torch.Tensor:
    router.eval()
    with torch.no_grad():
        return router.gates(emb)


def plot_gate_heatmap(gates: torch.Tensor, domains: Sequence[str], poles: Sequence[str], path: Path) -> Path:
    """Mean gate per (domain, pole): the picture a reviewer checks for Trait Activation Theory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(domains))
    mean = torch.stack([gates[[i for i, d in enumerate(domains) if d == n]].mean(0) for n in names]).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(poles), 1.0 + 0.4 * len(names)))
    im = ax.imshow(mean, cmap="viridis", vmin=0, vmax=max(1e-6, float(mean.max())), aspect="auto")
    ax.set_xticks(range(len(poles)), [p.replace("_", "\n") for p in poles], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("Mean router gate per domain")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _bounds(sizes: list[int]) -> dict[str, tuple[int, int]]:
    a, out = 0, {}
    for name, n in zip(("train", "val", "test"), sizes):
        out[name] = (a, a + n)
        a += n
    return out


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return train_loader(TensorDataset(x, y), batch_size, seed, shuffle=shuffle)
