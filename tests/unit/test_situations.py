"""The situations corpus: loading, validation errors (file:line + key), the stratified split, the predict batches."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from datamodules.io import DataError
from datamodules.personas import PersonaSet, Pole, load_personas
from datamodules.situations import (
    SituationsDataModule,
    corpus_counts,
    load_situations,
    select_items,
    split_situations,
    write_dataset_card,
)

ROOT = Path(__file__).resolve().parents[2]
POLES = ("warm", "cold", "bold", "shy")


@pytest.fixture()
def personas() -> PersonaSet:
    return PersonaSet("toy", tuple(Pole(p, p, "high", f"{p} pole", (), f"You are {p}.") for p in POLES))


def record(i: int, domain: str = "grief", **changes) -> dict:
    rec = {
        "id": f"{domain}-{i:03d}",
        "domain": domain,
        "messages": [{"role": "user", "content": f"message {i}"}],
        "label": {p: 0.1 * (k + 1) for k, p in enumerate(POLES)},
        "rationale": "cues",
    }
    rec.update(changes)
    return rec


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def corpus(n_per_domain: dict[str, int]) -> list[dict]:
    return [record(i, d) for d, n in n_per_domain.items() for i in range(n)]


def test_load_valid_corpus_keeps_pole_order_and_ignores_extra_label_keys(tmp_path, personas):
    extra = record(1, label={**record(1)["label"], "not_a_pole": 0.4})
    items = load_situations(write(tmp_path / "s.jsonl", [record(0), extra]), personas)
    assert [s.id for s in items] == ["grief-000", "grief-001"]
    assert list(items[1].label) == list(POLES)
    assert items[0].user_text == "message 0"


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"id": ""}, "'id'"),
        ({"id": "a/b"}, "'id'"),
        ({"domain": None}, "'domain'"),
        ({"messages": []}, "'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"label": {"warm": 0.5}}, "'cold'"),
        ({"label": {"warm": 1.5, "cold": 0, "bold": 0, "shy": 0}}, "'warm'"),
        ({"label": {"warm": "high", "cold": 0, "bold": 0, "shy": 0}}, "'label'"),
        ({"label": [0.1]}, "'label'"),
    ],
)
def test_invalid_record_names_file_line_and_key(tmp_path, personas, bad, key):
    path = write(tmp_path / "s.jsonl", [record(0), record(1, **bad)])
    with pytest.raises(DataError) as err:
        load_situations(path, personas)
    assert f"{path}:2" in str(err.value) and key in str(err.value)


def test_duplicate_id_names_both_lines(tmp_path, personas):
    path = write(tmp_path / "s.jsonl", [record(0), record(1), record(0)])
    with pytest.raises(DataError, match=r"s\.jsonl:3: key 'id': duplicate id 'grief-000' \(first at line 1\)"):
        load_situations(path, personas)


def test_malformed_json_line_fails_or_is_skipped_with_count(tmp_path, personas, capsys):
    path = write(tmp_path / "s.jsonl", [record(0), "{not json", record(1, domain=""), record(2)])
    with pytest.raises(DataError, match=r"s\.jsonl:2"):
        load_situations(path, personas)
    items = load_situations(path, personas, on_bad_line="skip")
    assert [s.id for s in items] == ["grief-000", "grief-002"]
    err = capsys.readouterr().err
    assert "skipped 1 malformed" in err and "skipped 1 invalid" in err


def test_split_is_stratified_deterministic_and_independent_of_file_order(tmp_path, personas):
    records = corpus({"grief": 10, "work": 20, "chat": 3, "solo": 1})
    items = load_situations(write(tmp_path / "a.jsonl", records), personas)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    again = load_situations(write(tmp_path / "b.jsonl", shuffled), personas)
    split = split_situations(items, 0.1, 0.2, seed=0)
    assert split == split_situations(again, 0.1, 0.2, seed=0)
    counts = corpus_counts(split)["domain"]
    assert counts["grief"] == {"train": 7, "val": 1, "test": 2}
    assert counts["work"] == {"train": 14, "val": 2, "test": 4}
    assert counts["chat"] == {"train": 2, "val": 0, "test": 1}
    assert counts["solo"] == {"train": 1, "val": 0, "test": 0}
    assert all(group == sorted(group, key=lambda s: s.id) for group in split.values())
    other_seed = split_situations(items, 0.1, 0.2, seed=1)
    assert {s.id for s in other_seed["test"]} != {s.id for s in split["test"]}


def test_split_rejects_fractions_that_leave_no_training_data(personas):
    with pytest.raises(DataError, match="val_fraction"):
        split_situations([], 0.5, 0.5, seed=0)


def test_select_items_spreads_over_domains_deterministically(tmp_path, personas):
    items = load_situations(write(tmp_path / "s.jsonl", corpus({"a": 5, "b": 5, "c": 5})), personas)
    chosen = select_items(items, 3, seed=0)
    assert sorted(s.domain for s in chosen) == ["a", "b", "c"]
    assert chosen == select_items(list(reversed(items)), 3, seed=0)
    assert len(select_items(items, None, seed=0)) == 15


def test_datamodule_batches_are_fixed_and_resume_only_pending(tmp_path, personas):
    items = load_situations(write(tmp_path / "s.jsonl", corpus({"a": 5})), personas)
    dm = SituationsDataModule(list(reversed(items)), batch_size=2)
    assert [(i, [s.id for s in b]) for i, b in dm.batches()] == [
        (0, ["a-000", "a-001"]), (1, ["a-002", "a-003"]), (2, ["a-004"])
    ]
    batches = dict(dm.batches())
    dm.only = {2: batches[2], 0: batches[0][1:]}  # batch index -> what is left to generate in it
    assert [(batch[0], [s.id for s in batch[1]]) for batch in dm.predict_dataloader()] == [(0, ["a-001"]), (2, ["a-004"])]


def test_dataset_card_is_written(tmp_path):
    path = tmp_path / "card.md"
    write_dataset_card(path, "T", "Why.", {"id": "the id"}, {"split": {"train": 3}}, {"source": "here"}, {"Limits": "few"})
    text = path.read_text()
    assert "# T" in text and "| `id` | the id |" in text and "| split / train | 3 |" in text and "## Limits" in text


REAL_PARTS = sorted((ROOT / "datamodules" / "data").glob("situations*.jsonl"))
REAL_PERSONAS = ROOT / "experiments" / "personas" / "big_five.yaml"


@pytest.mark.skipif(not (REAL_PARTS and REAL_PERSONAS.is_file()), reason="corpus or persona set not present yet")
@pytest.mark.parametrize("path", REAL_PARTS, ids=[p.name for p in REAL_PARTS])
def test_real_corpus_parts_load_and_split(path):
    personas = load_personas(REAL_PERSONAS)
    items = load_situations(path, personas)
    assert items and all(len(s.label) == len(personas.ids) for s in items)
    split = split_situations(items, 0.1, 0.2, seed=0)
    assert sum(map(len, split.values())) == len(items)
    sizes = corpus_counts(split)["domain"]
    assert all(c["test"] >= 1 for c in sizes.values() if sum(c.values()) >= 3)


def test_second_annotator_file_covers_exactly_the_default_test_split():
    """The blind relabelling (dataset card, 'Agreement between annotators') stays in step with the split."""
    personas = load_personas(ROOT / "experiments/personas/big_five.yaml")
    items = load_situations(ROOT / "datamodules/data/situations.jsonl", personas)
    test_ids = [s.id for s in split_situations(items, 0.1, 0.2, seed=0)["test"]]
    rows = [json.loads(line) for line in (ROOT / "datamodules/data/test_labels_second_annotator.jsonl").open()]
    assert sorted(r["id"] for r in rows) == sorted(test_ids)
    for row in rows:
        assert len(personas.label_vector(row["label"], row["id"])) == len(personas.ids)
