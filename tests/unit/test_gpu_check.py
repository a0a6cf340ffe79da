"""scripts/gpu_check.sh without a GPU: --dry-run lists steps and carries; the throughput step's own
code runs at a tiny shape on CPU and its result renders as table rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_dry_run_lists_every_step_its_limit_and_the_carry(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in gpu_check.steps(tmp_path):
        assert f"{step.name} (limit {step.limit_s} s)" in proc.stdout
    assert "pytest -m gpu tests/gpu" in proc.stdout and "gpu_throughput.py --shape llama8b" in proc.stdout
    assert 'carry=["build/gpu_check"]' in proc.stdout
    assert gpu_check.BUDGET_S <= 9 * 60 and sum(s.limit_s for s in gpu_check.steps(tmp_path)) + 30 <= gpu_check.BUDGET_S  # 30 s to install
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_throughput_step_measures_and_renders_on_a_tiny_shape(tmp_path):
    out = tmp_path / "throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--shape", "tiny", "--device", "cpu", "--dtype",
                           "float32", "--repeats", "2", "--tokens-b1", "4", "--tokens-b8", "2", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 8]
    for row in result["rows"]:
        assert row["base_tok_s"] > 0 and row["personafuse_tok_s"] > 0
        assert row["ratio_range"][0] <= row["ratio"] <= row["ratio_range"][1]
    rows = gpu_check.detail_rows("throughput 8B bf16", tmp_path)
    assert [r[0] for r in rows] == ["  batch 1", "  batch 8"] and "routed ÷ base" in rows[0][3]
    assert "| check | result | seconds | detail |" in gpu_check.render(rows)


def test_the_8b_shape_refuses_a_cpu():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--shape", "llama8b", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr
