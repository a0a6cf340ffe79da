"""PersonaFuse throughput, side by side in one process, on the embedded SmolLM2-135M-Instruct.

Run from the repository root:

    .venv/bin/python benchmarks/throughput.py            # full run (under 10 minutes on 2 shared CPU cores)
    .venv/bin/python benchmarks/throughput.py --quick    # CI smoke: short lengths, 1 repeat (~2 minutes)
    .venv/bin/python benchmarks/throughput.py --help     # every size, --threads, --only, --out, --no-mlflow

What it measures (every variant on the same prompts; within each repeat the variants run
interleaved, in an order rotated per repeat, so load drift on a shared machine hits all of them;
ratios are paired per repeat, then summarised as median [min–max]):

1. generation tokens/s at batch 1 and 8 (greedy, KV cache, fixed lengths via
   min_new_tokens = max_new_tokens) of: the base model; PersonaFuse (10 experts with random
   non-zero B, router gates computed once per conversation, i.e. routing is inside the timing;
   batch 1 takes the merged path, batch 8 — different gates per row — the fused path); PersonaFuse
   with merging switched off (batch 1); the base with one expert merged by PEFT's merge_and_unload;
   PEFT's X-LoRA built from the same 10 exported adapters (it forces use_cache=False, so it runs
   a shorter generation); at batch 8 also PersonaFuse with every call forced onto the sparse path
   (each row gathers its top-3 experts) or the dense fused path (personafuse_sparse / _dense);
2. adapter SFT tokens/s: `AdapterSFTModule` (mixed one-hot poles) through a Lightning Trainer vs a
   plain PyTorch loop training one PEFT LoRA of the same rank; and the one-hot gathered path vs the
   fused path in the same plain loop;
3. datagen tokens/s: `LocalTeacher` at batch 8 vs one conversation at a time;
4. peak memory (VmHWM, reset before generating, one subprocess per variant) of routed inference
   vs the base model, against base + 1.2 × the experts' weight bytes;
5. the FLOP floor base/(base + experts) for this model and for a Llama-3.1-8B shape.
6. evaluation of the quickstart's systems (base, prompting, sft, personafuse) on its benchmarks,
   batched into shared model calls (SystemBatch) vs one system after another, with the records compared.

It prints one table per section, the targets with PASS/FAIL, writes a Markdown report
(`benchmarks/results.md`; `--quick` writes `outputs/benchmarks/results-quick.md`) atomically, and
logs params, metrics and the report to MLflow (experiment `benchmarks`, the project's store).

Threads: the default is PyTorch's own (one intra-op thread per physical core, or OMP_NUM_THREADS),
the same for every variant, as a user would run. Run it on an otherwise idle machine: with another
busy process on the same cores, OpenMP threads collapse under oversubscription (measured on this
2-core machine: batch-1 decoding 21 tok/s with one thread, 2.3 with two). On a shared machine pass
--threads 1. Absolute numbers move with the load on the machine: read the ratios.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from datamodules.personas import BIG_FIVE  # noqa: E402

POLES = [f"{trait}_{pole}" for trait in BIG_FIVE
         for pole in ("high", "low")]
PROMPTS = [
    "My dog died this morning and I can't stop crying.",
    "Can you review this function? It returns None when the list is empty.",
    "We just got engaged!!! I had to tell someone.",
    "A customer left a one-star review saying our delivery was three days late. How should I reply?",
    "I have a job interview tomorrow and I'm so nervous I feel sick.",
    "What's a fun thing to do in Lisbon on a rainy Sunday?",
    "My manager keeps taking credit for my work in meetings.",
    "I'm negotiating the price of a used car. The seller wants 9000, I'd pay 7500.",
]
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256)
TARGETS_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Series:
    """Per-repeat values of one measurement."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(float(v))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self, fmt: str = "{:.1f}") -> str:
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return fmt.format(self.values[0])
        return f"{fmt.format(self.median)} [{fmt.format(min(self.values))}–{fmt.format(max(self.values))}]"


def paired_ratio(a: Series, b: Series) -> Series:
    """Per-repeat a/b (same repeat, same load), so drift between repeats cancels."""
    return Series([x / y for x, y in zip(a.values, b.values) if y > 0])


def rotated(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def clock(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def fixed_length(hf_model, n: int) -> Iterator[None]:
    """min_new_tokens = max_new_tokens through the model's generation config, so the project's own
    generate functions (which pass only max_new_tokens) produce exactly n tokens per row."""
    config = hf_model.generation_config
    before = config.min_new_tokens
    config.min_new_tokens = n
    try:
        yield
    finally:
        config.min_new_tokens = before


def conversations(n: int, offset: int = 0) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPTS[(offset + i) % len(PROMPTS)]}] for i in range(n)]


