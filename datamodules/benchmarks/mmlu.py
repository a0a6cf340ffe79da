"""MMLU (57 subjects), k-shot from dev, scored by the log-likelihood of the answer letter.

The k dev examples of the same subject are given as earlier user/assistant turns (the assistant
answering with the bare letter), then the test question; the letters A-D are scored as the reply.
Micro accuracy is over items, macro accuracy is the mean of per-subject accuracies. ``limit``
spreads the items over the subjects round-robin (each subject's order shuffled by the seed), so a
small limit still covers as many subjects as it can and the macro mean stays meaningful.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .base import (
    Benchmark,
    BenchmarkDataError,
    argmax,
    checked_option_logprobs,
    format_error,
    lettered,
    mean,
    read_csv,
)

COLUMNS = ("question", "A", "B", "C", "D", "answer")
CHOICES = ("A", "B", "C", "D")
SPLITS = ("test", "val")
ANSWER_INSTRUCTION = "Answer with the letter of the correct option only."


def question_block(row: dict) -> str:
    """Question, lettered options and the answer instruction."""
    return f"{row['question']}\n{lettered([row[c] for c in CHOICES])}\n{ANSWER_INSTRUCTION}"


def few_shot_conversation(subject: str, shots: Sequence[dict], row: dict) -> list[dict]:
    """k solved dev questions as prior turns, then the question to answer."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    turns = []
    for shot in [*shots, row]:
        turns.append({"role": "user", "content": question_block(shot)})
        if shot is not row:
            turns.append({"role": "assistant", "content": shot["answer"]})
    turns[0]["content"] = header + turns[0]["content"]
    return turns


class MMLU(Benchmark):
    """MMLU; metrics mmlu/accuracy (micro) and mmlu/macro_accuracy."""

    name = "mmlu"

    def __init__(self, data_root=None, limit: int | None = None, seed: int = 0, k_shot: int = 5,
                 subjects: Sequence[str] | None = None, split: str = "test"):
        super().__init__(data_root, limit, seed)
        if not 0 <= k_shot <= 5:
            raise ValueError(f"mmlu: k_shot must be in 0..5 (dev has 5 items per subject), got {k_shot}")
        if split not in SPLITS:
            raise ValueError(f"mmlu: split must be one of {SPLITS}, got {split!r}")
        self.k_shot, self.split = k_shot, split
        self.subjects = list(subjects) if subjects is not None else None

    def available_subjects(self) -> list[str]:
        """Subjects that have a file in the chosen split, sorted."""
        folder = self.data_root / "mmlu" / self.split
        if not folder.is_dir():
            raise BenchmarkDataError(
                f"benchmark 'mmlu': expected folder 'mmlu/{self.split}' not found (data root tried: {self.data_root})"
            )
        return sorted(p.name[: -len(f"_{self.split}.csv")] for p in folder.glob(f"*_{self.split}.csv"))

    def _chosen_subjects(self) -> list[str]:
        available = self.available_subjects()
        if self.subjects is None:
            return available
        unknown = sorted(set(self.subjects) - set(available))
        if unknown:
            raise ValueError(f"mmlu: unknown subject(s) {unknown}; available: {available}")
        return sorted(set(self.subjects))

    def _rows(self, relative: str) -> tuple[Path, list[dict]]:
        path = self.path(relative)
        rows = read_csv(self.name, path, columns=COLUMNS)
        for row in rows:
            if row["answer"].strip() not in CHOICES:
                raise format_error(self.name, path, row["_line"], f"answer {row['answer']!r} is not one of {CHOICES}")
            row["answer"] = row["answer"].strip()
        return path, rows

    def read_items(self) -> list[dict]:
        items = []
        for subject in self._chosen_subjects():
            dev_path, shots = self._rows(f"mmlu/dev/{subject}_dev.csv")
            if len(shots) < self.k_shot:
                raise format_error(self.name, dev_path, len(shots), f"needs {self.k_shot} dev rows, has {len(shots)}")
            _, rows = self._rows(f"mmlu/{self.split}/{subject}_{self.split}.csv")
            items += [{"item_id": f"{subject}-{i}", "subject": subject, "row": row, "shots": shots[: self.k_shot]}
                      for i, row in enumerate(rows)]
        return items

    def select(self, items: list[dict]) -> list[dict]:
        """Round-robin over subjects, each subject's items in a seeded order; file order kept."""
        if self.limit is None or self.limit >= len(items):
            return list(items)
        queues: dict[str, list[dict]] = defaultdict(list)
        for item in items:
            queues[item["subject"]].append(item)
        for subject, queue in queues.items():
            random.Random(f"{self.seed}:{subject}").shuffle(queue)
        chosen: set[str] = set()
        depth = 0
        while len(chosen) < self.limit:
            for subject in sorted(queues):
                if depth < len(queues[subject]) and len(chosen) < self.limit:
                    chosen.add(queues[subject][depth]["item_id"])
            depth += 1
        return [item for item in items if item["item_id"] in chosen]

    def run_batch(self, model, batch) -> list[dict]:
        prompts = [few_shot_conversation(item["subject"], item["shots"], item["row"]) for item in batch]
        scores = checked_option_logprobs(model, prompts, [list(CHOICES)] * len(batch))
        return [
            {"item_id": item["item_id"], "subject": item["subject"], "prompt": prompt,
             "options": [item["row"][c] for c in CHOICES], "letters": list(CHOICES), "logprobs": logprobs,
             "reference": item["row"]["answer"]}
            for item, prompt, logprobs in zip(batch, prompts, scores)
        ]

    def score_record(self, record: dict) -> dict:
        answer = record["letters"][argmax(record["logprobs"])]
        return {"parsed_answer": answer, "correct": answer == record["reference"]}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        by_subject: dict[str, list[bool]] = defaultdict(list)
        for record in records:
            by_subject[record["subject"]].append(record["correct"])
        return {
            "mmlu/accuracy": mean(r["correct"] for r in records),
            "mmlu/macro_accuracy": mean(mean(values) for values in by_subject.values()),
        }
