"""Checks of the curated Persona-CoT corpus that anyone can rerun (its card quotes this output).

1. coverage: situations with records per split and domain;
2. content: words per pole (mean, min, max), quality-filter flags per pole (the datagen filters:
   length, incoherent, ignores_user, unsafe), near-duplicate replies within a situation (token-set
   Jaccard >= 0.6), any 10-word run shared by two replies of different situations, and any 8-word
   run shared with a benchmark file under the benchmark data root or with the persona YAML's examples;
3. separability: the pole classifier (a linear probe on frozen all-MiniLM-L6-v2 embeddings, C chosen
   by 5-fold cross-validation on the training replies) trained on train-split replies and scored on
   val-split replies: ten-way accuracy, high-vs-low accuracy per trait, the most confused pole; and
   the same probe on embeddings taken relative to each situation's centroid (persona_expression's
   instrument).
The test split's replies are counted and content-checked but never used by the probe.

    .venv/bin/python benchmarks/persona_corpus.py [--skip-probe] [--skip-benchmarks]
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def load(args):
    """(personas, split name of each situation id, situation by id, curated replies by id)."""
    from datamodules.persona_replies import load_persona_replies
    from datamodules.personas import load_personas
    from datamodules.situations import load_situations, split_of, split_situations

    personas = load_personas(ROOT / args.personas)
    corpus = load_situations(ROOT / args.situations, personas)
    splits = split_situations(corpus, 0.1, 0.2, 0)
    replies = load_persona_replies(ROOT / args.replies, personas, known_ids={s.id for s in corpus})
    return personas, split_of(splits), {s.id: s for s in corpus}, replies


def coverage(split: dict[str, str], situations: dict, replies: dict) -> None:
    table: dict[str, Counter] = defaultdict(Counter)
    for sid, s in situations.items():
        table[s.domain][(split[sid], sid in replies)] += 1
    print("## Coverage (situations with records / in the split)")
    print("| domain | train | val | test |\n|---|---|---|---|")
    totals = Counter()
    for domain in sorted(table):
        cells = []
        for name in ("train", "val", "test"):
            have, n = table[domain][(name, True)], table[domain][(name, True)] + table[domain][(name, False)]
            totals[(name, True)] += have
            totals[name] += n
            cells.append(f"{have}/{n}")
        print(f"| {domain} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"{totals[(n, True)]}/{totals[n]}" for n in ("train", "val", "test")) + " |\n")


def content(personas, situations: dict, replies: dict) -> None:
    from lightning_modules.components.quality_filters import jaccard, response_flags

    print("## Content per pole (all splits)")
    print("| pole | replies | words mean | min | max | flagged by the datagen filters |\n|---|---|---|---|---|---|")
    for pole in [*personas.ids, "fused"]:
        texts = [(sid, r.fused if pole == "fused" else r.responses[pole]) for sid, r in replies.items()]
        counts = [len(t.split()) for _, t in texts]
        flags = Counter(f for sid, t in texts for f in response_flags(t, situations[sid].user_text, 3, 220))
        flagged = ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "none"
        print(f"| {pole} | {len(texts)} | {statistics.mean(counts):.1f} | {min(counts)} | {max(counts)} | {flagged} |")
    near = [(sid, a, b) for sid, r in replies.items() for a, b in _pairs(r) if jaccard(a, b) >= 0.6]
    print(f"\nnear-duplicate reply pairs within a situation (Jaccard >= 0.6): {len(near)}")
    owner: dict[tuple, str] = {}
    shared = set()
    for sid, r in replies.items():
        for text in [*r.responses.values(), r.fused]:
            for sh in shingles(text, 10):
                if owner.setdefault(sh, sid) != sid:
                    shared.add((owner[sh], sid))
    print(f"situation pairs sharing a 10-word run: {len(shared)}" + (f" (e.g. {sorted(shared)[:3]})" if shared else ""))


def _pairs(r):
    texts = [*r.responses.values(), r.fused]
    return [(a, b) for i, a in enumerate(texts) for b in texts[i + 1 :]]


def overlap(args, personas, replies: dict) -> None:
    """8-word runs shared with any benchmark file or with the persona YAML's example replies."""
    from datamodules.benchmarks import resolve_data_root

    reference: set[tuple[str, ...]] = set()
    root = resolve_data_root(None)
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".txt", ".yaml")]
    for path in files:
        reference |= shingles(path.read_text(encoding="utf-8", errors="replace"), 8)
    examples = {sh for p in personas.poles for e in p.examples for sh in shingles(e.reply, 8)}
    texts = [t for r in replies.values() for t in [*r.responses.values(), r.fused]]
    hits = [t for t in texts if shingles(t, 8) & reference]
    copied = [t for t in texts if shingles(t, 8) & examples]
    print(f"\nreplies sharing an 8-word run with the {len(files)} benchmark files under {root}: {len(hits)}")
    for t in hits[:5]:
        print(f"  - {t[:120]}...")
    print(f"replies sharing an 8-word run with the persona YAML's example replies: {len(copied)}")


def probe(personas, split: dict[str, str], replies: dict) -> dict[str, float]:
    import torch

    from lightning_modules.components.pole_classifier import embed_replies, split_replies, train_pole_classifier

    traits = [p.trait for p in personas.poles]
    _, _, centered = train_pole_classifier(replies, split, personas.ids, traits, centered=True)
    clf, encoder, scores = train_pole_classifier(replies, split, personas.ids, traits)
    print(f"\n## Separability (MiniLM linear probe; train {scores['train_replies']:.0f} replies, val {scores['val_replies']:.0f})")
    print(f"C chosen by 5-fold CV on train (folds grouped by situation): {scores['C']:g}")
    print(f"val ten-way accuracy: {scores['val_accuracy']:.3f}; "
          f"val high-vs-low accuracy (mean over traits): {scores['val_trait_accuracy']:.3f}")
    val_x, val_y, _ = split_replies(replies, split, personas.ids, "val")
    with torch.no_grad():
        predicted = clf(embed_replies(encoder, val_x)).argmax(-1).tolist()
    print(f"persona_expression's instrument (each reply relative to its situation's centroid of curated replies): "
          f"val ten-way {centered['val_accuracy']:.3f}, high-vs-low {centered['val_trait_accuracy']:.3f}")
    print("| pole | val recall (plain probe) | most often mistaken for |\n|---|---|---|")
    for i, pole in enumerate(personas.ids):
        rows = [p for p, t in zip(predicted, val_y) if t == i]
        wrong = [personas.ids[p] for p in rows if p != i]
        top = Counter(wrong).most_common(1)[0][0] if wrong else "-"
        print(f"| {pole} | {sum(p == i for p in rows) / max(1, len(rows)):.2f} | {top} |")
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", default="datamodules/data/persona_replies.jsonl")
    parser.add_argument("--situations", default="datamodules/data/situations.jsonl")
    parser.add_argument("--personas", default="experiments/personas/big_five.yaml")
    parser.add_argument("--skip-probe", action="store_true", help="no MiniLM probe (no model load)")
    parser.add_argument("--skip-benchmarks", action="store_true", help="no overlap check against benchmark files")
    args = parser.parse_args(argv)
    personas, split, situations, replies = load(args)
    coverage(split, situations, replies)
    content(personas, situations, replies)
    if not args.skip_benchmarks:
        overlap(args, personas, replies)
    if not args.skip_probe:
        probe(personas, split, replies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