def proc_status(key: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def release_free_heap() -> None:
    """gc, then hand freed heap back to the OS (glibc), so RSS counts live memory only."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- FLOPs (section 5)


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each target linear of one Llama decoder layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def flop_floor(cfg: dict, experts: int, r: int, top_k: int = 3) -> dict[str, float]:
    """Multiply-adds per token: base in·out and experts E·r·(in+out) per target linear (×2 for FLOPs);
    the sparse floor counts only the top_k experts a routed row uses."""
    shapes = linear_shapes(cfg)
    layers = cfg["num_hidden_layers"]
    base = layers * sum(i * o for i, o in shapes.values())
    expert = layers * sum(experts * r * (i + o) for i, o in shapes.values())
    head = cfg["hidden_size"] * cfg["vocab_size"]
    return {
        "base_gflop_per_token": 2 * base / 1e9,
        "experts_gflop_per_token": 2 * expert / 1e9,
        "lm_head_gflop_per_token": 2 * head / 1e9,
        "floor": base / (base + expert),
        "sparse_floor": base / (base + expert * top_k / experts),
        "floor_with_lm_head": (base + head) / (base + head + expert),
        "expert_params": expert,
        "merge_gflop": 2 * layers * sum(i * o * experts * r for i, o in shapes.values()) / 1e9,
    }


# --------------------------------------------------------------------------- building the systems


def build_systems(args, base, tok, workdir: Path):
    """PersonaFuse (10 random experts + random router), merged single LoRA, X-LoRA; all from one base."""
    from peft import PeftModel

    from lightning_modules.components.persona_lora import PersonaLoRAModel
    from lightning_modules.components.personafuse import PersonaFuse
    from lightning_modules.components.router import GateSettings, Router

    torch.manual_seed(0)
    pm = PersonaLoRAModel(copy.deepcopy(base), POLES, r=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    gen = torch.Generator().manual_seed(0)
    for layer in pm.persona_layers():  # trained-size deltas: ‖ΔW‖ ≈ 2% of ‖W‖
        layer.lora_B.data.normal_(0.0, 0.02, generator=gen)
    pm.eval()
    # The quickstart's router gates (top-3 of 10 by default). Until 2026-12-02 this was a hard-coded
    # sigmoid: all ten gates non-zero, so the earlier "top-3" rows ran ten experts.
    router = Router(base.config.hidden_size, len(POLES), hidden=256, dropout=0.0, gate=GateSettings(*args.router_gates)).eval()
    meta = {"encoder": "base_hidden", "layer": args.router_layer, "expert_names": POLES}
    fuse = PersonaFuse(pm, tok, router, meta).eval()

    adapters = {pole: pm.export_peft(pole, workdir / "adapters" / pole) for pole in POLES}
    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[POLES[0]])).merge_and_unload().eval()
    xlora, xlora_hf, xlora_note = build_xlora(base, adapters)
    return pm, fuse, lora, (xlora, xlora_hf), xlora_note


def build_xlora(base, adapters: dict[str, Path]):
    """PEFT X-LoRA over the same 10 adapters: (model, its HF model, note) or (None, None, why it could not be built)."""
    try:
        from peft import XLoraConfig, get_peft_model
    except ImportError as err:
        return None, None, f"peft has no X-LoRA: {err}"
    notes = []
    attempts = [("pole names", {p: str(d) for p, d in adapters.items()}),
                ("adapters named '0'..'9'", {str(i): str(d) for i, d in enumerate(adapters.values())})]
    for label, mapping in attempts:
        model = copy.deepcopy(base)
        model.config.use_cache = False  # XLoraModel refuses a model config with use_cache=True
        try:
            config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=mapping,
                                 xlora_depth=1, enable_softmax=True)
            xlora = get_peft_model(model, config).eval()
            with torch.no_grad():  # the failure mode we know of only shows on the first forward
                xlora.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False, pad_token_id=2)
            note = "built" if not notes else "built with adapters named '0'..'9' (" + "; ".join(notes) + ")"
            return xlora, model, note
        except Exception as err:  # noqa: BLE001 - report exactly why and continue
            notes.append(f"with {label}: {type(err).__name__}: {err}")
            del model
            gc.collect()
    return None, None, "X-LoRA could not be built: " + "; ".join(notes)


# --------------------------------------------------------------------------- section 1: generation


def bench_generation(args, base, tok, pm, fuse, lora, xlora_pair) -> dict:
    from lightning_modules.components import persona_lora
    from lightning_modules.components.personafuse import generate_with_gates

    def plain(model):
        return lambda convs, n: generate_with_gates(model, tok, convs, None, n)

    route_s: dict[tuple[int, str], Series] = {}

    def routed(convs, n, name="personafuse"):
        # PersonaFuse.generate, with the routing timed on its own: route once, then generate under the gates
        start = time.perf_counter()
        gates = fuse.route(convs)
        if n > 2:  # not the warm-up
            route_s.setdefault((len(convs), name), Series()).add(time.perf_counter() - start)
        generate_with_gates(fuse.persona_model, fuse.tokenizer, convs, gates, n)

    def routed_copy_restore(convs, n):
        pm.merge_restore = "copy"
        try:
            routed(convs, n, "personafuse_copy_restore")
        finally:
            pm.merge_restore = "recompute"

    def routed_unmerged(convs, n):
        saved = persona_lora.MERGE_PAYS_FROM_TOKENS
        persona_lora.MERGE_PAYS_FROM_TOKENS = 10**9
        try:
            routed(convs, n, "personafuse_unmerged")
        finally:
            persona_lora.MERGE_PAYS_FROM_TOKENS = saved

    def routed_only(path: str) -> Callable:
        """Batch 8 with every call on one path: sparse (each row's top-k experts gathered, decoding
        too) or dense (all E experts fused). `personafuse` itself picks per call (SPARSE_GATHER_COST)."""
        def run(convs, n):
            saved = persona_lora.SPARSE_GATHER_COST
            persona_lora.SPARSE_GATHER_COST = -10**6 if path == "sparse" else 10**9
            try:
                routed(convs, n, f"personafuse_{path}")
            finally:
                persona_lora.SPARSE_GATHER_COST = saved
        return run

    xlora, xlora_hf = xlora_pair
    hf_of = {"base": base, "personafuse": pm.base_model, "personafuse_copy_restore": pm.base_model,
             "personafuse_unmerged": pm.base_model, "personafuse_sparse": pm.base_model,
             "personafuse_dense": pm.base_model, "lora_merged": lora, "xlora": xlora_hf}
    systems: dict[str, Callable] = {"base": plain(base), "personafuse": routed,
                                    "personafuse_copy_restore": routed_copy_restore,
                                    "personafuse_unmerged": routed_unmerged, "personafuse_sparse": routed_only("sparse"),
                                    "personafuse_dense": routed_only("dense"), "lora_merged": plain(lora)}
    if xlora is not None:
        systems["xlora"] = plain(xlora)

    plans = []  # (batch, system, new tokens)
    for batch, n in ((1, args.gen_tokens_b1), (8, args.gen_tokens_b8)):
        for name in systems:
            if name in ("personafuse_unmerged", "personafuse_copy_restore") and batch != 1:
                continue
            if name in ("personafuse_sparse", "personafuse_dense") and batch != 8:
                continue
            tokens = {"xlora": args.xlora_tokens_b1 if batch == 1 else args.xlora_tokens_b8,
                      "personafuse_unmerged": args.unmerged_tokens}.get(name, n)
            plans.append((batch, name, tokens))

    log(f"[gen] warm-up of {len(plans)} variants")
    for batch, name, _ in plans:
        with fixed_length(hf_of[name], 2):
            systems[name](conversations(batch), 2)

    results = {(b, name): Series() for b, name, _ in plans}
    for rep in range(args.repeats):
        for batch, name, n in rotated(plans, rep):
            convs = conversations(batch, offset=rep)
            with fixed_length(hf_of[name], n):
                seconds = clock(lambda: systems[name](convs, n))
            results[(batch, name)].add(batch * n / seconds)
            log(f"[gen] repeat {rep + 1}/{args.repeats} batch {batch} {name:<21} {n:>4} new tokens: "
                f"{batch * n / seconds:7.2f} tok/s ({seconds:.1f} s)")
    tokens = {(b, name): n for b, name, n in plans}
    return {"tok_s": results, "tokens": tokens, "route_s": route_s}


def bench_merge_cost(args, pm, fuse) -> dict:
    """Seconds to fold the routed gates into the weights and to restore them (per conversation)."""
    gates = fuse.route(conversations(1))
    merge, unmerge = Series(), Series()
    for _ in range(args.repeats):
        with torch.no_grad():
            gc.collect()
            t0 = time.perf_counter()
            ctx = pm.merged(gates)
            ctx.__enter__()
            t1 = time.perf_counter()
            ctx.__exit__(None, None, None)
            t2 = time.perf_counter()
        merge.add(t1 - t0)
        unmerge.add(t2 - t1)
    records = []
    with torch.no_grad(), pm.merged(gates):
        for rec in pm._merge_records:
            if rec is not None:
                records.append(rec)
    kept = sum(r.kept for r in records)
    copies = sum(r.copied for r in records)
    total = sum(layer.base.weight.numel() for layer in pm.persona_layers())
    return {"merge_s": merge, "unmerge_s": unmerge, "kept_fraction": kept / total, "copied_fraction": copies / total}


# --------------------------------------------------------------------------- section 2: adapter SFT


def sft_batches(args, tok, steps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for s in range(steps):
        ids = torch.randint(100, len(tok) - 1, (args.sft_batch, args.sft_seq), generator=gen)
        labels = ids.clone()
        labels[:, : args.sft_seq // 4] = -100  # the prompt carries no loss
        poles = (torch.arange(args.sft_batch) + s) % len(POLES)  # mixed poles in every batch
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pole": poles})
    return batches


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exactly AdapterSFTModule's loss: token mean over response tokens."""
    import torch.nn.functional as F

    labels = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(labels.shape)
    return token_loss.sum() / (labels != -100).sum().clamp(min=1)


def bench_sft(args, base, tok, pm) -> dict:
    import lightning as L
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from lightning_modules.adapter_sft import AdapterSFTModule

    steps = args.sft_warmup + args.sft_steps
    batches = sft_batches(args, tok, steps)
    tokens_per_step = args.sft_batch * args.sft_seq

    class StepClock(L.Callback):
        def __init__(self):
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.end = time.perf_counter()

    def lightning_run() -> float:
        step_clock = StepClock()
        module = AdapterSFTModule(lambda: pm, POLES, lr=2e-4)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[step_clock], inference_mode=False)
        loader = DataLoader(batches, batch_size=None, shuffle=False)
        trainer.fit(module, train_dataloaders=loader)
        marks = step_clock.starts + [step_clock.end]
        # from the start of the first timed step to the end of the last: data, forward, backward, AdamW, hooks
        return (marks[-1] - marks[args.sft_warmup]) / args.sft_steps

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.05, target_modules=list(TARGETS_LINEARS),
        task_type="CAUSAL_LM"))

    optimizer_s: dict[str, Series] = {}

    def plain_loop(step_fn, params, name: str) -> float:
        opt = torch.optim.AdamW(params, lr=2e-4)  # as AdapterSFTModule.configure_optimizers
        marks, in_step = [], 0.0
        for i, batch in enumerate(batches):
            marks.append(time.perf_counter())
            loss = step_fn(batch)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            if i >= args.sft_warmup:
                in_step += time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        optimizer_s.setdefault(name, Series()).add(in_step / args.sft_steps)
        return (marks[-1] - marks[args.sft_warmup]) / args.sft_steps

    def peft_run() -> float:
        peft_model.train()
        return plain_loop(lambda b: lm_loss(peft_model(input_ids=b["input_ids"],
                                                       attention_mask=b["attention_mask"]).logits, b["labels"]),
                          [p for p in peft_model.parameters() if p.requires_grad], "peft_plain_loop")

    def persona_step(force_fused: bool):
        import torch.nn.functional as F

        def step(b):
            gates = F.one_hot(b["pole"], len(POLES)).float()
            with pm.holding(gates):  # by hand, to reach into the gate state
                if force_fused:  # same maths through the all-experts product (E·r columns per token)
                    pm.state.sparse_index = pm.state.sparse_weight = None
                logits = pm.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return lm_loss(logits, b["labels"])
        return step

    def persona_run(force_fused: bool) -> Callable[[], float]:
        def run() -> float:
            pm.train()
            return plain_loop(persona_step(force_fused), [p for p in pm.parameters() if p.requires_grad],
                              "persona_loop_fused" if force_fused else "persona_loop_gathered")
        return run

    variants = {"lightning_adapter_sft": lightning_run, "peft_plain_loop": peft_run}
    if not args.skip_gather_vs_fused:
        variants["persona_loop_gathered"] = persona_run(False)
        variants["persona_loop_fused"] = persona_run(True)
    results = {name: Series() for name in variants}
    for rep in range(args.repeats):
        for name in rotated(list(variants), rep):
            gc.collect()
            seconds = variants[name]()
            results[name].add(tokens_per_step / seconds)
            log(f"[sft] repeat {rep + 1}/{args.repeats} {name:<22} {tokens_per_step / seconds:7.1f} tok/s "
                f"({seconds:.2f} s/step, batch {args.sft_batch}×{args.sft_seq})")
    pm.eval()
    for layer in pm.persona_layers():  # training moved B; keep the generation benchmark's experts non-zero anyway
        layer.lora_A.grad = layer.lora_B.grad = None
    del peft_model
    gc.collect()
    return {"tok_s": results, "optimizer_s": optimizer_s}


