"""EmoBench emotional understanding (EU) and emotional application (EA), scored by letter log-likelihood.

EU asks two lettered multiple-choice questions per scenario (which emotion the subject finally
feels; why) and counts an item correct only when both are right. The cause question does not
name any emotion, so it cannot leak the emotion answer. EA asks for the most effective
action/response with the options shuffled per item from the seed (the right option's position is
skewed in the file). Instructions are in English for both languages.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from .base import (
    LETTERS,
    Benchmark,
    argmax,
    checked_option_logprobs,
    format_error,
    lettered,
    mean,
    read_jsonl,
    slug,
    user_turn,
)

LANGUAGES = ("en", "zh")
ANSWER_INSTRUCTION = "Answer with the letter of the correct option only."


def mc_prompt(scenario: str, question: str, options: Sequence[str]) -> str:
    """The shared lettered multiple-choice layout."""
    return f"Scenario: {scenario}\n\nQuestion: {question}\n\nOptions:\n{lettered(options)}\n\n{ANSWER_INSTRUCTION}"


def choose(options: Sequence[str], logprobs: Sequence[float]) -> str:
    """The option text whose letter has the highest log-likelihood."""
    return options[argmax(logprobs)]


def per_category(records: list[dict], prefix: str) -> dict[str, float]:
    """Overall accuracy plus accuracy per category slug."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        groups[slug(record["category"])].append(record["correct"])
    metrics = {f"{prefix}/accuracy": mean(r["correct"] for r in records)}
    metrics.update({f"{prefix}/{name}": mean(values) for name, values in sorted(groups.items())})
    return metrics


class _EmoBench(Benchmark):
    """Shared reading: JSON Lines filtered to one language, labels checked against the choices."""

    file = ""
    required: tuple[str, ...] = ()

    def __init__(self, data_root=None, limit: int | None = None, seed: int = 0, language: str = "en"):
        super().__init__(data_root, limit, seed)
        if language not in LANGUAGES:
            raise ValueError(f"{self.name}: language must be one of {LANGUAGES}, got {language!r}")
        self.language = language

    def read_items(self) -> list[dict]:
        path = self.path(self.file)
        rows = read_jsonl(self.name, path, self.required)
        return [self._item(path, row["_line"], row) for row in rows if row["language"] == self.language]

    def _letters(self, options: Sequence[str]) -> list[str]:
        return list(LETTERS[: len(options)])

    def _item(self, path, lineno: int, row: dict) -> dict:
        raise NotImplementedError


class EmoBenchEU(_EmoBench):
    """EmoBench EU: emotion + cause both right; emobench_eu/accuracy and per coarse category."""

    name = "emobench_eu"
    file = "emobench/EU.jsonl"
    required = ("qid", "language", "scenario", "subject", "emotion_choices", "emotion_label",
                "cause_choices", "cause_label", "coarse_category")

    def _item(self, path, lineno: int, row: dict) -> dict:
        for choices, label in (("emotion_choices", "emotion_label"), ("cause_choices", "cause_label")):
            if row[label] not in row[choices]:
                raise format_error(self.name, path, lineno, f"{label} {row[label]!r} is not one of {choices}")
        return {"item_id": f"{row['language']}-{row['qid']}", **{k: row[k] for k in self.required}}

    def _prompts(self, item: dict) -> tuple[list, list]:
        emotion = mc_prompt(item["scenario"], f"What emotion would {item['subject']} ultimately feel in this situation?",
                            item["emotion_choices"])
        cause = mc_prompt(item["scenario"], f"Why would {item['subject']} feel this way in this situation?",
                          item["cause_choices"])
        return user_turn(emotion), user_turn(cause)

    def run_batch(self, model, batch) -> list[dict]:
        prompts = [self._prompts(item) for item in batch]
        conversations = [p for pair in prompts for p in pair]
        options = [self._letters(item[key]) for item in batch for key in ("emotion_choices", "cause_choices")]
        scores = checked_option_logprobs(model, conversations, options)
        return [
            {
                "item_id": item["item_id"],
                "prompt": emotion_prompt,
                "cause_prompt": cause_prompt,
                "category": item["coarse_category"],
                "emotion_options": item["emotion_choices"],
                "cause_options": item["cause_choices"],
                "emotion_logprobs": scores[2 * i],
                "cause_logprobs": scores[2 * i + 1],
                "reference": {"emotion": item["emotion_label"], "cause": item["cause_label"]},
            }
            for i, (item, (emotion_prompt, cause_prompt)) in enumerate(zip(batch, prompts))
        ]

    def score_record(self, record: dict) -> dict:
        emotion = choose(record["emotion_options"], record["emotion_logprobs"])
        cause = choose(record["cause_options"], record["cause_logprobs"])
        emotion_ok = emotion == record["reference"]["emotion"]
        cause_ok = cause == record["reference"]["cause"]
        return {"parsed_answer": {"emotion": emotion, "cause": cause}, "emotion_correct": emotion_ok,
                "cause_correct": cause_ok, "correct": emotion_ok and cause_ok}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        metrics = per_category(records, self.name)
        metrics[f"{self.name}/emotion_accuracy"] = mean(r["emotion_correct"] for r in records)
        metrics[f"{self.name}/cause_accuracy"] = mean(r["cause_correct"] for r in records)
        return metrics


class EmoBenchEA(_EmoBench):
    """EmoBench EA: best action/response, options shuffled by seed; emobench_ea/accuracy and per category."""

    name = "emobench_ea"
    file = "emobench/EA.jsonl"
    required = ("qid", "language", "scenario", "subject", "choices", "label", "category", "question type")

    def _item(self, path, lineno: int, row: dict) -> dict:
        if row["label"] not in row["choices"]:
            raise format_error(self.name, path, lineno, f"label {row['label']!r} is not one of choices")
        item_id = f"{row['language']}-{row['qid']}"
        options = list(row["choices"])
        random.Random(f"{self.seed}:{item_id}").shuffle(options)
        return {"item_id": item_id, "scenario": row["scenario"], "subject": row["subject"], "options": options,
                "label": row["label"], "category": row["category"], "question_type": row["question type"]}

    def _prompt(self, item: dict) -> list:
        kind = "action" if item["question_type"].strip().lower() == "action" else "response"
        question = f"In this scenario, what is the most effective {kind} for {item['subject']}?"
        return user_turn(mc_prompt(item["scenario"], question, item["options"]))

    def run_batch(self, model, batch) -> list[dict]:
        prompts = [self._prompt(item) for item in batch]
        scores = checked_option_logprobs(model, prompts, [self._letters(item["options"]) for item in batch])
        return [
            {"item_id": item["item_id"], "prompt": prompt, "category": item["category"],
             "question_type": item["question_type"], "options": item["options"], "logprobs": logprobs,
             "reference": item["label"]}
            for item, prompt, logprobs in zip(batch, prompts, scores)
        ]

    def score_record(self, record: dict) -> dict:
        answer = choose(record["options"], record["logprobs"])
        return {"parsed_answer": answer, "correct": answer == record["reference"]}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        return per_category(records, self.name)
