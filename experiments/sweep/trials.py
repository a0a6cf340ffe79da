"""One trial: its override list validated against the experiment schema, its identity, folder and command."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from experiments.config import ConfigError, config_hash, load_config, to_container
from experiments.pipeline import PARENT_RUN_ENV
from experiments.sweep.schema import Sweep, SweepError


@dataclass
class Trial:
    """One resolved trial: what it varies, the full override list, its folder and identity."""

    id: str
    params: dict[str, Any]
    varied: list[str]
    """The sweep's overrides for this trial: shared ones, the parameters, the launcher's."""
    overrides: list[str]
    """Everything passed to `personafuse run` after the base config (varied + output_dir, experiment)."""
    config_hash: str
    output_dir: Path

    def describe(self) -> str:
        return " ".join(f"{k}={format_value(v)}" for k, v in self.params.items())

    @property
    def log_file(self) -> Path:
        """Where a local trial's output goes."""
        return self.output_dir / "trial.log"


def format_value(value: Any) -> str:
    """A value as the right-hand side of a key=value override that parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def override_key(item: str) -> str:
    """The key of a key=value override."""
    return item.split("=", 1)[0]


def build_trial(sweep: Sweep, params: dict[str, Any], launcher_overrides: list[str]) -> Trial:
    """Validate one trial against the experiment schema and give it its identity and folder."""
    varied = sweep.spec.overrides + [f"{k}={format_value(v)}" for k, v in params.items()] + launcher_overrides
    try:
        cfg = load_config(sweep.base_path, varied)
    except ConfigError as err:
        raise SweepError(f"{sweep.source}: trial {' '.join(varied) or '(no overrides)'}: {err}") from None
    objective_stage = sweep.spec.objective.stage
    if objective_stage and objective_stage not in cfg.stages:
        raise SweepError(f"{sweep.source}: objective.stage '{objective_stage}' is not among the trial's stages {cfg.stages}")
    resolved = to_container(cfg)
    identity = {key: _dig(resolved, key) for key in map(override_key, varied)}
    trial_id = "trial-" + config_hash(identity)[:10]
    folder = sweep.folder / trial_id
    for key in ("tracking", "output_dir", "name"):
        resolved.pop(key, None)
    plumbing = [f"output_dir={folder}", f"tracking.experiment={sweep.name}"]
    return Trial(trial_id, dict(params), varied, varied + plumbing, config_hash(resolved), folder)


def _dig(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def trial_env(parent_run_id: str, tracking_uri: str) -> dict[str, str]:
    """What a trial process needs to log as a child of the sweep run in the same store."""
    return {PARENT_RUN_ENV: parent_run_id, "MLFLOW_TRACKING_URI": tracking_uri}


def trial_command(sweep: Sweep, trial: Trial, python: Optional[str] = None) -> list[str]:
    return [python or sys.executable, "-m", "experiments.cli", "run", sweep.base_path, *trial.overrides]