# --------------------------------------------------------------------------- section 6: evaluation, batched systems


def bench_eval_batching(args, pm, fuse, tok) -> dict:
    """The quickstart's systems and benchmarks (experiments/quickstart.yaml), evaluated one system
    after another and then together (SystemBatch: rows of every system in each model call).

    The SFT baseline is a stacked LoRA under a one-hot gate in the suite; here one of the random
    experts stands in for it (the same cost). Records are compared item by item."""
    from experiments.config import load_config
    from lightning_modules.components.personafuse import ChatModel
    from lightning_modules.components.system_batch import SystemBatch
    from lightning_modules.evaluate import build_benchmarks

    ecfg = load_config(ROOT / "experiments" / "quickstart.yaml", []).evaluate
    if args.quick:
        for bcfg in ecfg.benchmarks.values():
            bcfg.limit = min(bcfg.limit or 2, 2)
            if "max_new_tokens" in bcfg.options:
                bcfg.options["max_new_tokens"] = 4
    benchmarks = build_benchmarks(ecfg)
    bs = ecfg.batch_size
    one_hot = lambda convs: torch.nn.functional.one_hot(torch.zeros(len(convs), dtype=torch.long), len(POLES)).float()  # noqa: E731
    systems = {"base": ChatModel(pm, tok, None, None, bs), "prompting": ChatModel(pm, tok, None, ecfg.persona_prompt, bs),
               "sft": ChatModel(pm, tok, one_hot, None, bs), "personafuse": ChatModel(pm, tok, fuse.route, None, bs)}

    def sequential() -> dict:
        return {(s, b): bench.evaluate(chat, bs)[1] for s, chat in systems.items() for b, bench in benchmarks.items()}

    def batched() -> dict:
        out = {}
        for b, bench in benchmarks.items():
            out.update({(s, b): result[1] for s, result in SystemBatch(systems, bs).evaluate(bench).items()})
        return out

    times = {"sequential": Series(), "batched": Series()}
    records: dict[str, dict] = {}
    with torch.inference_mode():
        for rep in range(args.eval_repeats):
            for name in rotated(["sequential", "batched"], rep):
                fn = sequential if name == "sequential" else batched
                start = time.perf_counter()
                records[name] = fn()
                times[name].add(time.perf_counter() - start)
                log(f"[eval] repeat {rep + 1}/{args.eval_repeats} {name}: {times[name].values[-1]:.1f} s")
    differing = sum(_records_differ(a, b) for key in records["sequential"]
                    for a, b in zip(records["sequential"][key], records["batched"][key]))
    items = sum(len(v) for v in records["sequential"].values())
    limits = {b: (c.limit, c.options.get("max_new_tokens")) for b, c in ecfg.benchmarks.items()}
    return {"s": times, "differing": differing, "items": items, "systems": list(systems), "limits": limits, "batch": bs}


