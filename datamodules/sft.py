"""Supervised fine-tuning data: {messages, response, pole} records -> masked token batches.

The chat template is applied to the conversation; only the response tokens (and the end-of-turn
token) carry a loss. Each example keeps the index of its pole, so one batch can mix experts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.loaders import train_loader

from datamodules.io import DataError, iter_jsonl, require_keys
from datamodules.personas import PersonaSet

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTRecord:
    messages: tuple[tuple[str, str], ...]
    response: str
    pole: str

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def persona_example_records(personas: PersonaSet) -> list[SFTRecord]:
    """The example replies of the persona YAML, one record each."""
    return [
        SFTRecord((("user", ex.user),), ex.reply, pole.id) for pole in personas.poles for ex in pole.examples
    ]


def load_sft_records(path: str | Path, poles: Sequence[str], on_bad_line: str = "fail") -> list[SFTRecord]:
    """Read {messages, response, pole} JSONL; unknown poles and empty responses are errors naming file:line."""
    records = []
    for lineno, raw in iter_jsonl(path, on_bad_line):
        where = f"{path}:{lineno}"
        require_keys(raw, ("messages", "response", "pole"), where)
        if raw["pole"] not in poles:
            raise DataError(f"{where}: unknown pole '{raw['pole']}' (expected one of {', '.join(poles)})")
        if not str(raw["response"]).strip() or not raw["messages"]:
            raise DataError(f"{where}: empty messages or response")
        msgs = tuple((m["role"], m["content"]) for m in raw["messages"])
        records.append(SFTRecord(msgs, str(raw["response"]), raw["pole"]))
    return records


def encode_example(tokenizer, conversation: list[dict], response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked; long prompts lose their oldest tokens first."""
    prompt_text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        conversation + [{"role": "assistant", "content": response}], tokenize=False
    )
    # Tokenise prompt and answer apart so that no merge across the boundary shifts the mask.
    answer_text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text.rstrip("\n"), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[: max(max_length // 2, max_length - len(prompt_ids))]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):] if max_length > len(answer_ids) else []
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


class SFTDataset(Dataset):
    """Tokenised chat examples as dicts: input_ids, labels (loss on the response only), plus each
    example's own fields (its pole index for adapter_sft; its label vector and conversation for joint).

    examples: (conversation, response, fields) triples.
    """

    def __init__(self, examples: Iterable[tuple[list[dict], str, dict]], tokenizer, max_length: int):
        self.items = []
        for conversation, response, fields in examples:
            ids, labels = encode_example(tokenizer, conversation, response, max_length)
            self.items.append({"input_ids": ids, "labels": labels, **fields})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(pad_id: int, tensor_keys: Sequence[str] = ("pole",)):
    """Right-padded input_ids/labels with an attention mask; `tensor_keys` are stacked, other keys listed."""

    def _collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            input_ids[row, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            labels[row, : len(b["labels"])] = torch.tensor(b["labels"])
            mask[row, : len(b["input_ids"])] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        for key in batch[0].keys() - {"input_ids", "labels"}:
            values = [b[key] for b in batch]
            out[key] = torch.tensor(values) if key in tensor_keys else values
        return out

    return _collate


def split_by_pole(records: Sequence[SFTRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """Per-pole held-out split so every expert has validation data (when it has ≥ 2 records)."""
    train, val = [], []
    by_pole: dict[str, list[SFTRecord]] = {}
    for rec in records:
        by_pole.setdefault(rec.pole, []).append(rec)
    for pole, recs in sorted(by_pole.items()):
        recs = list(recs)
        random.Random(f"{seed}-{pole}").shuffle(recs)
        n_val = max(1, round(len(recs) * val_fraction)) if len(recs) >= 2 and val_fraction > 0 else 0
        val += recs[:n_val]
        train += recs[n_val:]
    return train, val


class PersonaSFTDataModule(L.LightningDataModule):
    """Mixed-pole SFT batches; the tokenizer is applied once in setup."""

    def __init__(self, records: Sequence[SFTRecord], tokenizer, pole_ids: Sequence[str], batch_size: int = 8,
                 max_length: int = 256, val_fraction: float = 0.15, seed: int = 0):
        super().__init__()
        self.records, self.tokenizer, self.pole_ids = list(records), tokenizer, list(pole_ids)
        self.batch_size, self.max_length, self.val_fraction, self.seed = batch_size, max_length, val_fraction, seed
        self.train_set: Optional[SFTDataset] = None
        self.val_set: Optional[SFTDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if not self.records:
            raise DataError("adapter SFT has no training records (no datagen output and no persona examples)")
        train, val = split_by_pole(self.records, self.val_fraction, self.seed)
        self.train_set = SFTDataset(self._examples(train), self.tokenizer, self.max_length)
        self.val_set = SFTDataset(self._examples(val), self.tokenizer, self.max_length)

    def _examples(self, records: Sequence[SFTRecord]) -> Iterator[tuple[list[dict], str, dict]]:
        return ((r.conversation(), r.response, {"pole": self.pole_ids.index(r.pole)}) for r in records)

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, collate(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=collate(self.tokenizer.pad_token_id))
