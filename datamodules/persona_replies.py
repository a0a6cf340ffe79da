"""The curated Persona-CoT corpus: per situation, its cues, ten pole replies and a fused reply.

`datamodules/data/persona_replies.jsonl` holds, for situations of the curated corpus, what a strong
teacher running Persona-CoT would write (how it was written: `persona_replies_card.md`). The
`curated` teacher replays it through the datagen stage; the `persona_expression` benchmark uses the
test split's replies as references. Test-split replies are for evaluation only: `training_records`
is the one door to training and it refuses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datamodules.io import DataError, parse_jsonl
from datamodules.personas import PersonaSet

SCHEMA_VERSION = 1
SCHEMA_KEYS = ("situation_id", "cues", "activation", "responses", "fused")


@dataclass(frozen=True)
class CuratedReplies:
    """One situation's curated Persona-CoT output."""

    situation_id: str
    cues: tuple[str, ...]
    activation: str
    """One sentence: which poles the cues activate and why (consistent with the curated label)."""
    responses: dict[str, str]
    """Pole id -> the reply in that pole's voice."""
    fused: str
    """The reply that expresses the situation's activated poles."""


def load_persona_replies(
    path: str | Path, personas: PersonaSet, on_bad_line: str = "fail", known_ids: Optional[set[str]] = None
) -> dict[str, CuratedReplies]:
    """Situation id -> its curated replies; a bad line is reported as file:line (or skipped and counted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: curated persona replies not found")
    seen: set[str] = set()

    def parse(record: dict, where: str, lineno: int) -> CuratedReplies:
        item = parse_replies(record, personas, where)
        if item.situation_id in seen:
            raise DataError(f"{where}: situation '{item.situation_id}' appears twice")
        if known_ids is not None and item.situation_id not in known_ids:
            raise DataError(f"{where}: situation '{item.situation_id}' is not in the situations corpus")
        seen.add(item.situation_id)
        return item

    return {item.situation_id: item for item in parse_jsonl(path, parse, on_bad_line, "curated record")}


def parse_replies(record: dict, personas: PersonaSet, where: str) -> CuratedReplies:
    """Validate one record: every key, every pole of the persona set, non-empty strings."""
    if record.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise DataError(f"{where}: schema_version {record['schema_version']!r} is not {SCHEMA_VERSION}")
    missing = [k for k in SCHEMA_KEYS if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    sid = _text(record["situation_id"], where, "situation_id")
    cues = record["cues"]
    if not isinstance(cues, list) or not cues:
        raise DataError(f"{where}: key 'cues' must be a non-empty list of strings")
    responses = record["responses"]
    if not isinstance(responses, dict):
        raise DataError(f"{where}: key 'responses' must map pole ids to replies")
    absent = [p for p in personas.ids if p not in responses]
    if absent:
        raise DataError(f"{where}: key 'responses' is missing pole(s) {', '.join(absent)}")
    return CuratedReplies(
        situation_id=sid,
        cues=tuple(_text(c, where, "cues[]") for c in cues),
        activation=_text(record["activation"], where, "activation"),
        responses={p: _text(responses[p], where, f"responses.{p}") for p in personas.ids},
        fused=_text(record["fused"], where, "fused"),
    )


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: key '{key}' must be a non-empty string")
    return value.strip()


def refuse_held_out(split_of: dict[str, str], situation_ids: list[str]) -> None:
    """Fail when any of `situation_ids` is a test-split situation: its replies are for evaluation only."""
    held_out = [sid for sid in situation_ids if split_of.get(sid) == "test"]
    if held_out:
        raise DataError(
            f"curated replies of test-split situations are for evaluation only, never for training "
            f"({len(held_out)} asked for, e.g. {held_out[0]}); use datagen.split=train or val"
        )


def training_records(
    replies: dict[str, CuratedReplies], split_of: dict[str, str], situation_ids: list[str]
) -> list[CuratedReplies]:
    """The curated records of `situation_ids`, refusing any test-split situation (held out for evaluation)."""
    refuse_held_out(split_of, situation_ids)
    return [replies[sid] for sid in situation_ids if sid in replies]