def _records_differ(a: dict, b: dict) -> bool:
    """True when two records differ beyond float tolerance (1e-4 absolute on scores)."""
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, float) and isinstance(other, float):
            if abs(value - other) > 1e-4:
                return True
        elif isinstance(value, list) and value and isinstance(value[0], float):
            if len(value) != len(other) or any(abs(x - y) > 1e-4 for x, y in zip(value, other)):
                return True
        elif value != other:
            return True
    return False


# --------------------------------------------------------------------------- section 3: datagen


def bench_datagen(args, base, tok) -> dict:
    from lightning_modules.components.teachers import LocalTeacher

    teacher_tok = copy.deepcopy(tok)  # LocalTeacher sets left padding on its tokenizer
    batched = LocalTeacher(base, teacher_tok, "smollm2", batch_size=8)
    single = LocalTeacher(base, teacher_tok, "smollm2", batch_size=1)
    variants = {"teacher_batch8": batched, "teacher_one_at_a_time": single}
    results = {name: Series() for name in variants}
    n = args.datagen_tokens
    with fixed_length(base, 2):
        batched.generate(conversations(8), 2)
    for rep in range(args.repeats):
        for name in rotated(list(variants), rep):
            convs = conversations(8, offset=rep)
            out = []
            with fixed_length(base, n):
                seconds = clock(lambda: out.extend(variants[name].generate(convs, n)))
            tokens = sum(g.tokens for g in out)
            results[name].add(tokens / seconds)
            log(f"[datagen] repeat {rep + 1}/{args.repeats} {name:<22} {tokens / seconds:7.2f} tok/s "
                f"({tokens} tokens, {seconds:.1f} s)")
    return results


# --------------------------------------------------------------------------- section 4: memory


