"""Stage `datagen` end to end on the tiny random Llama: files, counts, MLflow, and resume after kill -9.

The tiny model writes random tokens, so every analysis fails to parse: the point is that each
rejection is counted and nothing crashes, and that a killed run resumes to byte-identical data.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLES = [
    ("agreeableness_high", "agreeableness", "high", "Warm and kind.", "You are a warm, kind assistant."),
    ("agreeableness_low", "agreeableness", "low", "Blunt and sceptical.", "You are a blunt, sceptical assistant."),
    ("neuroticism_high", "neuroticism", "high", "Anxious and vigilant.", "You are an anxious, vigilant assistant."),
    ("neuroticism_low", "neuroticism", "low", "Calm and steady.", "You are a calm, steady assistant."),
]
MESSAGES = {
    "grief": ["My cat died today.", "I lost my grandmother last week and feel numb.", "It's a year since my dad died.",
              "My best friend's funeral is tomorrow."],
    "technical_help": ["My Python script says KeyError: 'name'.", "How do I undo my last git commit?",
                       "Docker build fails with no space left on device.", "Why is my SQL query so slow?"],
}


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A 4-pole persona set and 8 situations (2 domains x 4) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    poles = [dict(id=i, trait=t, pole=p, description=d, markers=[d], system_prompt=s) for i, t, p, d, s in POLES]
    personas = folder / "personas.yaml"
    personas.write_text(yaml.safe_dump({"name": "toy", "poles": poles}))
    lines = []
    for domain, texts in MESSAGES.items():
        for i, text in enumerate(texts):
            label = {pid: round(0.2 + 0.2 * ((i + k) % 4), 2) for k, (pid, *_rest) in enumerate(POLES)}
            lines.append({"id": f"{domain}-{i:03d}", "domain": domain, "label": label, "rationale": "test",
                          "messages": [{"role": "user", "content": text}]})
    situations = folder / "situations.jsonl"
    situations.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return personas, situations


def write_experiment(folder: Path, inputs: Path, out: Path, store: Path | None = None, **datagen) -> Path:
    """An experiment YAML in `folder`; `store` shares an existing MLflow database (creating one costs seconds)."""
    personas, situations = write_inputs(inputs)
    teacher = {"max_new_tokens": 8, "batch_size": 1, "temperature": 0.7, **datagen.pop("teacher", {})}
    cfg = {
        "name": "datagen_test",
        "stages": ["datagen"],
        "output_dir": str(out),
        "model": {"name_or_path": "tiny-random-llama"},
        "personas": {"file": str(personas)},
        "data": {"situations": str(situations), "val_fraction": 0.25, "test_fraction": 0.25},
        # a random model writes no acceptable reply: these tests check the plumbing, not the data
        "datagen": {"analysis_max_new_tokens": 16, "parse_retries": 1, "teacher": teacher, "min_accepted_fraction": 0.0,
                    **datagen},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "tracking": {"tracking_uri": f"sqlite:///{store or folder / 'mlflow.db'}"},
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_in_process(config: Path) -> dict:
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    return run_pipeline(load_config(config))["datagen"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_path):
    """One uninterrupted run, shared by the checks below and the kill -9 comparison."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_experiment(folder, folder / "inputs", folder / "out")
    return folder, run_in_process(config)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_outputs_records_and_counts(reference):
    folder, result = reference
    records = read_jsonl(result["persona_data"])
    assert [r["id"] for r in records] == sorted(r["id"] for r in records) and len(records) == 4
    assert {r["split"] for r in records} == {"train"}
    for r in records:
        assert r["schema_version"] == 1 and r["teacher"] == "local:tiny-random-llama" and len(r["config_hash"]) == 16
        assert r["teacher_label"] is None and r["teacher_label_error"].startswith("unparseable")
        assert r["analysis_attempts"] == 2  # one parse retry
        assert list(r["responses"]) == [p[0] for p in POLES]
        for entry in [*r["responses"].values(), r["fused"]]:
            assert entry["accepted"] == (not entry["flags"])
    summary = result["summary"]
    assert summary["rejected"]["unparseable"] == 4
    rejected_responses = sum(not e["accepted"] for r in records for e in [*r["responses"].values(), r["fused"]])
    assert summary["accepted"] + rejected_responses == summary["responses"] == 4 * 5
    assert summary["tokens_generated"] > 0 and summary["this_run"]["tokens_per_s"] > 0
    router = read_jsonl(result["router"])
    assert len(router) == 8 and {r["split"] for r in router} == {"train", "val", "test"}
    assert len(read_jsonl(result["sft"])) == sum(e["accepted"] for r in records for e in r["responses"].values())
    assert len(read_jsonl(result["joint"])) == sum(r["fused"]["accepted"] for r in records)
    assert json.loads((Path(result["persona_data"]).parent / "summary.json").read_text())["items"] == 4
    assert "Quality filters" in (Path(result["persona_data"]).parent / "dataset_card.md").read_text()


