"""The situations corpus: conversation openings with a curated activation label per persona pole.

    items = load_situations("datamodules/data/situations.jsonl", load_personas("experiments/personas/big_five.yaml"))
    splits = split_situations(items, val_fraction=0.1, test_fraction=0.2, seed=0)

Each JSONL line is {"id", "domain", "messages": [{"role", "content"}, ...], "label": {pole_id: [0, 1]},
"rationale"}. The labels make the router trainable and testable whatever the teacher is.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.io import DataError, atomic_write_text, parse_jsonl
from datamodules.personas import PersonaSet
from datamodules.redaction import redact

SPLITS = ("train", "val", "test")
_ROLES = {"system", "user", "assistant"}
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Situation:
    id: str
    domain: str
    messages: tuple[dict, ...]
    label: dict[str, float]
    """Curated activation per pole, in the persona set's pole order."""
    rationale: str = ""

    @property
    def user_text(self) -> str:
        """Everything the user said, for the 'ignores the user' filter."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")

    def conversation(self) -> list[dict]:
        return [dict(m) for m in self.messages]


# --------------------------------------------------------------------------- loading


def load_situations(path: str | Path, personas: PersonaSet, on_bad_line: str = "fail") -> list[Situation]:
    """Parse and validate every line; errors name file:line and the key.

    on_bad_line="skip" drops malformed or invalid lines with a warning and a count instead.
    Label keys outside the persona set are ignored, so a 4-pole set can reuse a Big Five corpus.
    """
    if on_bad_line not in ("fail", "skip"):
        raise DataError(f"data.on_bad_line must be 'fail' or 'skip', got '{on_bad_line}'")
    first_line: dict[str, int] = {}

    def parse(record: dict, where: str, lineno: int) -> Situation:
        item = parse_situation(record, personas, where)
        if item.id in first_line:
            raise DataError(f"{where}: key 'id': duplicate id '{item.id}' (first at line {first_line[item.id]})")
        first_line[item.id] = lineno
        return item

    items = parse_jsonl(path, parse, on_bad_line, "situation")
    if not items:  # every stage would go on with nothing (the router ended in torch.cat([]))
        why = "every line was invalid and skipped (data.on_bad_line=skip)" if on_bad_line == "skip" else "the file is empty"
        raise DataError(f"{path}: no situations: {why}")
    return items


def parse_situation(record: dict, personas: PersonaSet, where: str) -> Situation:
    for key in ("id", "domain"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"{where}: key '{key}': a non-empty string is required")
    if not _ID.fullmatch(record["id"].strip()):
        raise DataError(f"{where}: key 'id': '{record['id']}' may hold only letters, digits, _ - . (it names a cache file)")
    messages = _check_messages(record.get("messages"), where)
    label = record.get("label")
    if not isinstance(label, dict):
        raise DataError(f"{where}: key 'label': a mapping pole_id -> value in [0, 1] is required")
    try:
        vector = personas.label_vector(label, where)
    except (TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{where}: key 'label': every value must be a number ({err})") from None
    rationale = record.get("rationale", "")
    if not isinstance(rationale, str):
        raise DataError(f"{where}: key 'rationale': must be a string")
    return Situation(
        id=record["id"].strip(),
        domain=record["domain"].strip(),
        messages=messages,
        label=dict(zip(personas.ids, vector)),
        rationale=rationale,
    )


def _check_messages(messages: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: key 'messages': a non-empty list of {{role, content}} is required")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise DataError(f"{where}: key 'messages[{i}].role': must be one of {sorted(_ROLES)}")
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise DataError(f"{where}: key 'messages[{i}].content': a non-empty string is required")
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{where}: key 'messages': the last turn must be the user's (it is '{out[-1]['role']}')")
    return tuple(out)


# --------------------------------------------------------------------------- splitting


def _rank(seed: int, item_id: str) -> str:
    """Order by a hash of (seed, id): independent of file order and of the other items."""
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def split_situations(
    items: Sequence[Situation], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Situation]]:
    """Deterministic split stratified by domain: each domain gives its share to val and test.

    Within a domain items are ranked by hash(seed, id); the first round(n * test) go to test, the
    next round(n * val) to val. Each split is returned sorted by id.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) "
            "must be >= 0 and sum to less than 1"
        )
    by_domain: dict[str, list[Situation]] = defaultdict(list)
    for item in items:
        by_domain[item.domain].append(item)
    out: dict[str, list[Situation]] = {name: [] for name in SPLITS}
    for domain in sorted(by_domain):
        ranked = sorted(by_domain[domain], key=lambda s: _rank(seed, s.id))
        n_test = _round_half_up(len(ranked) * test_fraction)
        n_val = min(_round_half_up(len(ranked) * val_fraction), len(ranked) - n_test)
        out["test"] += ranked[:n_test]
        out["val"] += ranked[n_test : n_test + n_val]
        out["train"] += ranked[n_test + n_val :]
    return {name: sorted(group, key=lambda s: s.id) for name, group in out.items()}