def memory_probe(args) -> dict:
    """Run in a fresh subprocess: build one variant, then the peak RSS while it generates."""
    from lightning_modules.components.base_model import load_base_model
    from lightning_modules.components.personafuse import generate_with_gates

    torch.set_num_threads(args.threads)
    variant, batch = args.memory_probe.split(":")
    batch = int(batch)
    base, tok = load_base_model(args.model)
    # from_pretrained maps the safetensors file: its pages count as (shared, reclaimable) file RSS until
    # written, and merging writes the target weights. Copy the weights into process memory in every
    # probe, so the peaks compare live memory and not page-cache residency.
    with torch.no_grad():
        for param in base.parameters():
            param.data = param.data.clone()
    release_free_heap()
    expert_bytes = 0
    if variant == "base":
        run = lambda n: generate_with_gates(base, tok, conversations(batch), None, n)  # noqa: E731
        hf = base
    else:
        from lightning_modules.components.persona_lora import PersonaLoRAModel
        from lightning_modules.components.personafuse import PersonaFuse
        from lightning_modules.components.router import GateSettings, Router

        torch.manual_seed(0)
        pm = PersonaLoRAModel(base, POLES, r=args.rank, alpha=2.0 * args.rank, dropout=0.05)
        if variant == "personafuse_copy":
            pm.merge_restore = "copy"
        for layer in pm.persona_layers():
            layer.lora_B.data.normal_(0.0, 0.02)
            expert_bytes += (layer.lora_A.numel() + layer.lora_B.numel()) * layer.lora_A.element_size()
        pm.eval()
        meta = {"encoder": "base_hidden", "layer": args.router_layer}
        fuse = PersonaFuse(pm, tok, Router(base.config.hidden_size, len(POLES), 256, 0.0, GateSettings(*args.router_gates)).eval(), meta)
        run = lambda n: fuse.generate(conversations(batch), n)  # noqa: E731
        hf = base
    with fixed_length(hf, 2):
        run(2)  # allocator and caches warm, as in a serving process
    release_free_heap()
    resident = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    gates = None
    if variant != "base":
        gates = fuse.route(conversations(batch))
    route_peak = proc_status("VmHWM")
    release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")
    model = base if variant == "base" else pm
    with fixed_length(hf, args.memory_tokens):
        generate_with_gates(model, tok, conversations(batch), gates, args.memory_tokens)
    gen_peak = proc_status("VmHWM")
    return {"variant": variant, "batch": batch, "resident_bytes": resident, "route_peak_bytes": route_peak,
            "gen_peak_bytes": gen_peak, "peak_bytes": max(route_peak, gen_peak), "expert_bytes": expert_bytes}


def bench_memory(args) -> dict:
    out = {}
    for probe in ("base:1", "personafuse:1", "personafuse_copy:1", "base:8", "personafuse:8"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", probe, "--threads", str(args.threads),
               "--memory-tokens", str(args.memory_tokens), "--rank", str(args.rank), "--model", args.model,
               "--router-layer", str(args.router_layer)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {probe} failed:\n{proc.stderr[-3000:]}")
        out[probe] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"[memory] {probe:<18} resident {out[probe]['resident_bytes'] / 2**20:7.1f} MiB, peak while routing "
            f"{out[probe]['route_peak_bytes'] / 2**20:7.1f} MiB, while generating {out[probe]['gen_peak_bytes'] / 2**20:7.1f} MiB")
    return out


# --------------------------------------------------------------------------- report


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    sections = set(args.only or ["gen", "sft", "datagen", "memory", "flops", "eval"])

    from lightning_modules.components.base_model import load_base_model

    log(f"PersonaFuse throughput benchmark — {args.model}, {args.threads} thread(s), {args.repeats} repeat(s)"
        f"{' (quick)' if args.quick else ''}")
    base, tok = load_base_model(args.model)
    cfg = base.config.to_dict()
    flops = {"model": flop_floor(cfg, len(POLES), args.rank), "llama8b": flop_floor(LLAMA_8B, len(POLES), args.rank)}
    workdir = Path(tempfile.mkdtemp(prefix="pf-bench-"))

    gen = merge_cost = sft = datagen = memory = evaluation = None
    xlora_note = "not run"
    if sections & {"gen", "sft", "eval"}:
        pm, fuse, lora, xlora, xlora_note = build_systems(args, base, tok, workdir)
        log(f"[x-lora] {xlora_note}")
        if "gen" in sections:
            gen = bench_generation(args, base, tok, pm, fuse, lora, xlora)
            merge_cost = bench_merge_cost(args, pm, fuse)
        if "eval" in sections:
            evaluation = bench_eval_batching(args, pm, fuse, tok)
        del xlora, lora
        gc.collect()
        if "sft" in sections:
            sft = bench_sft(args, base, tok, pm)
        del pm, fuse
        gc.collect()
    if "datagen" in sections:
        datagen = bench_datagen(args, base, tok)
    if "memory" in sections:
        memory = bench_memory(args)

    text, metrics, targets = render(args, flops, gen, merge_cost, sft, datagen, memory, xlora_note, evaluation)
    elapsed = time.perf_counter() - started
    text += f"\n\nTotal wall time: {elapsed:.0f} s.\n"
    print("\n" + text)
    out = Path(args.out) if args.out else (ROOT / ("outputs/benchmarks/results-quick.md" if args.quick else
                                                   "benchmarks/results.md"))
    from datamodules.io import atomic_write_text

    atomic_write_text(out, text)
    log(f"report: {out}")
    metrics["total_wall_s"] = elapsed
    if not args.no_mlflow:
        log_mlflow(args, metrics, targets, out)
    return 0


