"""The curated corpus loader: every bad record names file:line and key; the shipped file is complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.io import DataError
from datamodules.persona_replies import load_persona_replies, training_records
from datamodules.personas import load_personas

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def personas():
    return load_personas(ROOT / "experiments/personas/big_five.yaml")


def record(sid="grief-001", drop=None, **changes):
    rec = {"situation_id": sid, "cues": ["a cue"], "activation": "warmth",
           "responses": {p: f"reply {p}" for p in ("openness_high", "openness_low", "conscientiousness_high",
                         "conscientiousness_low", "extraversion_high", "extraversion_low", "agreeableness_high",
                         "agreeableness_low", "neuroticism_high", "neuroticism_low")}, "fused": "fused reply"}
    rec.update(changes)
    if drop:
        del rec["responses"][drop]
    return rec


def write(tmp_path, *records) -> Path:
    path = tmp_path / "replies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("bad, message", [
    (record(drop="neuroticism_low"), "replies.jsonl:2: key 'responses' is missing pole\\(s\\) neuroticism_low"),
    (record(fused="  "), "replies.jsonl:2: key 'fused' must be a non-empty string"),
    (record(sid="grief-001"), "replies.jsonl:2: situation 'grief-001' appears twice"),
    (record(sid="nowhere-001"), "replies.jsonl:2: situation 'nowhere-001' is not in the situations corpus"),
    (record(schema_version=2), "replies.jsonl:2: schema_version 2 is not 1"),
])
def test_bad_records_name_file_line_and_key(tmp_path, personas, bad, message):
    path = write(tmp_path, record(), bad)
    with pytest.raises(DataError, match=message):
        load_persona_replies(path, personas, known_ids={"grief-001", "grief-002"})
    kept = load_persona_replies(path, personas, "skip", known_ids={"grief-001", "grief-002"})
    assert list(kept) == ["grief-001"]


def test_training_records_refuse_test_situations(personas, tmp_path):
    replies = load_persona_replies(write(tmp_path, record(), record("grief-002")), personas)
    assert [r.situation_id for r in training_records(replies, {"grief-001": "train"}, ["grief-001"])] == ["grief-001"]
    with pytest.raises(DataError, match="for evaluation only"):
        training_records(replies, {"grief-001": "train", "grief-002": "test"}, ["grief-001", "grief-002"])


def test_shipped_corpus_covers_every_situation(personas):
    ids = {json.loads(line)["id"] for line in (ROOT / "datamodules/data/situations.jsonl").open()}
    replies = load_persona_replies(ROOT / "datamodules/data/persona_replies.jsonl", personas, known_ids=ids)
    assert set(replies) == ids
