"""GSM8K test (1,319 problems), generative, exact match of the final number.

The reference is the number after ``####`` in the answer. From the model's reply we take the
first number after its last ``####`` (commas and spaces stripped there, so "#### 1,450 000" ->
1450000), else its last number anywhere (thousands commas allowed inside it). Numbers compare by
value after normalisation, so "18.00" matches "18" and "-3" matches "-3.0".
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .base import Benchmark, checked_generate, format_error, mean, read_jsonl, user_turn

FILE = "gsm8k/test.jsonl"
INSTRUCTION = ("Solve the following math problem step by step. "
               "Finish with a last line of the form '#### <number>'.")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NUMBER_WITH_COMMAS = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number (commas/spaces dropped, trailing zeros removed); None if not a number."""
    try:
        value = Decimal(text.replace(",", "").replace(" ", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """Final number of a reply: after the last ``####`` if present, else the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].replace(",", "").replace(" ", "")
        match = _NUMBER.search(tail)
        if match:
            return normalize_number(match.group())
    numbers = _NUMBER_WITH_COMMAS.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


class GSM8K(Benchmark):
    """GSM8K; metric gsm8k/accuracy."""

    name = "gsm8k"

    def __init__(self, data_root=None, limit: int | None = None, seed: int = 0, max_new_tokens: int = 256):
        super().__init__(data_root, limit, seed)
        self.max_new_tokens = max_new_tokens

    def read_items(self) -> list[dict]:
        path = self.path(FILE)
        return [self._item(path, index, row)
                for index, row in enumerate(read_jsonl(self.name, path, ("question", "answer")))]

    def _item(self, path, index: int, row: dict) -> dict:
        reference = normalize_number(row["answer"].rsplit("####", 1)[-1].strip()) if "####" in row["answer"] else None
        if reference is None:
            raise format_error(self.name, path, row["_line"], "answer does not end with '#### <number>'")
        return {"item_id": str(index), "question": row["question"], "reference": reference}

    def run_batch(self, model, batch) -> list[dict]:
        prompts = [user_turn(f"{INSTRUCTION}\n\n{item['question']}") for item in batch]
        replies = checked_generate(model, prompts, self.max_new_tokens)
        return [{"item_id": item["item_id"], "prompt": prompt, "output": reply, "reference": item["reference"]}
                for item, prompt, reply in zip(batch, prompts, replies)]

    def score_record(self, record: dict) -> dict:
        answer = extract_answer(record["output"])
        return {"parsed_answer": answer, "correct": answer is not None and answer == record["reference"]}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        return {"gsm8k/accuracy": mean(r["correct"] for r in records)}