def render(args, flops, gen, merge_cost, sft, datagen, memory, xlora_note, evaluation=None):
    """The Markdown report, flat metrics for MLflow, and the targets' verdicts."""
    parts: list[str] = []
    metrics: dict[str, float] = {}
    targets: dict[str, Optional[bool]] = {}
    fm, f8 = flops["model"], flops["llama8b"]
    floor = fm["floor"]

    parts.append(f"# PersonaFuse throughput — {args.model}\n\n{args.threads} intra-op thread(s), {args.repeats} "
                 f"repeat(s), variants interleaved per repeat, router reading layer {args.router_layer}. "
                 f"Cells: median [min–max] over repeats; ratios are "
                 f"paired per repeat. Command: `.venv/bin/python benchmarks/throughput.py"
                 f"{' --quick' if args.quick else ''}`.")

    if gen is not None:
        tok_s, tokens = gen["tok_s"], gen["tokens"]
        rows = []
        for (batch, name), series in tok_s.items():
            base_series = tok_s[(batch, "base")]
            ratio = paired_ratio(series, base_series)
            route = gen["route_s"].get((batch, name))
            excl = "—"
            if route is not None:  # the same calls with their routing seconds taken out
                n_tok = batch * tokens[(batch, name)]
                gen_only = Series([n_tok / (n_tok / v - r) for v, r in zip(series.values, route.values)])
                excl = (f"{gen_only.spread()} (÷ base {paired_ratio(gen_only, base_series).spread('{:.2f}')}; "
                        f"routing {route.median:.2f} s)")
                metrics[f"gen/b{batch}/{name}/route_s"] = route.median
                metrics[f"gen/b{batch}/{name}/vs_base_excl_routing"] = paired_ratio(gen_only, base_series).median
            rows.append([batch, name, tokens[(batch, name)], series.spread(), ratio.spread("{:.2f}"), excl])
            metrics[f"gen/b{batch}/{name}/tok_s"] = series.median
            metrics[f"gen/b{batch}/{name}/vs_base"] = ratio.median
        parts.append("## 1. Generation (greedy, KV cache, fixed lengths)\n\n" + md_table(
            ["batch", "system", "new tokens", "tok/s (routing included)", "÷ base (paired)",
             "tok/s excluding routing"], rows))
        parts.append(f"X-LoRA: {xlora_note}. X-LoRA's generate forces use_cache=False (every token re-runs the "
                     "whole sequence twice: a scaling pass and the real pass), so it is timed on a shorter "
                     "generation; its tokens/s only falls with length, so the comparison favours X-LoRA.")
        if merge_cost is not None:
            m, u = merge_cost["merge_s"], merge_cost["unmerge_s"]
            b1 = tok_s.get((1, "base"))
            unmerged = tok_s.get((1, "personafuse_unmerged"))
            line = (f"Merge path (batch 1): fold {fm['merge_gflop']:.1f} GFLOP of expert products into the weights "
                    f"in {m.spread('{:.2f}')} s, restore bit-exactly in {u.spread('{:.2f}')} s; "
                    f"{100 * merge_cost['kept_fraction']:.2f}% of base weights kept aside for exact restore, "
                    f"{100 * merge_cost['copied_fraction']:.2f}% copied.")
            metrics.update({"merge/merge_s": m.median, "merge/unmerge_s": u.median,
                            "merge/kept_fraction": merge_cost["kept_fraction"]})
            if b1 and unmerged and b1.median > 0 and unmerged.median > 0:
                saved = 1 / unmerged.median - 1 / b1.median
                if saved > 0:
                    even = (m.median + u.median) / saved
                    line += f" Break-even against the unmerged path: {even:.0f} new tokens."
                    metrics["merge/break_even_tokens"] = even
            parts.append(line)
        b8, pf8 = tok_s.get((8, "base")), tok_s.get((8, "personafuse"))
        b1, pf1 = tok_s.get((1, "base")), tok_s.get((1, "personafuse"))
        x8 = tok_s.get((8, "xlora"))
        if b8 and pf8:
            r8 = paired_ratio(pf8, b8).median
            targets["routed_b8_vs_floor"] = r8 >= 0.9 * floor
            targets["routed_b8_vs_base"] = r8 >= 0.85
            metrics["target/routed_b8_over_floor_base"] = r8 / floor
        if pf8 and x8:
            targets["routed_b8_vs_xlora"] = pf8.median >= 4 * x8.median
            metrics["target/routed_b8_over_xlora"] = pf8.median / x8.median
        else:
            targets["routed_b8_vs_xlora"] = None
        if b1 and pf1:
            targets["routed_b1_vs_base"] = paired_ratio(pf1, b1).median >= 0.95

    if sft is not None:
        rows = []
        optimizer_s, sft = sft["optimizer_s"], sft["tok_s"]
        ref = sft["peft_plain_loop"]
        for name, series in sft.items():
            ratio = paired_ratio(series, ref)
            opt = optimizer_s.get(name)
            rows.append([name, series.spread(), ratio.spread("{:.2f}"), opt.spread("{:.3f}") if opt else "—"])
            if opt:
                metrics[f"sft/{name}/optimizer_s"] = opt.median
            metrics[f"sft/{name}/tok_s"] = series.median
            metrics[f"sft/{name}/vs_peft"] = ratio.median
        parts.append(f"## 2. Adapter SFT (batch {args.sft_batch} × {args.sft_seq} tokens, r={args.rank}, AdamW, "
                     f"{args.sft_steps} timed step(s) after {args.sft_warmup} warm-up)\n\n"
                     + md_table(["variant", "tok/s", "÷ PEFT loop (paired)", "AdamW s/step"], rows)
                     + "\n\nThe Lightning run trains all 10 experts (one batch mixes poles), so AdamW updates 10× the "
                     "parameters of the single PEFT LoRA every step; that cost is per step, not per token.")
        targets["sft_vs_peft"] = paired_ratio(sft["lightning_adapter_sft"], ref).median >= 0.95
        if "persona_loop_fused" in sft:
            g = paired_ratio(sft["persona_loop_gathered"], sft["persona_loop_fused"])
            parts.append(f"One-hot gathered path ÷ fused path (same loop): {g.spread('{:.2f}')}.")
            metrics["sft/gathered_over_fused"] = g.median

    if datagen is not None:
        one = datagen["teacher_one_at_a_time"]
        rows = [[name, s.spread(), paired_ratio(s, one).spread("{:.2f}")] for name, s in datagen.items()]
        for name, s in datagen.items():
            metrics[f"datagen/{name}/tok_s"] = s.median
        parts.append(f"## 3. Datagen (LocalTeacher, 8 conversations × {args.datagen_tokens} new tokens)\n\n"
                     + md_table(["variant", "tok/s", "÷ one at a time (paired)"], rows))

    if memory is not None:
        rows = []
        ok_all = True
        for batch in (1, 8):
            b, p = memory[f"base:{batch}"], memory[f"personafuse:{batch}"]
            budget = b["peak_bytes"] + 1.2 * p["expert_bytes"]
            ok = p["peak_bytes"] <= budget
            ok_all &= ok
            gen_ok = p["gen_peak_bytes"] <= b["peak_bytes"] + 1.2 * p["expert_bytes"]
            rows.append([batch, f"{b['peak_bytes'] / 2**20:.0f}", f"{p['route_peak_bytes'] / 2**20:.0f}",
                         f"{p['gen_peak_bytes'] / 2**20:.0f}", f"{(p['peak_bytes'] - b['peak_bytes']) / 2**20:+.0f}",
                         f"{p['expert_bytes'] / 2**20:.0f}", f"{budget / 2**20:.0f}",
                         f"{verdict(ok)} (generation alone: {verdict(gen_ok)})"])
            metrics[f"memory/b{batch}/base_peak_mib"] = b["peak_bytes"] / 2**20
            metrics[f"memory/b{batch}/routed_peak_mib"] = p["peak_bytes"] / 2**20
        parts.append(f"## 4. Peak memory while generating {args.memory_tokens} tokens (VmHWM, one subprocess each)\n\n"
                     + md_table(["batch", "base peak MiB", "routed: routing peak MiB", "routed: generation peak MiB",
                                 "Δ (max) MiB", "experts MiB", "budget = base + 1.2 × experts", "verdict"], rows)
                     + f"\n\nRouting runs the base model over the prompts up to the router's layer ({args.router_layer}) "
                     "and stops there (lightning_modules/components/router.py: hidden_state_at; no LM head, no "
                     "other layers' hidden states kept).")
        targets["routed_memory"] = ok_all
        if "personafuse_copy:1" in memory:
            c, b = memory["personafuse_copy:1"], memory["base:1"]
            parts.append(f"With merge_restore='copy' (batch 1): generation peak {c['gen_peak_bytes'] / 2**20:.0f} MiB "
                         f"(Δ {(c['peak_bytes'] - b['peak_bytes']) / 2**20:+.0f} MiB vs base; budget "
                         f"{(b['peak_bytes'] + 1.2 * c['expert_bytes']) / 2**20:.0f} MiB): "
                         f"{verdict(c['peak_bytes'] <= b['peak_bytes'] + 1.2 * c['expert_bytes'])}.")
            metrics["memory/b1/routed_copy_restore_peak_mib"] = c["peak_bytes"] / 2**20

    rows = []
    for label, f in ((args.model, fm), ("Llama-3.1-8B shape", f8)):
        rows.append([label, f"{f['base_gflop_per_token']:.3f}", f"{f['experts_gflop_per_token']:.3f}",
                     f"{f['floor']:.3f}", f"{f['sparse_floor']:.3f}", f"{f['floor_with_lm_head']:.3f}",
                     f"{f['merge_gflop']:.0f}"])
    metrics.update({"flops/floor": fm["floor"], "flops/floor_with_lm_head": fm["floor_with_lm_head"],
                    "flops/floor_llama8b": f8["floor"], "flops/sparse_floor": fm["sparse_floor"],
                    "flops/sparse_floor_llama8b": f8["sparse_floor"]})
    parts.append(f"## 5. FLOP floor (E={len(POLES)} experts, r={args.rank}, all 7 projections)\n\n" + md_table(
        ["model", "base GFLOP/token (target linears)", "experts GFLOP/token", "floor = base/(base+experts)",
         "sparse floor (top-3 of 10)",
         "floor incl. lm_head", "merge GFLOP (once per conversation)"], rows))

    if evaluation is not None:
        parts.append(render_eval_batching(evaluation, metrics, targets))

    b8, pf8 = (gen["tok_s"].get((8, "base")), gen["tok_s"].get((8, "personafuse"))) if gen else (None, None)
    lines = []
    descriptions = {
        "routed_b8_vs_floor": f"routed gen, batch 8 ≥ 0.9 × floor ({floor:.3f}) × base tok/s",
        "routed_b8_vs_xlora": "routed gen, batch 8 ≥ 4 × X-LoRA tok/s",
        "routed_b8_vs_base": f"routed gen, batch 8, top-3 gates ≥ 0.85 × base tok/s (sparse floor {fm['sparse_floor']:.3f})",
        "routed_b1_vs_base": f"routed gen, batch 1, {args.gen_tokens_b1} tokens ≥ 0.95 × base tok/s",
        "sft_vs_peft": "adapter SFT (Lightning, 10 experts) ≥ 0.95 × plain PEFT loop",
        "routed_memory": "routed peak memory ≤ base peak + 1.2 × experts' weight bytes",
        "eval_batched": "evaluating the quickstart's systems batched ≤ 0.5 × one after another, same records",
    }
    measured = {
        "routed_b8_vs_floor": (lambda: f"{paired_ratio(pf8, b8).median:.3f} × base (need ≥ {0.9 * floor:.3f}); "
                                       f"excluding routing {metrics.get('gen/b8/personafuse/vs_base_excl_routing', float('nan')):.3f}")
        if b8 and pf8 else None,
        "routed_b8_vs_xlora": (lambda: f"{metrics['target/routed_b8_over_xlora']:.1f} ×")
        if "target/routed_b8_over_xlora" in metrics else None,
        "routed_b8_vs_base": (lambda: f"{paired_ratio(pf8, b8).median:.3f} × base") if b8 and pf8 else None,
        "routed_b1_vs_base": (lambda: f"{metrics['gen/b1/personafuse/vs_base']:.3f} × base (need ≥ 0.950); "
                                      f"excluding routing {metrics.get('gen/b1/personafuse/vs_base_excl_routing', float('nan')):.3f}")
        if "gen/b1/personafuse/vs_base" in metrics else None,
        "sft_vs_peft": (lambda: f"{metrics['sft/lightning_adapter_sft/vs_peft']:.3f} × PEFT")
        if "sft/lightning_adapter_sft/vs_peft" in metrics else None,
        "routed_memory": (lambda: "see section 4") if memory else None,
        "eval_batched": (lambda: f"batched ÷ sequential: {metrics['eval/batched_over_sequential']:.2f}; "
                                 f"{evaluation['differing']} of {evaluation['items']} records differ")
        if evaluation else None,
    }
    for key, desc in descriptions.items():
        if key not in targets:
            continue
        got = measured[key]() if measured.get(key) else "not measured"
        lines.append([desc, got, verdict(targets[key])])
        if targets[key] is not None:
            metrics[f"target/{key}"] = float(targets[key])
    caveat = ("--quick runs far shorter generations and one repeat, where the once-per-conversation costs "
              "(routing, merging) are not amortised: these verdicts check the plumbing, not the targets. "
              "Run without --quick for them.\n\n") if args.quick else ""
    parts.append("## Targets\n\n" + caveat + md_table(["target", "measured", "verdict"], lines))
    return "\n\n".join(parts), metrics, targets


def render_eval_batching(evaluation: dict, metrics: dict, targets: dict) -> str:
    seq, bat = evaluation["s"]["sequential"], evaluation["s"]["batched"]
    ratio = paired_ratio(bat, seq)
    metrics.update({"eval/sequential_s": seq.median, "eval/batched_s": bat.median,
                    "eval/batched_over_sequential": ratio.median, "eval/records_differing": evaluation["differing"]})
    targets["eval_batched"] = ratio.median <= 0.5 and evaluation["differing"] == 0
    limits = ", ".join(f"{b} {n}" + (f" ({t} tokens)" if t else "") for b, (n, t) in evaluation["limits"].items())
    return (f"## 6. Evaluation: {len(evaluation['systems'])} gate-systems batched vs one after another\n\n"
            f"Systems {', '.join(evaluation['systems'])} on the quickstart's benchmarks ({limits}), "
            f"batch size {evaluation['batch']}; one model, loaded once, for both.\n\n"
            + md_table(["variant", "wall s"], [["one system after another", seq.spread("{:.1f}")],
                                             ["batched (SystemBatch)", bat.spread("{:.1f}")]])
            + f"\n\nbatched ÷ sequential: {ratio.spread('{:.2f}')}. Records differing beyond 1e-4: "
            f"{evaluation['differing']} of {evaluation['items']}.")


