"""The `curated` teacher end to end: it replays recorded Persona-CoT output through datagen's filters,
refuses held-out test situations, and never lets a test-split reply into a training record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_datagen import POLES, read_jsonl, write_inputs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

REPLY = ("Thank you for telling me about {topic}. Here is what I would do next, step by step, and why it "
         "should help you feel more settled about it today. Voice of {pole}.")


def write_replies(folder: Path, personas: Path, situations: Path, drop: tuple[str, ...] = ()) -> Path:
    """A curated file for every toy situation (minus `drop`), each reply naming its situation and pole."""
    rows = []
    for line in situations.read_text().splitlines():
        s = json.loads(line)
        if s["id"] in drop:
            continue
        topic = s["messages"][-1]["content"]
        responses = {p[0]: REPLY.format(topic=topic, pole=p[0]) + f" ({s['id']})" for p in POLES}
        rows.append({"situation_id": s["id"], "cues": ["a cue", "another cue"], "activation": "calm and warm",
                     "responses": responses, "fused": REPLY.format(topic=topic, pole="fused") + f" ({s['id']})"})
    path = folder / "replies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def curated_experiment(folder: Path, out: Path, drop: tuple[str, ...] = (), **datagen) -> Path:
    personas, situations = write_inputs(folder / "inputs")
    replies = write_replies(folder, personas, situations, drop)
    teacher = {"kind": "curated", "replies": str(replies), "batch_size": 2, **datagen.pop("teacher", {})}
    cfg = {
        "name": "curated_test", "stages": ["datagen"], "output_dir": str(out),
        "model": {"name_or_path": "tiny-random-llama"}, "personas": {"file": str(personas)},
        "data": {"situations": str(situations), "val_fraction": 0.25, "test_fraction": 0.25},
        "datagen": {"teacher": teacher, "duplicate_threshold": 0.99, **datagen},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_datagen(config: Path, *overrides: str) -> dict:
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    return run_pipeline(load_config(config, list(overrides)))["datagen"]


def test_replays_records_through_the_filters(tmp_path):
    result = run_datagen(curated_experiment(tmp_path, tmp_path / "out"))
    records = read_jsonl(result["persona_data"])
    assert len(records) == 4 and {r["split"] for r in records} == {"train"}
    for r in records:
        assert r["teacher"].startswith("curated:replies.jsonl@") and r["tokens_generated"] == 0
        assert r["cues"] == ["a cue", "another cue"] and r["teacher_label"] == r["label"]
        assert all(e["accepted"] and e["text"].endswith(f"({r['id']})") for e in r["responses"].values())
    summary = result["summary"]
    assert summary["accepted"] == summary["responses"] == 4 * 5 and summary["skipped_no_record"] == 0
    assert len(read_jsonl(result["sft"])) == 16 and len(read_jsonl(result["joint"])) == 4
    card = (Path(result["persona_data"]).parent / "dataset_card.md").read_text()
    assert "persona_replies_card.md" in card


def test_missing_record_fails_naming_the_situation_or_is_skipped(tmp_path):
    from experiments.config import ConfigError

    personas, situations = write_inputs(tmp_path / "probe")
    from datamodules.personas import load_personas
    from datamodules.situations import load_situations, split_situations

    train = split_situations(load_situations(situations, load_personas(personas)), 0.25, 0.25, 0)["train"]
    gone = train[0].id
    config = curated_experiment(tmp_path, tmp_path / "out", drop=(gone,))
    with pytest.raises(ConfigError, match=f"no record for situation '{gone}'"):
        run_datagen(config)
    assert not (tmp_path / "out" / "datagen" / "persona_data.jsonl").exists()
    result = run_datagen(config, "datagen.teacher.on_missing=skip")
    assert result["summary"]["skipped_no_record"] == 1 and result["summary"]["items"] == 3


@pytest.mark.parametrize("split", ["test", "all"])
def test_test_split_is_refused_before_anything_runs(tmp_path, split):
    from experiments.config import ConfigError, load_config

    config = curated_experiment(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="held-out test situations"):
        load_config(config, [f"datagen.split={split}"])


def test_curated_teacher_cannot_judge(tmp_path):
    from experiments.config import ConfigError, load_config

    config = curated_experiment(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="evaluate.judge.teacher.kind"):
        load_config(config, ["evaluate.judge.teacher.kind=curated"])


def test_no_test_split_reply_reaches_a_training_record(tmp_path):
    """The shipped corpus, the quickstart's curated datagen: no held-out reply in sft.jsonl or joint.jsonl."""
    from datamodules.persona_replies import load_persona_replies
    from datamodules.personas import load_personas
    from datamodules.situations import load_situations, split_situations

    personas = load_personas(ROOT / "experiments/personas/big_five.yaml")
    corpus = load_situations(ROOT / "datamodules/data/situations.jsonl", personas)
    test_ids = {s.id for s in split_situations(corpus, 0.1, 0.2, 0)["test"]}
    replies = load_persona_replies(ROOT / "datamodules/data/persona_replies.jsonl", personas)
    held_out = {t for sid in test_ids if sid in replies for t in [*replies[sid].responses.values(), replies[sid].fused]}
    assert len(held_out) >= 11 * 84  # every test situation has its references

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_datagen(ROOT / "experiments/quickstart.yaml", "stages=[datagen]", f"output_dir={tmp_path / 'out'}",
                         f"tracking.tracking_uri={uri}", "datagen.limit=null")
    trained = [row["response"] for name in ("sft", "joint") for row in read_jsonl(result[name])]
    assert len(trained) > 2000
    assert not held_out & set(trained)
    assert not any(r["id"] in test_ids for r in read_jsonl(result["persona_data"]))
