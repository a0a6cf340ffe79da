"""Ranks other than 0 wait for rank 0 as long as it is alive, and stop in one line once it is not.

Rank 0 touches its output-folder lock every few seconds (PERSONAFUSE_RANK_WAIT_S / 4, at most 10 s);
a follower that sees no touch for PERSONAFUSE_RANK_WAIT_S seconds stops naming the stage and the
state file it waited for, instead of polling forever. The followers here are the real CLI with
RANK=1; rank 0 is either absent or a process holding the real pipeline lock, killed with -9.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 2


def follower(out: Path, tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"), "stages=[router]",
           f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "RANK": "1", "PERSONAFUSE_RANK_WAIT_S": str(WAIT_S)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_gave_up(proc: subprocess.Popen, out: Path) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    assert f"rank 1: stage 'router': gave up waiting for {out / 'router' / 'state.json'}" in err
    assert f"no sign of life for {WAIT_S} s" in err and "Traceback" not in err


def test_a_follower_whose_rank_0_never_started_stops_in_one_line(tmp_path):
    out = tmp_path / "out"
    started = time.time()
    assert_gave_up(follower(out, tmp_path), out)
    assert time.time() - started < 60


def test_a_follower_waits_while_rank_0_lives_and_stops_once_it_is_killed(tmp_path):
    out = tmp_path / "out"
    hold = ("import sys, time; from pathlib import Path; from experiments.pipeline import _pipeline_lock; "
            "lock = _pipeline_lock(Path(sys.argv[1])); lock.__enter__(); print('locked', flush=True); time.sleep(600)")
    rank0 = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PERSONAFUSE_RANK_WAIT_S": str(WAIT_S)})
    rank1 = None
    try:
        assert rank0.stdout.readline().strip() == "locked"
        rank1 = follower(out, tmp_path)
        time.sleep(15)  # startup plus several WAIT_S: a live (if silent) rank 0 is waited for
        assert rank1.poll() is None, rank1.communicate()[1][-2000:]
        os.kill(rank0.pid, signal.SIGKILL)
        rank0.wait()
        killed = time.time()
        assert_gave_up(rank1, out)
        assert time.time() - killed < 30
    finally:
        for proc in (rank0, rank1):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
