"""A full disk mid-pipeline: a one-line error and exit 3, finished work kept whole, and the rerun
after freeing space resumes instead of starting over.

The output folder sits on a small tmpfs (a real ENOSPC) when this process may mount one (root);
otherwise the pipeline runs under RLIMIT_FSIZE, where the kernel fails writes past the limit
with EFBIG, the same path through the code.
"""
from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = 1536 * 1024  # room for datagen's outputs, not for an SFT checkpoint


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL, SMALL))


def test_disk_full_during_sft_fails_clearly_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    on_tmpfs = _mount_tmpfs(out, SMALL)
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"),
           "stages=[datagen,adapter_sft]", f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    try:
        full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              preexec_fn=None if on_tmpfs else _limit_file_size)
        assert full.returncode == 3, full.stderr[-3000:]
        assert "error: disk full" in full.stderr and "rerun the same command" in full.stderr
        assert "Traceback" not in full.stderr
        datagen = json.loads((out / "datagen" / "state.json").read_text())
        assert datagen["complete"]  # finished work is kept, whole
        for line in (out / "datagen" / "persona_data.jsonl").read_text().splitlines():
            json.loads(line)
        assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
        if on_tmpfs:  # free space
            subprocess.run(["mount", "-o", "remount,size=256m", str(out)], check=True)
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "datagen: unchanged since its last run — skipped" in again.stderr
        assert json.loads((out / "adapter_sft" / "state.json").read_text())["complete"]
    finally:
        if on_tmpfs:
            subprocess.run(["umount", str(out)], capture_output=True)
