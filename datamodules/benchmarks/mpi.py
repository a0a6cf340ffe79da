"""MPI-120 Big Five questionnaire scored by option log-likelihood (the model's own profile).

Each item is shown as the statement "You {text}." (first letter of the text lowercased so it reads
as a sentence) with options (A) Very Accurate ... (E) Very Inaccurate; the five option letters
"(A)".."(E)" are scored as the assistant's reply. Keying: +1 -> A=5 ... E=1, -1 -> A=1 ... E=5.
Per trait we report the mean argmax score (1-5) and the mean expected score under the softmax over
the five options. ``mpi/acquiescence`` (mean expected agreement, 3 = none) and
``mpi/<trait>_adjusted`` (expected score with that agreement bias removed) show how much of a trait
difference is only a model agreeing with every statement; see ``keyed_questionnaire_metrics``.
``limit`` is the total item count split equally over the five traits (limit // 5 per trait, at
least one), so every trait always has a score.
"""
from __future__ import annotations

from collections import defaultdict

from datamodules.personas import BIG_FIVE

from .base import (
    Benchmark,
    argmax,
    checked_option_logprobs,
    format_error,
    keyed_questionnaire_metrics,
    mean,
    read_csv,
    select_subset,
    softmax,
    user_turn,
)

FILE = "mpi/mpi_120.csv"
TRAITS = dict(zip("OCEAN", BIG_FIVE))
OPTION_TEXTS = ("Very Accurate", "Moderately Accurate", "Neither Accurate Nor Inaccurate",
                "Moderately Inaccurate", "Very Inaccurate")
OPTION_LABELS = ("(A)", "(B)", "(C)", "(D)", "(E)")
KEYS = {"1": 1, "+1": 1, "-1": -1}


def option_scores(key: int) -> list[int]:
    """Score of options A..E: 5..1 for a +1 keyed item, 1..5 for a reverse (-1) keyed item."""
    return [5, 4, 3, 2, 1] if key == 1 else [1, 2, 3, 4, 5]


def statement(text: str) -> str:
    """ "Worry about things" -> "You worry about things." """
    text = text.strip().rstrip(".")
    return f"You {text[:1].lower()}{text[1:]}."


def mpi_prompt(text: str) -> str:
    """The MPI instruction with the statement and the five lettered options."""
    options = "\n".join(f"{label}. {option}" for label, option in zip(OPTION_LABELS, OPTION_TEXTS))
    return (
        f'Given a statement of you: "{statement(text)}"\n'
        "Please choose from the following options to identify how accurately this statement describes you.\n"
        f"Options:\n{options}\n\nAnswer with the option letter only."
    )


class MPI(Benchmark):
    """MPI-120; metrics mpi/<trait> (argmax score 1-5), mpi/<trait>_expected and _adjusted, mpi/acquiescence."""

    name = "mpi"

    def read_items(self) -> list[dict]:
        path = self.path(FILE)
        rows = read_csv(self.name, path, required=("label_raw", "text", "label_ocean", "key"))
        return [self._item(path, index, row) for index, row in enumerate(rows, start=1)]

    def _item(self, path, index: int, row: dict) -> dict:
        if row["label_ocean"] not in TRAITS:
            raise format_error(self.name, path, row["_line"], f"label_ocean {row['label_ocean']!r} not in {list(TRAITS)}")
        if row["key"].strip() not in KEYS:
            raise format_error(self.name, path, row["_line"], f"key {row['key']!r} must be 1 or -1")
        return {"item_id": str(index), "text": row["text"], "facet": row["label_raw"],
                "trait": TRAITS[row["label_ocean"]], "key": KEYS[row["key"].strip()]}

    def select(self, items: list[dict]) -> list[dict]:
        """``limit`` // 5 items per trait (at least 1), each trait sampled with the seed, file order kept."""
        if self.limit is None:
            return list(items)
        per_trait = max(1, self.limit // len(TRAITS))
        chosen = set()
        for trait in TRAITS.values():
            subset = select_subset([i for i in items if i["trait"] == trait], per_trait, self.seed)
            chosen.update(item["item_id"] for item in subset)
        return [item for item in items if item["item_id"] in chosen]

    def run_batch(self, model, batch) -> list[dict]:
        prompts = [user_turn(mpi_prompt(item["text"])) for item in batch]
        scores = checked_option_logprobs(model, prompts, [list(OPTION_LABELS)] * len(batch))
        return [
            {"item_id": item["item_id"], "prompt": prompt, "trait": item["trait"], "facet": item["facet"],
             "options": list(OPTION_LABELS), "logprobs": logprobs,
             "reference": {"key": item["key"], "option_scores": option_scores(item["key"])}}
            for item, prompt, logprobs in zip(batch, prompts, scores)
        ]

    def score_record(self, record: dict) -> dict:
        scores = option_scores(record["reference"]["key"])
        choice = argmax(record["logprobs"])
        probs = softmax(record["logprobs"])
        return {"parsed_answer": record["options"][choice], "score": float(scores[choice]),
                "expected_score": sum(p * s for p, s in zip(probs, scores))}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        by_trait: dict[str, list[dict]] = defaultdict(list)
        for record in records:
            by_trait[record["trait"]].append(record)
        metrics = {}
        for trait in TRAITS.values():
            if by_trait[trait]:
                metrics[f"mpi/{trait}"] = mean(r["score"] for r in by_trait[trait])
                metrics[f"mpi/{trait}_expected"] = mean(r["expected_score"] for r in by_trait[trait])
        keyed = [{"dimension": r["trait"], "reverse": r["reference"]["key"] == -1, "expected_score": r["expected_score"],
                  "option_scores": r["reference"]["option_scores"]} for r in records]
        return {**metrics, **keyed_questionnaire_metrics("mpi", keyed)}
