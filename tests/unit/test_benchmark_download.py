"""download_benchmarks against a real local HTTP server laid out like the upstream repositories."""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from datamodules.benchmarks import MPI
from datamodules.benchmarks.download import (
    SOURCES,
    ChecksumError,
    download_benchmarks,
    read_manifest,
    sha256_of,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks not present")
FILES = ["mpi/mpi_120.csv", "mpi/LICENSE", "emobench/EA.jsonl", "mmlu/dev/anatomy_dev.csv", "xstest/xstest_prompts.csv"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/upstream as http://127.0.0.1:<port>/<repo>/<commit>/<path>; yields (root, template)."""
    root = tmp_path / "upstream"
    for relative in FILES:
        source = SOURCES[relative]
        target = root / source.repo / source.commit / source.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / relative, target)
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/{{repo}}/{{commit}}/{{path}}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_sources_match_manifest_and_readme_table():
    shared = read_manifest((SHARED / "MANIFEST.sha256").read_text())
    assert read_manifest() == shared and set(SOURCES) == set(shared)
    assert SOURCES["gsm8k/test.jsonl"].repo == "openai/grade-school-math"
    assert SOURCES["gsm8k/test.jsonl"].commit == "3101c7d5"
    assert SOURCES["gsm8k/test.jsonl"].path == "grade_school_math/data/test.jsonl"
    assert SOURCES["eq_bench/eq_bench_v2_questions_171.json"].path == "data/eq_bench_v2_questions_171.json"
    assert SOURCES["mpi/mpi_120.csv"].path == "inventories/mpi_120.csv"
    assert SOURCES["mmlu/test/virology_test.csv"].repo == "stanford-cs336/spring2024-assignment5-alignment"
    assert SOURCES["mmlu/test/virology_test.csv"].commit == "fcbfe2b3"
    assert SOURCES["mmlu/test/virology_test.csv"].path == "data/mmlu/test/virology_test.csv"
    assert SOURCES["xstest/xstest_prompts.csv"].commit == "d7bb5bd7"


def test_download_verifies_and_skips(server, tmp_path):
    _, template = server
    dest = tmp_path / "data"
    written = download_benchmarks(dest, base_url_template=template, files=FILES)
    assert sorted(written) == sorted(dest / f for f in FILES)
    for relative in FILES:
        assert (dest / relative).read_bytes() == (SHARED / relative).read_bytes()
        assert sha256_of(dest / relative) == SOURCES[relative].sha256
    assert download_benchmarks(dest, base_url_template=template, files=FILES) == []   # verified: skipped
    assert len(MPI(data_root=dest).load_items()) == 120                                 # usable as a data root
    assert not list(dest.rglob("*.part"))


def test_corrupted_upstream_file_raises_and_leaves_nothing(server, tmp_path):
    root, template = server
    source = SOURCES["mpi/mpi_120.csv"]
    served = root / source.repo / source.commit / source.path
    served.write_bytes(served.read_bytes() + b"tampered\n")
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match=r"mpi/mpi_120\.csv"):
        download_benchmarks(dest, base_url_template=template, files=["mpi/mpi_120.csv"])
    assert not (dest / "mpi" / "mpi_120.csv").exists()
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_stale_local_file_is_replaced(server, tmp_path):
    _, template = server
    dest = tmp_path / "data"
    (dest / "mpi").mkdir(parents=True)
    (dest / "mpi" / "mpi_120.csv").write_text("stale")
    assert download_benchmarks(dest, base_url_template=template, files=["mpi/mpi_120.csv"]) == [dest / "mpi/mpi_120.csv"]
    assert sha256_of(dest / "mpi" / "mpi_120.csv") == SOURCES["mpi/mpi_120.csv"].sha256


def test_missing_upstream_file_errors_unless_optional(server, tmp_path):
    _, template = server
    with pytest.raises(RuntimeError, match=r"gsm8k/test\.jsonl.*404"):
        download_benchmarks(tmp_path / "data", base_url_template=template, files=["gsm8k/test.jsonl"])
    with pytest.warns(UserWarning, match="xstest/LICENSE"):
        assert download_benchmarks(tmp_path / "data", base_url_template=template, files=["xstest/LICENSE"]) == []
    with pytest.raises(KeyError):
        download_benchmarks(tmp_path / "data", base_url_template=template, files=["not/a/file.csv"])