def log_mlflow(args, metrics: dict, targets: dict, report: Path) -> None:
    import mlflow

    from experiments.tracking import get_or_create_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(None)
    client = mlflow.MlflowClient(uri)
    experiment = get_or_create_experiment("benchmarks", uri)
    run = client.create_run(experiment, run_name="throughput-quick" if args.quick else "throughput",
                            tags={"benchmark": "throughput", "model": args.model})
    run_id = run.info.run_id
    for key, value in vars(args).items():
        if key != "memory_probe":
            client.log_param(run_id, key, str(value))
    client.log_param(run_id, "torch", torch.__version__)
    for key, value in metrics.items():
        if value is not None and math.isfinite(value):
            client.log_metric(run_id, key.replace("×", "x"), float(value))
    client.log_artifact(run_id, str(report))
    client.set_terminated(run_id)
    log(f"MLflow: {uri} experiment 'benchmarks' run {run_id}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small lengths, 1 repeat (CI smoke)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name, hub id or local path")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default: PyTorch's, %(default)s here; 1 on a shared machine)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 3; --quick 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--gen-tokens-b1", type=int, default=None, help="new tokens at batch 1 (default 256)")
    p.add_argument("--gen-tokens-b8", type=int, default=None, help="new tokens per row at batch 8 (default 48)")
    p.add_argument("--unmerged-tokens", type=int, default=None,
                   help="new tokens for PersonaFuse with merging off, batch 1 (default 48)")
    p.add_argument("--xlora-tokens-b1", type=int, default=None, help="X-LoRA new tokens at batch 1 (default 6)")
    p.add_argument("--xlora-tokens-b8", type=int, default=None, help="X-LoRA new tokens at batch 8 (default 2)")
    p.add_argument("--sft-batch", type=int, default=4)
    p.add_argument("--sft-seq", type=int, default=None, help="SFT sequence length (default 128)")
    p.add_argument("--sft-steps", type=int, default=None, help="timed optimizer steps per variant (default 4)")
    p.add_argument("--sft-warmup", type=int, default=1, help="untimed steps first (optimizer state, allocator)")
    p.add_argument("--skip-gather-vs-fused", action="store_true", help="skip the one-hot gathered vs fused SFT loop")
    p.add_argument("--datagen-tokens", type=int, default=None, help="new tokens per conversation (default 16)")
    p.add_argument("--memory-tokens", type=int, default=None, help="new tokens in the memory probes (default 32)")
    p.add_argument("--eval-repeats", type=int, default=1, help="repeats of the evaluation section (default 1)")
    p.add_argument("--only", nargs="*", choices=["gen", "sft", "datagen", "memory", "flops", "eval"],
                   help="run only these sections")
    p.add_argument("--router-layer", type=int, default=None,
                   help="hidden-state layer the router reads (default: router.layer of experiments/quickstart.yaml)")
    p.add_argument("--out", default=None, help="Markdown report path")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"repeats": (3, 1), "gen_tokens_b1": (256, 16), "gen_tokens_b8": (48, 8), "xlora_tokens_b1": (6, 4),
                "xlora_tokens_b8": (2, 2), "unmerged_tokens": (48, 16), "sft_seq": (128, 32), "sft_steps": (4, 1), "datagen_tokens": (16, 4),
                "memory_tokens": (32, 8)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    from experiments.config import load_config

    router = load_config(ROOT / "experiments" / "quickstart.yaml", []).router
    if args.router_layer is None:
        args.router_layer = router.layer
    args.router_gates = (router.gate, router.temperature, router.top_k)  # the quickstart's gates: top-3 by default
    return args


if __name__ == "__main__":
    sys.exit(main())
