"""Pipeline bookkeeping: the output-folder lock, rank detection, atomic writes."""
from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.io import ExclusiveLock, atomic_write_text, read_jsonl, DataError
from experiments.config import load_config
from experiments.pipeline import PipelineLocked, global_rank, run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_second_pipeline_on_same_folder_fails_clearly(tmp_path):
    cfg = load_config(ROOT / "experiments/smoke.yaml", [f"output_dir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/db"])
    with ExclusiveLock(tmp_path / ".lock", PipelineLocked, "held by the first pipeline"):
        with pytest.raises(PipelineLocked, match="another pipeline is running on"):
            run_pipeline(cfg)
    assert not (tmp_path / "db").exists()  # nothing was logged


def test_global_rank_reads_launcher_variables(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert global_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert global_rank() == 0


def test_atomic_write_replaces_whole_file_and_keeps_mode(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and not list(tmp_path.glob(".a.txt.*"))
    assert path.stat().st_mode & 0o044  # readable by group/others under the usual umask, unlike mkstemp's 0600


def test_bad_jsonl_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSONL line"):
        read_jsonl(path)
    assert read_jsonl(path, on_bad_line="skip") == [{"a": 1}, {"a": 3}]
