"""EQ-Bench v2 (revision off): predict four emotion intensities 0-10 for a dialogue character.

Rules (shared/benchmarks/README.md): the critique/revision parts of the prompt are removed; every
``Name: number`` pair in the reply is parsed; an item is usable only with exactly four pairs whose
names equal the four reference names; item score = 10 - 0.7477 * sum t(|pred - ref|) with the
S-shaped t; benchmark score = 10 x mean item score over usable items, reported with the parsed count.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from .base import Benchmark, checked_generate, format_error, mean, read_json, user_turn

FILE = "eq_bench/eq_bench_v2_questions_171.json"
ADJUST_CONST = 0.7477

_CRITIQUE_SENTENCE = re.compile(
    r"[ \t]*Then critique your answer by thinking it through step by step\.\s*Finally, give your revised scores\."
)
_FIRST_PASS_HEADING = re.compile(r"First pass scores:[ \t]*\n?")
_CRITIQUE_BLOCK = re.compile(r"Critique:.*?\[End of answer\]\n*", re.DOTALL)
# A name (one word, as all reference names are), a colon, a number (ints or decimals).
_PAIR = re.compile(r"([A-Za-z][A-Za-z'\-]*)[ \t]*:[ \t]*(-?\d+(?:\.\d+)?)")


def strip_revision(prompt: str) -> str:
    """Drop the critique/revise sentence, the "First pass scores:" heading and Critique..[End of answer]."""
    prompt = _CRITIQUE_SENTENCE.sub("", prompt, count=1)
    prompt = _FIRST_PASS_HEADING.sub("", prompt, count=1)
    return _CRITIQUE_BLOCK.sub("", prompt, count=1)


def parse_pairs(text: str) -> list[tuple[str, float]]:
    """Every ``Name: number`` pair in the reply, markdown emphasis (* and #) removed first."""
    clean = text.replace("*", "").replace("#", "")
    return [(name, float(value)) for name, value in _PAIR.findall(clean)]


def usable_answer(pairs: Sequence[tuple[str, float]], reference: dict[str, float]) -> dict[str, float] | None:
    """The answer as {name: score} if exactly four pairs name exactly the reference emotions, else None."""
    names = [name for name, _ in pairs]
    if len(pairs) != 4 or sorted(names) != sorted(reference):
        return None
    return dict(pairs)


def t_distance(d: float) -> float:
    """Scaled difference: 0 at d=0, logistic 6.5/(1+e^(-1.2(d-4))) up to 5, linear beyond."""
    if d == 0:
        return 0.0
    if d <= 5:
        return 6.5 / (1 + math.exp(-1.2 * (d - 4)))
    return d


def item_score(answer: dict[str, float], reference: dict[str, float]) -> float:
    """10 - 0.7477 * sum over the four emotions of t(|predicted - reference|)."""
    tally = sum(t_distance(abs(answer[name] - ref)) for name, ref in reference.items())
    return 10 - ADJUST_CONST * tally


class EQBench(Benchmark):
    """EQ-Bench v2, 171 dialogues, generative; metrics eq_bench/score, /parsed, /parsed_fraction."""

    name = "eq_bench"

    def __init__(self, data_root=None, limit: int | None = None, seed: int = 0, max_new_tokens: int = 96):
        super().__init__(data_root, limit, seed)
        self.max_new_tokens = max_new_tokens

    def read_items(self) -> list[dict]:
        """Items keyed "1".."171" with the v2 (fullscale) reference cast to float."""
        path = self.path(FILE)
        data = read_json(self.name, path)
        if not isinstance(data, dict):
            raise format_error(self.name, path, 1, "expected a JSON object keyed by question id")
        return [self._item(path, key, row) for key, row in data.items()]

    def _item(self, path, key: str, row) -> dict:
        ref = row.get("reference_answer_fullscale") if isinstance(row, dict) else None
        if not isinstance(row, dict) or "prompt" not in row or not isinstance(ref, dict):
            raise format_error(self.name, path, f"item {key}", "needs 'prompt' and 'reference_answer_fullscale'")
        try:
            reference = {str(ref[f"emotion{i}"]): float(ref[f"emotion{i}_score"]) for i in range(1, 5)}
        except (KeyError, TypeError, ValueError) as err:
            raise format_error(self.name, path, f"item {key}", f"bad reference_answer_fullscale ({err!r})") from err
        return {"item_id": str(key), "prompt": user_turn(strip_revision(row["prompt"])), "reference": reference}

    def run_batch(self, model, batch) -> list[dict]:
        replies = checked_generate(model, [item["prompt"] for item in batch], self.max_new_tokens)
        return [
            {"item_id": item["item_id"], "prompt": item["prompt"], "output": reply, "reference": item["reference"]}
            for item, reply in zip(batch, replies)
        ]

    def score_record(self, record: dict) -> dict:
        reference = {k: float(v) for k, v in record["reference"].items()}
        answer = usable_answer(parse_pairs(record["output"]), reference)
        score = None if answer is None else item_score(answer, reference)
        return {"parsed_answer": answer, "parsed": answer is not None, "score": score}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        scores = [r["score"] for r in records if r["parsed"]]
        return {
            # no parsed item: the score is undefined (NaN, shown as "—"), not 0, which would read as "about random"
            "eq_bench/score": 10 * mean(scores) if scores else math.nan,
            "eq_bench/parsed": float(len(scores)),
            "eq_bench/parsed_fraction": len(scores) / len(records) if records else 0.0,
        }
