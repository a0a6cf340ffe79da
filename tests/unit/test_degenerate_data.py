"""Degenerate input data fails early in one line naming the file (and the stage), not deep in a stage:
bytes that are not UTF-8, an empty situations file, a split or a training set with nothing in it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.io import DataError, read_jsonl
from datamodules.personas import load_personas
from datamodules.situations import load_situations, require_split, split_situations

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "datamodules" / "data" / "situations.jsonl"
BIG_FIVE = ROOT / "experiments" / "personas" / "big_five.yaml"


def corpus_lines(n: int) -> list[bytes]:
    return CORPUS.read_bytes().splitlines(keepends=True)[:n]


def test_invalid_utf8_names_file_and_line_or_is_skipped_and_counted(tmp_path, capsys):
    lines = corpus_lines(3)
    lines[1] = lines[1].replace(b'"content": "', b'"content": "caf\xe9 ', 1)  # a Latin-1 byte inside the text
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    personas = load_personas(BIG_FIVE)
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        load_situations(path, personas)
    kept = load_situations(path, personas, on_bad_line="skip")
    assert [s.id for s in kept] == [json.loads(lines[i])["id"] for i in (0, 2)]
    assert "skipped 1 malformed line(s)" in capsys.readouterr().err


def test_invalid_utf8_in_any_jsonl_reader_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 11\)"):
        read_jsonl(path)
    assert read_jsonl(path, on_bad_line="skip") == [{"a": 1}]


@pytest.mark.parametrize("content, on_bad_line, why", [
    (b"", "fail", "the file is empty"),
    (b"\n  \n", "fail", "the file is empty"),
    (b"not json\n{\"id\": 1}\n", "skip", "every line was invalid and skipped"),
])
def test_a_situations_file_with_nothing_in_it_fails_naming_it(tmp_path, content, on_bad_line, why):
    path = tmp_path / "situations.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"situations.jsonl: no situations: {why}"):
        load_situations(path, load_personas(BIG_FIVE), on_bad_line)


def test_an_empty_split_names_the_stage_the_split_and_the_file(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_bytes(corpus_lines(1)[0])
    splits = split_situations(load_situations(path, load_personas(BIG_FIVE)), 0.1, 0.2, 0)
    assert len(require_split(splits, "train", "router", path)) == 1
    with pytest.raises(DataError, match=r"router: the 'test' split of .*one\.jsonl is empty \(train 1, val 0, test 0\)"):
        require_split(splits, "test", "router", path)


def test_adapter_sft_with_no_examples_names_the_stage_and_the_empty_file(tmp_path):
    from experiments.config import load_config
    from experiments.pipeline import StageContext
    from lightning_modules.adapter_sft import sft_records

    empty = tmp_path / "sft.jsonl"
    empty.write_text("")
    cfg = load_config(ROOT / "experiments/smoke.yaml", ["adapter_sft.include_persona_examples=false"])
    ctx = StageContext(cfg, "adapter_sft", tmp_path, tmp_path, "", "", "", {"datagen": {"sft": str(empty)}})
    with pytest.raises(DataError, match=r"adapter_sft: no training examples: .*sft\.jsonl holds no pole responses"):
        sft_records(ctx, load_personas(BIG_FIVE))


@pytest.mark.parametrize("content, stages, message", [
    (b"", "[datagen,router]", "situations.jsonl: no situations: the file is empty"),
    (None, "[router]", "router: the 'test' split of"),
])
def test_cli_stops_at_the_first_stage_that_reads_degenerate_data(tmp_path, content, stages, message):
    """One line, exit 2, no traceback, and no later stage started (the router used to end in torch.cat([]))."""
    path = tmp_path / "situations.jsonl"
    path.write_bytes(corpus_lines(1)[0] if content is None else content)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"), f"stages={stages}",
           f"data.situations={path}", f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (out / "router" / "router").exists()
