"""Routed ÷ base generation throughput on an 8B-shaped random Llama in bf16 (scripts/gpu_check.sh).

The CPU benchmark (benchmarks/throughput.py) measures the embedded 135M model, where per-op overhead
dominates. This one asks the question #18 cares about at cluster scale: at Llama-3-8B's shape on one
GPU, what does PersonaFuse (router + ten gated LoRA experts, r=16 on every linear) cost per generated
token against the bare base model, at batch 1 and batch 8? Same prompts, same number of new tokens
(EOS is switched off), paired repeats: each ratio is per repeat, then the median.

The vocabulary is the carried tokenizer's (SmolLM2, 49152) rather than Llama-3's 128256, so the LM
head is smaller than a real 8B's: ratios are slightly pessimistic for PersonaFuse (the head is shared).
`--shape tiny --device cpu` runs the same code in seconds, for the tests.

    python benchmarks/gpu_throughput.py [--shape llama8b|tiny] [--device cuda] [--json OUT]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.throughput import LLAMA_8B, POLES, PROMPTS, Series, paired_ratio  # noqa: E402

SHAPES = {
    "llama8b": {k: v for k, v in LLAMA_8B.items() if k != "vocab_size"},
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
TARGETS = {1: 0.95, 8: 0.85}
"""#18's throughput targets: routed ÷ base tokens/s at batch 1 and batch 8."""


def build(shape: str, device: str, dtype: torch.dtype, rank: int):
    """(base, PersonaFuse) on `device`: a random Llama of `shape` and a copy wrapped with ten experts
    whose B matrices are non-zero (trained-size deltas) and a random router."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_modules.components.base_model import load_tokenizer
    from lightning_modules.components.persona_lora import PersonaLoRAModel
    from lightning_modules.components.personafuse import PersonaFuse
    from lightning_modules.components.router import GateSettings, Router

    tok = load_tokenizer("tiny-random-llama")
    config = LlamaConfig(**SHAPES[shape], vocab_size=len(tok), max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    base.generation_config.eos_token_id = None  # every system generates exactly the asked tokens
    pm = PersonaLoRAModel(copy.deepcopy(base), POLES, r=rank, alpha=2.0 * rank, dropout=0.0).to(device=device, dtype=dtype)
    for layer in pm.persona_layers():
        layer.lora_B.data.normal_(0.0, 0.02)
    # The default router gates (router.gate: topk, top_k 3): each row runs 3 of the 10 experts.
    router = Router(config.hidden_size, len(POLES), hidden=256, dropout=0.0, gate=GateSettings("topk", 1.0, 3))
    # The router reads a middle layer, as the quickstart's reads layer 16 of SmolLM2's 30.
    meta = {"encoder": "base_hidden", "layer": config.num_hidden_layers // 2, "expert_names": POLES}
    fuse = PersonaFuse(pm.eval(), tok, router.to(device=device, dtype=dtype).eval(), meta).eval()
    return base, fuse, tok


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(base, fuse, tok, device: str, batch: int, new_tokens: int, repeats: int) -> dict:
    """Seconds per run for base and PersonaFuse (routing included), paired per repeat, after one warm-up."""
    from lightning_modules.components.personafuse import generate_with_gates

    convs = [[{"role": "user", "content": " ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(6))}]
             for i in range(batch)]
    systems = {"base": lambda: generate_with_gates(base, tok, convs, None, new_tokens),
               "personafuse": lambda: generate_with_gates(fuse.persona_model, tok, convs, fuse.route(convs), new_tokens)}
    seconds = {name: Series() for name in systems}
    for name, run in systems.items():
        timed(run, device)  # warm-up: kernels, allocator, merge caches
    for _ in range(repeats):
        for name, run in systems.items():
            seconds[name].add(timed(run, device))
    ratio = paired_ratio(seconds["base"], seconds["personafuse"])  # base s ÷ routed s = routed tok/s ÷ base tok/s
    tokens = batch * new_tokens
    return {"batch": batch, "new_tokens": new_tokens, "base_tok_s": tokens / seconds["base"].median,
            "personafuse_tok_s": tokens / seconds["personafuse"].median, "ratio": ratio.median,
            "ratio_range": [min(ratio.values), max(ratio.values)], "target": TARGETS[batch]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens-b1", type=int, default=128)
    p.add_argument("--tokens-b8", type=int, default=64)
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.shape == "llama8b" and not args.device.startswith("cuda"):
        p.error("--shape llama8b needs a GPU (16 GB of bf16 weights, twice); use --shape tiny on CPU")
    started = time.perf_counter()
    base, fuse, tok = build(args.shape, args.device, getattr(torch, args.dtype), args.rank)
    built_s = time.perf_counter() - started
    rows = [measure(base, fuse, tok, args.device, batch, n, args.repeats)
            for batch, n in ((1, args.tokens_b1), (8, args.tokens_b8))]
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"shape": args.shape, "device": device_name, "dtype": args.dtype, "rank": args.rank,
              "build_s": built_s, "rows": rows}
    for r in rows:
        verdict = "meets" if r["ratio"] >= r["target"] else "misses"
        print(f"batch {r['batch']}: base {r['base_tok_s']:.1f} tok/s, personafuse {r['personafuse_tok_s']:.1f} tok/s, "
              f"routed ÷ base {r['ratio']:.3f} [{r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f}] "
              f"({verdict} the {r['target']} target)", flush=True)
    if args.json:
        from datamodules.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
