"""PersonaFuse for inference: route once per conversation, hold the gates, generate with the KV cache.

Also `ChatModel`, the EvalModel every evaluated system is (base, prompting, SFT, PersonaFuse and
the ablations differ only in the gate function and the system prompt they are given).
No Lightning here.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lightning_modules.components import persona_lora
from lightning_modules.components.persona_lora import PersonaLoRAModel
from lightning_modules.components.router import Router, build_encoder, load_router, save_router

GateFn = Callable[[Sequence[list[dict]]], Optional[torch.Tensor]]


class ChatModel:
    """Greedy chat generation and option log-likelihoods under per-conversation gates.

    `generate` and `option_logprobs` are the EvalModel protocol the benchmarks call; the `*_gated`
    forms also return the gates used, one row per conversation (empty without a gate function).
    """

    def __init__(self, model: nn.Module, tokenizer, gate_fn: Optional[GateFn] = None,
                 system_prompt: Optional[str] = None, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.gate_fn, self.system_prompt, self.batch_size = gate_fn, system_prompt, batch_size

    def prompted(self, conversation: list[dict]) -> list[dict]:
        """The conversation as the model sees it: with the system's persona prompt, if it has one."""
        if not self.system_prompt:
            return list(conversation)
        if conversation and conversation[0]["role"] == "system":
            merged = self.system_prompt + "\n\n" + conversation[0]["content"]
            return [{"role": "system", "content": merged}] + list(conversation[1:])
        return [{"role": "system", "content": self.system_prompt}] + list(conversation)

    def route(self, conversations: Sequence[list[dict]]) -> Optional[torch.Tensor]:
        """Gates come from the user's conversation, before any persona prompt is added."""
        return self.gate_fn(conversations) if self.gate_fn else None

    @torch.no_grad()
    def generate_gated(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> tuple[list[str], list[list[float]]]:
        texts: list[str] = []
        used: list[list[float]] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start : start + self.batch_size]
            gates = self.route(chunk)
            texts += generate_with_gates(self.model, self.tokenizer, [self.prompted(c) for c in chunk], gates, max_new_tokens)
            used += [] if gates is None else gates.tolist()
        return texts, used

    @torch.no_grad()
    def option_scores_gated(self, conversations: Sequence[list[dict]],
                            options: Sequence[Sequence[str]]) -> tuple[list[list[tuple[float, bool]]], list[list[float]]]:
        """(log-likelihood, is greedy) per option, and the gates used; see `option_scores_rows`."""
        out: list[list[tuple[float, bool]]] = []
        used: list[list[float]] = []
        for start in range(0, len(conversations), self.batch_size):
            convs = conversations[start : start + self.batch_size]
            gates = self.route(convs)
            out += option_scores_rows(self.model, self.tokenizer, [self.prompted(c) for c in convs],
                                      options[start : start + self.batch_size], gates)
            used += [] if gates is None else gates.tolist()
        return out, used

    def option_logprobs_gated(self, conversations: Sequence[list[dict]],
                              options: Sequence[Sequence[str]]) -> tuple[list[list[float]], list[list[float]]]:
        scores, used = self.option_scores_gated(conversations, options)
        return [[logp for logp, _ in row] for row in scores], used

    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        return self.generate_gated(conversations, max_new_tokens)[0]

    def option_logprobs(self, conversations: Sequence[list[dict]], options: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.option_logprobs_gated(conversations, options)[0]


def gate_kwargs(model: nn.Module, gates: Optional[torch.Tensor]) -> dict:
    """What a forward/generate call passes for `gates`: the one place that asks whether a model has
    persona experts (a plain transformers model is the base system and takes no gates)."""
    if isinstance(model, PersonaLoRAModel):
        return {"gates": gates}
    if gates is not None:
        raise ValueError(f"gates given for {type(model).__name__}, which has no persona experts")
    return {}


def generate_with_gates(model, tokenizer, conversations: Sequence[list[dict]], gates: Optional[torch.Tensor],
                        max_new_tokens: int) -> list[str]:
    """Left-padded batched greedy decoding; each sequence keeps its own gates for every token."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    gates = None if gates is None else gates.to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, **gate_kwargs(model, gates))
    # One gate vector for the whole batch (batch 1, identical gates) and enough tokens to amortise
    # it: fold the experts into the base weights, so each token costs what the base model costs.
    merge = isinstance(model, PersonaLoRAModel) and max_new_tokens >= persona_lora.MERGE_PAYS_FROM_TOKENS
    with torch.no_grad(), model.merged(gates, strict=False) if merge else nullcontext():
        out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def option_logprobs_rows(model, tokenizer, conversations, options, gates) -> list[list[float]]:
    """Sum of log p(option tokens | templated prompt) per row (see `option_scores_rows`)."""
    return [[logp for logp, _ in row] for row in option_scores_rows(model, tokenizer, conversations, options, gates)]


def option_scores_rows(model, tokenizer, conversations, options, gates) -> list[list[tuple[float, bool]]]:
    """(sum of log p(option tokens | templated prompt), whether greedy decoding yields the option)
    per row; lm-eval's loglikelihood needs the flag. Each distinct prompt runs once and its KV cache
    is shared by all of its options (benchmark prompts are long, options short); rows with the same
    prompt and options (one item under several systems' gates) run as one batch."""
    device = next(model.parameters()).device
    groups: dict[tuple, list[int]] = {}
    for i, (conv, opts) in enumerate(zip(conversations, options)):
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        groups.setdefault((text, tuple(opts)), []).append(i)
    scores: list[list[tuple[float, bool]]] = [[] for _ in conversations]
    for (text, opts), rows in groups.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([ids] * len(rows), device=device)
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts]
        if any(not o for o in option_ids):
            raise ValueError(f"an option tokenises to nothing: {list(opts)!r}")
        row_gates = None if gates is None else gates[rows].to(device)
        for i, row_scores in zip(rows, _score_options(model, prompt, option_ids, row_gates, tokenizer.pad_token_id)):
            scores[i] = row_scores
    return scores


def _score_options(model, prompt: torch.Tensor, option_ids: list[list[int]], gates, pad_id: int) -> list[list[tuple[float, bool]]]:
    """(score, is greedy) per option for S copies of one prompt ([S, L]), row s under gates[s]."""
    out = model(input_ids=prompt, use_cache=True, **gate_kwargs(model, gates))
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    rows = prompt.shape[0]
    top = first.argmax(dim=-1).tolist()
    scores = [[(float(first[s, ids[0]]), top[s] == ids[0]) for ids in option_ids] for s in range(rows)]
    rest = max(len(ids) for ids in option_ids) - 1
    if rest == 0:  # single-token options (letters): the prompt's last position scores them all
        return scores
    n, length = len(option_ids), prompt.shape[1]
    cache_key = "cache" if "cache" in out else "past_key_values"  # transformers ≥5.2x renamed it
    cache = out[cache_key]
    cache.batch_repeat_interleave(n)
    # Feed option tokens 0..L-2 after the shared prompt; position t predicts token t+1. Right padding
    # is harmless: padded positions come after every token we read. Rows: (copy s, option j).
    ids = torch.full((n, rest), pad_id, dtype=torch.long, device=prompt.device)
    mask = torch.zeros((n, length + rest), dtype=torch.long, device=prompt.device)
    mask[:, :length] = 1
    for j, opt in enumerate(option_ids):
        ids[j, : len(opt) - 1] = torch.tensor(opt[:-1])
        mask[j, length : length + len(opt) - 1] = 1
    more = gate_kwargs(model, None if gates is None else gates.repeat_interleave(n, dim=0))
    logits = model(input_ids=ids.repeat(rows, 1), attention_mask=mask.repeat(rows, 1), use_cache=True,
                   **{cache_key: cache}, **more).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.argmax(dim=-1)
    for s in range(rows):
        for j, opt in enumerate(option_ids):
            score, greedy = scores[s][j]
            score += float(sum(logp[s * n + j, t - 1, opt[t]] for t in range(1, len(opt))))
            greedy = greedy and all(int(best[s * n + j, t - 1]) == opt[t] for t in range(1, len(opt)))
            scores[s][j] = (score, greedy)
    return scores


class PersonaFuse(nn.Module):
    """Experts + router + encoder; `route` computes gates once, `generate` generates under them.

    meta: what the router was saved with beside its own settings (encoder, layer, expert names); the
    gate settings belong to the router (see `load_router`)."""

    def __init__(self, persona_model: PersonaLoRAModel, tokenizer, router: Router, meta: dict,
                 encoder: Optional[nn.Module] = None):
        super().__init__()
        self.persona_model, self.tokenizer, self.router, self.meta = persona_model, tokenizer, router, meta
        self.encoder = encoder or build_encoder(meta["encoder"], meta["layer"], persona_model, tokenizer)

    @torch.no_grad()
    def route(self, conversations: Sequence[list[dict]]) -> torch.Tensor:
        pooled = self.encoder(conversations).to(next(self.router.parameters()).device)
        return self.router.gates(pooled)

    @torch.no_grad()
    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int = 128) -> tuple[list[str], torch.Tensor]:
        gates = self.route(conversations)
        return generate_with_gates(self.persona_model, self.tokenizer, conversations, gates, max_new_tokens), gates

    def save(self, folder: str | Path, base_model: str, lora: dict) -> Path:
        """One folder: adapters/<pole>/ (PEFT), router/ (safetensors + json), personafuse.json."""
        folder = Path(folder)
        for name in self.persona_model.expert_names:
            self.persona_model.export_peft(name, folder / "adapters" / name, base_model)
        save_router(self.router, folder / "router", self.meta)
        write_manifest(folder, base_model, self.persona_model.expert_names, lora)
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "float32", device: str = "cpu") -> "PersonaFuse":
        """Base model (by name), the PEFT adapters and the router from one saved folder."""
        from lightning_modules.components.base_model import load_base_model

        folder = Path(folder)
        meta_file = folder / MANIFEST
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} is not a PersonaFuse folder (no {MANIFEST})")
        meta = json.loads(meta_file.read_text())
        base, tok = load_base_model(meta["base_model"], dtype)
        lora = meta["lora"]
        model = PersonaLoRAModel(base, meta["experts"], lora["r"], lora["alpha"], 0.0, lora["target_modules"])
        for name in meta["experts"]:
            model.load_peft(name, folder / "adapters" / name)
        router, router_meta = load_router(folder / "router")
        model.to(device).eval()
        return cls(model, tok, router.to(device), router_meta)


MANIFEST = "personafuse.json"
"""What marks a PersonaFuse folder: the base model, the expert names and the LoRA settings."""


def write_manifest(folder: Path, base_model: str, experts: list[str], lora: dict) -> None:
    """The one writer of personafuse.json (PersonaFuse.save and assemble_folder)."""
    from datamodules.io import atomic_write_text

    atomic_write_text(Path(folder) / MANIFEST, json.dumps({"base_model": base_model, "experts": list(experts), "lora": lora},
                                                          indent=2))


def assemble_folder(dest: Path, adapters_dir: Path, router_dir: Path, base_model: str, experts: list[str], lora: dict) -> Path:
    """Copy trained adapters and router into one PersonaFuse folder, atomically (tmp dir, then rename)."""
    import shutil
    import tempfile

    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name in experts:
            shutil.copytree(Path(adapters_dir) / name, tmp / "adapters" / name)
        shutil.copytree(router_dir, tmp / "router")
        write_manifest(tmp, base_model, experts, lora)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
