"""The sweep folder's bookkeeping: sweep_state.json (trial statuses, the parent run) and its lock."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datamodules.io import ExclusiveLock, atomic_write_text, read_json
from experiments.sweep.trials import Trial

STATE_FILE = "sweep_state.json"
FINISHED, FAILED, RUNNING, INTERRUPTED = "finished", "failed", "running", "interrupted"


class SweepLocked(RuntimeError):
    """Another sweep process is driving the same sweep folder."""


class SweepState:
    """sweep_state.json: the parent run and every trial's status, rewritten atomically on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = read_json(path) or {"run_id": None, "trials": {}}

    @property
    def trials(self) -> dict[str, dict]:
        return self.data["trials"]

    def update(self, trial: Trial, **fields: Any) -> dict:
        record = self.trials.setdefault(trial.id, {"index": len(self.trials), "attempts": 0})
        record.update(params=trial.params, overrides=trial.overrides, config_hash=trial.config_hash,
                      output_dir=str(trial.output_dir), **fields)
        self.save()
        return record

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))


def SweepLock(path: Path) -> ExclusiveLock:  # noqa: N802 - reads as the class it used to be
    """A non-blocking lock on the sweep folder: a second driver of the same sweep fails at once."""
    return ExclusiveLock(path, SweepLocked, f"another `personafuse sweep` is driving {path.parent} (lock {path})")