def test_mlflow_run_has_metrics_tags_and_artifacts(reference):
    import mlflow

    folder, result = reference
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    state = json.loads((Path(result["persona_data"]).parent / "state.json").read_text())
    run = client.get_run(state["run_id"])
    assert run.data.tags["stage"] == "datagen" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("datagen/acceptance_rate", "datagen/rejected/unparseable", "datagen/rejected/incoherent",
                "datagen/tokens_per_s", "datagen/tokens_generated"):
        assert key in metrics, key
    assert metrics["datagen/rejected/unparseable"] == 4
    digest = hashlib.sha256(Path(result["persona_data"]).read_bytes()).hexdigest()
    assert run.data.tags["dataset_hash"] == digest
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "datagen")}
    assert {"datagen/persona_data.jsonl", "datagen/sft.jsonl", "datagen/router.jsonl", "datagen/joint.jsonl",
            "datagen/dataset_card.md", "datagen/summary.json"} <= logged


def test_local_teacher_is_deterministic_and_left_padded(tiny_model):
    from lightning_modules.components.teachers import LocalTeacher

    model, tok = tiny_model
    teacher = LocalTeacher(model, tok, "tiny", batch_size=2)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer opening message here"}]]
    first = teacher.generate(convs, 6, temperature=0.9, seed=3)
    assert teacher.tokenizer.padding_side == "left"
    assert first == teacher.generate(convs, 6, temperature=0.9, seed=3)
    assert first != teacher.generate(convs, 6, temperature=0.9, seed=4)
    assert all(0 < g.tokens <= 6 for g in first)


def test_changed_config_regenerates_stale_items(reference, tmp_path):
    """An item cached by another config is not reused (its config_hash differs)."""
    from datamodules.io import read_json

    folder, result = reference
    items = Path(result["persona_data"]).parent / "items"
    old = {p.name: read_json(p)["config_hash"] for p in items.glob("*.json")}
    config = write_experiment(tmp_path, folder / "inputs", tmp_path / "out", folder / "mlflow.db", min_words=5, limit=1)
    new_items = tmp_path / "out" / "datagen" / "items"
    new_items.mkdir(parents=True)
    for name in old:  # plant the reference items: same ids, other config
        (new_items / name).write_bytes((items / name).read_bytes())
    fresh = run_in_process(config)
    (record,) = read_jsonl(fresh["persona_data"])
    assert f"{record['id']}.json" in old and record["config_hash"] not in old.values()
    assert fresh["summary"]["this_run"]["items_written"] == 1


def test_kill_9_then_resume_is_byte_identical(reference, tmp_path):
    folder, result = reference
    out = tmp_path / "out"
    config = write_experiment(tmp_path, folder / "inputs", out, folder / "mlflow.db")
    items = out / "datagen" / "items"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "run", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(items.glob("*.json")):
        time.sleep(0.01)
    assert proc.poll() is None, f"datagen ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in items.glob("*.json"))
    assert 1 <= len(done) < 4, done
    before = {name: (items / name).stat().st_mtime_ns for name in done}
    resumed = run_in_process(config)
    assert {name: (items / name).stat().st_mtime_ns for name in done} == before  # finished items not rewritten
    assert Path(resumed["persona_data"]).read_bytes() == Path(result["persona_data"]).read_bytes()
    assert resumed["summary"]["this_run"]["items_written"] == 4 - len(done)


def test_too_few_accepted_replies_fail_the_stage_and_a_lower_minimum_reuses_the_items(reference, tmp_path):
    """Some of the random model's replies fail the filters: asking for all of them to pass, datagen fails
    (state incomplete, run FAILED) naming the reasons; rerun with the minimum lowered, it finishes the
    same run from the cached items (a threshold is not part of the stage's hash)."""
    import mlflow

    from datamodules.io import StageFailed

    folder, _ = reference
    out = tmp_path / "out"
    config = write_experiment(tmp_path, folder / "inputs", out, folder / "mlflow.db", limit=1, min_accepted_fraction=1.0)
    with pytest.raises(StageFailed, match=r"only \d of 5 replies passed the quality filters \(.*=1.0; rejected: \w+ 1"):
        run_in_process(config)
    state = json.loads((out / "datagen" / "state.json").read_text())
    assert not state["complete"] and (out / "datagen" / "summary.json").exists()
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "FAILED"
    config = write_experiment(tmp_path, folder / "inputs", out, folder / "mlflow.db", limit=1, min_accepted_fraction=0.0)
    result = run_in_process(config)
    assert result["summary"]["this_run"]["items_written"] == 0
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
