"""`persona_expression`: does a system's reply express the poles its situation calls for?

The method's own claim, measured with instruments a small model can pass (built-in, not from
../shared/benchmarks). Items are the held-out test situations of the curated corpus, each with its
ten activation labels and its ten curated pole replies (`datamodules/data/persona_replies.jsonl`,
never trained on). For each item a system
- writes a reply (greedy), which the pole classifier (trained on train-split curated replies only,
  injected by the evaluate stage) turns into ten pole probabilities: `alignment` is the mean over
  situations of the Pearson correlation between the labels and those probabilities, and
  `pole_rate/<pole>` the share of replies the classifier assigns to each pole (`own_pole_rate` of
  an `expert_<pole>` system is its own pole's rate);
- scores each curated reference reply (summed log-likelihood, stored with the reply's word count),
  from which `pole_preference` compares the system's gain over the base model on the two poles of
  a trait (`pole_preference` below; it needs the base system's records, so the evaluate stage
  computes it across systems).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from .base import Benchmark, checked_generate, checked_option_logprobs, mean
from .stats import bootstrap_intervals

Classifier = Callable[[list[str], list[list[str]]], list[list[float]]]
"""(replies, each reply's situation references) -> pole probabilities per reply."""
PREFIX = "persona_expression"
CLASSIFIER_METRICS = ("val_accuracy", "val_trait_accuracy")
MIN_LABEL_GAP = 0.3  # the two poles' labels must differ by this much for a trait to count in pole_preference


class PersonaExpression(Benchmark):
    """Generation + reference likelihoods on the curated test situations; see the module docstring."""

    name = PREFIX

    def __init__(self, data_root=None, limit: Optional[int] = None, seed: int = 0, max_new_tokens: int = 96,
                 replies: Optional[str] = None, items: Sequence[dict] = (), poles: Sequence[str] = (),
                 classifier: Optional[Classifier] = None):
        """`replies`: the curated corpus file (None: the evaluate stage uses datagen.teacher.replies).
        Items, pole ids and the classifier come from the evaluate stage (`bind`), which can read the
        corpus and build the model-side classifier; a classifier may carry its val `scores`."""
        super().__init__(data_root, limit, seed)
        self.max_new_tokens = max_new_tokens
        self.replies = replies
        self.bind(items, poles, classifier)

    def bind(self, items: Sequence[dict], poles: Sequence[str], classifier: Optional[Classifier],
             pairs: Sequence[tuple[int, int]] = ()) -> None:
        """Items, pole ids, the classifier and the (high, low) pole index pairs pole_preference compares."""
        self.items = [dict(i) for i in items]
        self.poles = list(poles)
        self.classifier = classifier
        self.pairs = list(pairs)
        self._all_items = None

    def read_items(self) -> list[dict]:
        """Held-out situations: {item_id, prompt (the conversation), label (pole order), references (pole order)}."""
        if not self.items:
            raise ValueError("persona_expression has no items: the evaluate stage builds it from the curated corpus")
        return self.items

    def run_batch(self, model, batch) -> list[dict]:
        if self.classifier is None:
            raise RuntimeError("persona_expression needs its pole classifier (set by the evaluate stage)")
        convs = [item["prompt"] for item in batch]
        replies = checked_generate(model, convs, self.max_new_tokens)
        # The classifier reads each reply relative to its situation (the references' centroid).
        probs = self.classifier(replies, [item["references"] for item in batch])
        scores = dict(getattr(self.classifier, "scores", None) or {})
        ref_ll = checked_option_logprobs(model, convs, [item["references"] for item in batch])
        return [
            {"item_id": item["item_id"], "prompt": item["prompt"], "output": reply, "label": item["label"],
             "pole_probs": [float(p) for p in row], "reference_logprobs": ll,
             "reference_words": [max(1, len(r.split())) for r in item["references"]],
             "classifier": scores}
            for item, reply, row, ll in zip(batch, replies, probs, ref_ll)
        ]

    def score_record(self, record: dict) -> dict:
        probs = record["pole_probs"]
        return {"predicted_pole": max(range(len(probs)), key=lambda i: (probs[i], -i)),
                "alignment": pearson(record["label"], probs)}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        if not records:
            return {}
        poles = self.poles or [str(i) for i in range(len(records[0]["pole_probs"]))]
        aligned = [r["alignment"] for r in records if r["alignment"] is not None]
        metrics = {f"{PREFIX}/alignment": mean(aligned) if aligned else math.nan}
        for i, pole in enumerate(poles):
            metrics[f"{PREFIX}/pole_rate/{pole}"] = mean(r["predicted_pole"] == i for r in records)
        for key in CLASSIFIER_METRICS:
            value = (records[0].get("classifier") or {}).get(key)
            metrics[f"{PREFIX}/classifier_{key}"] = math.nan if value is None else float(value)
        return metrics


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation; None when either side is constant (undefined)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def build_items(situations: Sequence, replies: dict, poles: Sequence[str]) -> list[dict]:
    """Benchmark items from held-out situations (objects with id, conversation(), label) and their curated replies."""
    items = []
    for s in situations:
        if s.id in replies:
            items.append({"item_id": s.id, "prompt": s.conversation(), "label": [float(s.label[p]) for p in poles],
                          "references": [replies[s.id].responses[p] for p in poles]})
    return items


# ----- pole_preference: a system's likelihood gain over base, own pole against the opposite ------------------


def gains(records: list[dict], base_records: list[dict]) -> list[list[float]]:
    """Per item and reference: (system - base) mean log-likelihood per word of the curated reply."""
    by_id = {r["item_id"]: r for r in base_records}
    out = []
    for r in records:
        b = by_id[r["item_id"]]
        out.append([(s - t) / w for s, t, w in zip(r["reference_logprobs"], b["reference_logprobs"], r["reference_words"])])
    return out


def preference_outcomes(records: list[dict], base_records: list[dict], pairs: Sequence[tuple[int, int]],
                        own_pole: Optional[int] = None) -> list[float]:
    """1/0 per comparison: does the favoured pole's reply gain more than its opposite's?

    An expert alone (`own_pole`): one comparison per situation, its own pole against the opposite.
    Any other system: one per (situation, trait) whose two labels differ by >= MIN_LABEL_GAP,
    favouring the pole with the higher label."""
    outcomes = []
    opposite = {a: b for pair in pairs for a, b in (pair, pair[::-1])}
    for r, g in zip(records, gains(records, base_records)):
        if own_pole is not None:
            outcomes.append(float(g[own_pole] > g[opposite[own_pole]]))
            continue
        for high, low in pairs:
            gap = r["label"][high] - r["label"][low]
            if abs(gap) >= MIN_LABEL_GAP:
                favoured, other = (high, low) if gap > 0 else (low, high)
                outcomes.append(float(g[favoured] > g[other]))
    return outcomes


def preference_metric(outcomes: list[float], samples: int, seed: int) -> dict[str, float]:
    """`pole_preference` (share of comparisons won) with its bootstrap interval; NaN with no comparison."""
    key = f"{PREFIX}/pole_preference"
    if not outcomes:
        return {key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan, f"{PREFIX}/pole_comparisons": 0.0}
    rows = [{"won": o} for o in outcomes]
    share = lambda rs: {key: mean(r["won"] for r in rs)}  # noqa: E731
    return {**share(rows), **bootstrap_intervals(share, rows, samples, seed), f"{PREFIX}/pole_comparisons": float(len(rows))}


def cross_system_metrics(records: dict[str, list[dict]], own_pole: dict[str, Optional[int]], baseline: str,
                         pairs: Sequence[tuple[int, int]], samples: int, seed: int) -> dict[str, dict[str, float]]:
    """Metrics that need two systems or the system's identity: per system `pole_preference` (against the
    baseline's likelihoods) and, for an expert alone, `own_pole_rate` (its own pole's rate, with interval).

    `records`: system -> its persona_expression records; `own_pole`: system -> the index of the one
    expert it switches on (None for every other system)."""
    out: dict[str, dict[str, float]] = {}
    base = records.get(baseline)
    for system, recs in records.items():
        m: dict[str, float] = {}
        pole = own_pole.get(system)
        if base is not None and system != baseline:
            m.update(preference_metric(preference_outcomes(recs, base, pairs, pole), samples, seed))
        if pole is not None:
            hit = [{"own": float(r["predicted_pole"] == pole)} for r in recs]
            rate = lambda rs: {f"{PREFIX}/own_pole_rate": mean(r["own"] for r in rs)}  # noqa: E731
            m.update({**rate(hit), **bootstrap_intervals(rate, hit, samples, seed)})
        out[system] = m
    return out
