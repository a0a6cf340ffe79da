"""The local launcher tells a trial process that still runs from one that is gone (or whose pid was reused),
using real processes: what a sweep relaunch after `kill -9` of the sweep process relies on."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.sweep import load_sweep
from experiments.sweep.launchers import LocalLauncher, process_started

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def launcher(tmp_path) -> LocalLauncher:
    path = tmp_path / "s.yaml"
    path.write_text(f"base: experiments/smoke.yaml\nparameters: {{router.hidden: [16]}}\n"
                    f"objective: {{metric: router/val_f1_micro}}\noutput_dir: {tmp_path / 'out'}\n")
    return LocalLauncher(load_sweep(path))


@pytest.fixture()
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def record_of(proc: subprocess.Popen, **changes) -> dict:
    record = {"pid": proc.pid, "host": socket.gethostname(), "pid_started": process_started(proc.pid), "output_dir": "t"}
    record.update(changes)
    return record


def test_a_live_trial_process_is_followed_until_it_exits(launcher, sleeper):
    handle = launcher.reattach(record_of(sleeper))
    assert handle is not None and not handle.done() and str(sleeper.pid) in handle.describe()
    sleeper.kill()
    sleeper.wait()
    assert handle.done() and handle.outcome() is None  # not our child: the sweep reruns it to learn the result


def test_a_zombie_counts_as_ended(launcher, sleeper):
    handle = launcher.reattach(record_of(sleeper))
    sleeper.kill()  # not reaped (no wait): a zombie, like a trial whose parent, the killed sweep, never waited for it
    deadline = time.monotonic() + 10
    while not handle.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.done()


@pytest.mark.parametrize("changes", [{"pid_started": 1.0}, {"host": "another-node"}, {"pid": None}])
def test_a_reused_pid_another_host_or_no_pid_is_not_followed(launcher, sleeper, changes):
    assert launcher.reattach(record_of(sleeper, **changes)) is None


def test_terminate_stops_a_process_that_is_not_a_child(launcher, tmp_path):
    """Ctrl-C of the relaunch stops the trial it follows, as it stops the trials it started."""
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid))")
    subprocess.run([sys.executable, "-c", code], check=True)  # its parent exits: the sleeper is orphaned
    pid = int(pid_file.read_text())
    handle = launcher.reattach({"pid": pid, "host": socket.gethostname(), "pid_started": process_started(pid)})
    assert handle is not None and not handle.done()
    handle.terminate()
    assert handle.done() and process_started(pid) is None