def require_split(splits: dict[str, list[Situation]], name: str, stage: str, path: str | Path) -> list[Situation]:
    """The named split; an empty one fails naming the stage, the split and the file, instead of a
    stage training or testing on nothing."""
    if not splits[name]:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise DataError(f"{stage}: the '{name}' split of {path} is empty ({sizes}): add situations or change "
                        "data.val_fraction / data.test_fraction")
    return splits[name]


def _round_half_up(x: float) -> int:
    # Python's round() rounds 2.5 to 2; half-up is easier to state in a dataset card.
    return int(math.floor(x + 0.5 + 1e-9))


def split_of(splits: dict[str, list[Situation]]) -> dict[str, str]:
    """id -> split name."""
    return {item.id: name for name, group in splits.items() for item in group}


def select_items(items: Sequence[Situation], limit: Optional[int], seed: int) -> list[Situation]:
    """`limit` items spread over domains (round-robin over hash-ranked domains), sorted by id."""
    if limit is None or limit >= len(items):
        return sorted(items, key=lambda s: s.id)
    if limit < 0:
        raise DataError(f"datagen.limit must be >= 0, got {limit}")
    queues: dict[str, list[Situation]] = defaultdict(list)
    for item in sorted(items, key=lambda s: _rank(seed, s.id)):
        queues[item.domain].append(item)
    chosen: list[Situation] = []
    while len(chosen) < limit:
        for domain in sorted(queues):
            if queues[domain] and len(chosen) < limit:
                chosen.append(queues[domain].pop(0))
    return sorted(chosen, key=lambda s: s.id)


# --------------------------------------------------------------------------- the datagen predict loop


class _BatchList(Dataset):
    """Each element is one whole batch, so batch composition (and its seed) never depends on the sampler."""

    def __init__(self, batches: list[tuple[int, list[Situation]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[int, list[Situation]]:
        return self.batches[index]


def _unwrap(batch: list) -> tuple[int, list[Situation]]:
    return batch[0]


class SituationsDataModule(L.LightningDataModule):
    """Fixed batches over the id-sorted items; `only` (batch index -> situations) restricts the loop
    to some batches, or to some situations of a batch (resume, retry).

    Under DDP, Lightning's predict sampler deals whole batches to ranks, so several GPUs split the
    situations and each batch keeps its index (its seed).
    """

    def __init__(self, items: Sequence[Situation], batch_size: int,
                 only: Optional[dict[int, list[Situation]]] = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.items = sorted(items, key=lambda s: s.id)
        self.batch_size = batch_size
        self.only = only

    def batches(self) -> list[tuple[int, list[Situation]]]:
        """Every (batch index, situations) pair over the full ordered list."""
        size = self.batch_size
        return [(i // size, self.items[i : i + size]) for i in range(0, len(self.items), size)]

    def pending(self) -> list[tuple[int, list[Situation]]]:
        if self.only is None:
            return self.batches()
        return [(index, self.only[index]) for index, _ in self.batches() if index in self.only]

    def predict_dataloader(self) -> DataLoader:
        batches = self.pending()
        world = self.trainer.world_size if self.trainer is not None else 1
        # Lightning's predict sampler needs a batch for every rank: pad with empty ones (index -1)
        batches += [(-1, [])] * max(0, world - len(batches))
        return DataLoader(_BatchList(batches), batch_size=1, shuffle=False, collate_fn=_unwrap)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Situations, not tensors (and frozen dataclasses, which Lightning's default copy rejects):
        # the teacher moves its own inputs.
        return batch


# --------------------------------------------------------------------------- dataset cards


def write_dataset_card(
    path: str | Path,
    title: str,
    purpose: str,
    fields: dict[str, str],
    counts: dict[str, Any],
    provenance: dict[str, str],
    notes: Optional[dict[str, str]] = None,
) -> None:
    """A Markdown dataset card (purpose, fields, counts, provenance, free sections), written atomically."""
    lines = [f"# {title}", "", purpose.strip(), "", "## Fields", "", "| field | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in fields.items()]
    lines += ["", "## Counts", "", "| what | count |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _flat_counts(counts)]
    lines += ["", "## Provenance", ""]
    lines += [f"- **{name}**: {value}" for name, value in provenance.items()]
    for heading, body in (notes or {}).items():
        lines += ["", f"## {heading}", "", body.strip()]
    atomic_write_text(path, redact("\n".join(lines) + "\n"))  # cards quote config values: no credential


def _flat_counts(counts: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in counts.items():
        if isinstance(value, dict):
            yield from _flat_counts(value, f"{prefix}{key} / ")
        else:
            yield f"{prefix}{key}", value


def corpus_counts(splits: dict[str, list[Situation]]) -> dict[str, Any]:
    """Situations per split and per domain, for a dataset card."""
    domains: dict[str, dict[str, int]] = defaultdict(lambda: {name: 0 for name in SPLITS})
    for name, group in splits.items():
        for item in group:
            domains[item.domain][name] += 1
    total = {name: len(group) for name, group in splits.items()}
    return {"situations": sum(total.values()), "split": total, "domain": {d: domains[d] for d in sorted(domains)}}
