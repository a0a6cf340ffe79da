"""Sweeps: many `personafuse run` trials of one experiment, tracked as one MLflow parent run.

A sweep file names a base experiment config, fixed overrides, the parameters to vary (a grid, or
a random / TPE search through Optuna), the objective (an MLflow metric logged by the trials'
runs) and a launcher (`local` subprocesses or `slurm` jobs through submitit):

    # personafuse sweep sweeps/smoke_grid.yaml [--launcher local|slurm] [--dry-run] [key=value ...]
    base: experiments/smoke.yaml
    overrides: [stages=[router]]
    parameters: {router.hidden: [16, 32], router.lr: [0.001, 0.01]}
    objective: {metric: router/val_f1_micro, direction: maximize, stage: router}
    launcher: {kind: local, parallel: 1}

Every trial is a full pipeline in its own process (`python -m experiments.cli run BASE ...`) with
its own output folder `<sweep output>/trial-<hash of its resolved overrides>`; its pipeline run is
a child of the sweep run (through PERSONAFUSE_PARENT_RUN_ID). Trial status lives in
`<sweep output>/sweep_state.json`, written atomically: a relaunch skips trials that finished with
the same resolved config, reruns failed or interrupted ones (the pipeline resumes their stages)
and reattaches to SLURM jobs that are still queued or running.

SLURM: one job per trial, or one job array (`array: true`). A job has `nodes` x `gpus_per_node`
tasks, one per GPU as Lightning's SLURM support expects, and the trial gets the matching
`trainer.num_nodes` / `trainer.devices` overrides. `--dry-run` prints the sbatch script that
submitit would submit, e.g. for nodes=2, gpus_per_node=4, partition=gpu, time_min=240:

    #SBATCH --gpus-per-node=4
    #SBATCH --job-name=<sweep>-trial-<id>
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=4
    #SBATCH --partition=gpu
    #SBATCH --time=240
    ...
    srun --unbuffered ... python -u -m submitit.core._submit <sweep output>/slurm/%j

Each srun task unpickles the trial (a `CommandFunction` running the trial's command) and runs
it; Lightning reads the node and process ranks from the SLURM_* variables.
"""
from __future__ import annotations

import dataclasses
import difflib
import fcntl
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError
from rich.console import Console

from datamodules.io import atomic_write_text, read_json
from experiments import registry, tracking
from experiments.config import (
    ConfigError, ExperimentConfig, _schema_keys, config_hash, flatten, load_config, project_path, to_container,
)
from experiments.pipeline import PARENT_RUN_ENV

console = Console(stderr=True, soft_wrap=True)

METHODS = ("grid", "random", "tpe")
DIRECTIONS = ("maximize", "minimize")
STATE_FILE = "sweep_state.json"
FINISHED, FAILED, RUNNING, INTERRUPTED = "finished", "failed", "running", "interrupted"


class SweepError(ConfigError):
    """A problem with a sweep file or its trials, naming the file and key."""


class SweepLocked(RuntimeError):
    """Another sweep process is driving the same sweep folder."""


# --------------------------------------------------------------------------- schema


@dataclass
class ObjectiveSpec:
    metric: str = MISSING
    """MLflow metric key logged by a trial's runs (e.g. router/val_f1_micro); a glob (val/loss/*) averages the matches of one run."""
    direction: str = "maximize"
    """maximize or minimize."""
    stage: Optional[str] = None
    """Only runs of this stage (tag `stage`), when several stages log the metric."""
    system: Optional[str] = None
    """Only runs of this system (tag `system`), for evaluate metrics logged once per system."""


@dataclass
class LauncherSpec:
    kind: str = "local"
    """Registered launcher: local (subprocesses here) or slurm (submitit jobs)."""
    parallel: int = 1
    """Trials in flight at once: local processes, SLURM jobs, or the array's %N throttle."""
    partition: Optional[str] = None
    """SLURM partition."""
    account: Optional[str] = None
    """SLURM account to charge."""
    nodes: int = 1
    """SLURM nodes per trial (multi-node: sets trainer.num_nodes)."""
    gpus_per_node: int = 1
    """GPUs per node, one task each (sets trainer.devices); 0 for CPU-only jobs."""
    cpus_per_task: int = 8
    """CPU cores per task (data loading, tokenisation)."""
    mem_gb: Optional[float] = None
    """Memory per node in GB (None: the partition's default)."""
    time_min: int = 60
    """Wall-clock limit per trial in minutes."""
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    """Extra #SBATCH flags, e.g. {qos: high, constraint: a100}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the job before the trial (module load ..., source .venv/bin/activate)."""
    array: bool = False
    """Submit all trials as one job array (grid and random sweeps only)."""
    python: Optional[str] = None
    """Python interpreter on the compute nodes (None: this one)."""


@dataclass
class RangeSpec:
    low: Optional[float] = None
    """Lower bound (inclusive)."""
    high: Optional[float] = None
    """Upper bound (inclusive)."""
    log: bool = False
    """Sample on a log scale."""
    step: Optional[float] = None
    """Grid step inside [low, high] (None: continuous; 1 for integer keys)."""
    choices: Optional[list[Any]] = None
    """Categorical values instead of a range."""


@dataclass
class SweepSpec:
    base: str = MISSING
    """Experiment config every trial starts from."""
    name: str = ""
    """Sweep name: the MLflow experiment and output folder (default: the file's stem)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides shared by every trial."""
    method: str = "grid"
    """grid (every combination of listed values), random or tpe (Optuna search)."""
    trials: Optional[int] = None
    """Number of trials for random and tpe."""
    seed: int = 0
    """Sampler seed: the same seed proposes the same trials."""
    startup_trials: int = 10
    """tpe: random trials before the model-based proposals start."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Config key -> list of values (grid; categorical for search) or {low, high, log, step} / {choices}."""
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    """What ranks the trials."""
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    """Where trials run."""
    output_dir: Optional[str] = None
    """Sweep folder (None: outputs/sweeps/<name>)."""


@dataclass
class Param:
    """One varied key, validated: grid values, or an Optuna distribution's bounds."""

    key: str
    values: Optional[list[Any]] = None
    low: Any = None
    high: Any = None
    log: bool = False
    step: Optional[float] = None
    integer: bool = False

    def candidates(self) -> list[Any]:
        """Values that bound what this parameter can produce, for validation before anything starts."""
        return list(self.values) if self.values is not None else [self.low, self.high]

    def distribution(self):
        import optuna.distributions as d

        if self.values is not None:
            return d.CategoricalDistribution(self.values)
        if self.integer:
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass
class Sweep:
    """A loaded sweep: the typed spec plus what is derived from it."""

    spec: SweepSpec
    source: Path
    params: list[Param]
    folder: Path

    @property
    def name(self) -> str:
        return self.spec.name


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


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), launcher: Optional[str] = None) -> Sweep:
    """Schema <- sweep YAML <- key=value overrides (<- --launcher), validated strictly."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: the top level must be a mapping (base, parameters, objective, launcher, ...)")
    merged = _merge(OmegaConf.structured(SweepSpec), data, str(path))
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"sweep override {item!r} must look like key=value (e.g. launcher.parallel=2)")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}' (on {path})")
    if launcher:
        merged.launcher.kind = launcher
    try:
        spec: SweepSpec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    spec.name = spec.name or path.stem
    _check_spec(spec, str(path))
    folder = Path(spec.output_dir or f"outputs/sweeps/{spec.name}").absolute()
    return Sweep(spec, path, _parse_params(spec, str(path)), folder)


def _merge(base, data, source: str):
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _explain(err: OmegaConfBaseException, source: str) -> SweepError:
    """One line naming the file, the key and the closest valid key."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, MissingMandatoryValue):
        return SweepError(f"{source}: missing required key '{key}'")
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        known = _schema_keys(SweepSpec)
        match = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" — did you mean '{match[0]}'?" if match else ""
        section = str(key).rpartition(".")[0]
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
        return SweepError(f"{source}: unknown sweep key '{key}'{hint} (valid{f' in {section}' if section else ''}: {', '.join(siblings)})")
    if isinstance(err, ValidationError):
        return SweepError(f"{source}: wrong type for sweep key '{key}': {str(err).splitlines()[0]}")
    return SweepError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def _check_spec(spec: SweepSpec, source: str) -> None:
    """Checks a schema cannot express: allowed values and combinations."""
    problems = []
    if spec.method not in METHODS:
        problems.append(f"method '{spec.method}' is not one of {', '.join(METHODS)}")
    if spec.method == "grid" and spec.trials is not None:
        problems.append("trials applies to random and tpe only (a grid runs every combination)")
    if spec.method != "grid" and (spec.trials is None or spec.trials < 1):
        problems.append(f"method {spec.method} needs trials: N (N >= 1)")
    if not spec.parameters:
        problems.append("parameters is empty: name at least one config key to vary")
    if spec.objective.direction not in DIRECTIONS:
        problems.append(f"objective.direction '{spec.objective.direction}' is not one of {', '.join(DIRECTIONS)}")
    if spec.objective.stage is not None and spec.objective.stage not in registry.STAGES:
        problems.append(f"objective.stage: {registry.STAGES.unknown_message(spec.objective.stage)}")
    if spec.launcher.kind not in registry.LAUNCHERS:
        problems.append(f"launcher.kind: {registry.LAUNCHERS.unknown_message(spec.launcher.kind)}")
    if spec.launcher.parallel < 1 or spec.launcher.nodes < 1 or spec.launcher.gpus_per_node < 0:
        problems.append("launcher.parallel and launcher.nodes must be >= 1, launcher.gpus_per_node >= 0")
    if spec.launcher.array and spec.method == "tpe":
        problems.append("launcher.array needs every trial up front: use method grid or random (tpe waits for results)")
    if problems:
        raise SweepError(f"{source}: " + "; ".join(problems))


def _parse_params(spec: SweepSpec, source: str) -> list[Param]:
    """Each parameter as grid values, categorical choices or a typed range."""
    out = []
    for key, raw in spec.parameters.items():
        where = f"{source}: parameters.{key}"
        if isinstance(raw, list):
            if not raw:
                raise SweepError(f"{where}: an empty list of values")
            if spec.method != "grid" and any(isinstance(v, (list, dict)) for v in raw):
                raise SweepError(f"{where}: search choices must be scalars (Optuna); use method: grid for list values")
            out.append(Param(key, values=list(raw)))
        elif isinstance(raw, dict):
            if spec.method == "grid":
                raise SweepError(f"{where}: a grid takes a list of values; ranges need method: random or tpe")
            out.append(_range_param(key, raw, where))
        else:
            raise SweepError(f"{where}: expected a list of values or {{low, high, log}} / {{choices: [...]}}, got {raw!r}")
    return out


def _range_param(key: str, raw: dict, where: str) -> Param:
    valid = [f.name for f in dataclasses.fields(RangeSpec)]
    for name in raw:
        if name not in valid:
            match = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" — did you mean '{match[0]}'?" if match else ""
            raise SweepError(f"{where}: unknown range key '{name}'{hint} (valid: {', '.join(valid)})")
    rng: RangeSpec = OmegaConf.to_object(_merge(OmegaConf.structured(RangeSpec), raw, where))
    if rng.choices is not None:
        if rng.low is not None or rng.high is not None or not rng.choices:
            raise SweepError(f"{where}: give either non-empty choices or low/high, not both")
        bad = [c for c in rng.choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if bad:
            raise SweepError(f"{where}: choices must be scalars for Optuna, got {bad[0]!r}")
        return Param(key, values=list(rng.choices))
    if rng.low is None or rng.high is None or rng.low > rng.high:
        raise SweepError(f"{where}: a range needs low <= high (got low={rng.low}, high={rng.high})")
    if rng.log and rng.low <= 0:
        raise SweepError(f"{where}: log ranges need low > 0")
    integer = _schema_type(key) is int or (_schema_type(key) is None and isinstance(raw.get("low"), int) and isinstance(raw.get("high"), int))
    if integer and (rng.low != int(rng.low) or rng.high != int(rng.high)):
        raise SweepError(f"{where}: {key} is an integer key; low/high must be whole numbers")
    if integer and rng.log and rng.step not in (None, 1):
        raise SweepError(f"{where}: integer log ranges cannot have a step")
    return Param(key, low=int(rng.low) if integer else rng.low, high=int(rng.high) if integer else rng.high,
                 log=rng.log, step=rng.step, integer=integer)


def _schema_type(key: str) -> Optional[type]:
    """The experiment schema's type of a dotted key (None for keys inside free-form dicts)."""
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if dataclasses.is_dataclass(hint) and i < len(parts) - 1:
            cls = hint
            continue
        return hint if i == len(parts) - 1 and isinstance(hint, type) else None
    return None


# --------------------------------------------------------------------------- trials


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


def grid_params(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest (the order the file lists them)."""
    keys = [p.key for p in sweep.params]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.values for p in sweep.params))]


def sampled_params(sweep: Sweep, n: int) -> list[dict[str, Any]]:
    """The first n proposals of the seeded sampler without feedback (all of a random sweep, tpe's startup)."""
    study, dists = _new_study(sweep)
    return [_ask(study, dists)[1] for _ in range(n)]


def _new_study(sweep: Sweep):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = sweep.spec
    if spec.method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    study = optuna.create_study(direction=spec.objective.direction, sampler=sampler, study_name=spec.name)
    return study, {p.key: p.distribution() for p in sweep.params}


def _ask(study, dists) -> tuple[Any, dict[str, Any]]:
    trial = study.ask(dists)
    return trial, {key: trial.params[key] for key in dists}


def build_trial(sweep: Sweep, params: dict[str, Any], launcher_overrides: list[str]) -> Trial:
    """Validate one trial against the experiment schema and give it its identity and folder."""
    varied = sweep.spec.overrides + [f"{k}={format_value(v)}" for k, v in params.items()] + launcher_overrides
    base = str(project_path(sweep.spec.base))
    try:
        cfg = load_config(base, varied)
    except ConfigError as err:
        raise SweepError(f"{sweep.source}: trial {' '.join(varied) or '(no overrides)'}: {err}") from None
    objective_stage = sweep.spec.objective.stage
    if objective_stage and objective_stage not in cfg.stages:
        raise SweepError(f"{sweep.source}: objective.stage '{objective_stage}' is not among the trial's stages {cfg.stages}")
    resolved = to_container(cfg)
    identity = {item.split("=", 1)[0]: _dig(resolved, item.split("=", 1)[0]) for item in varied}
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


def validate_search_space(sweep: Sweep, launcher_overrides: list[str]) -> None:
    """tpe proposes trials as results arrive: check every parameter's bounds and choices now."""
    for param in sweep.params:
        for value in param.candidates():
            probe = Sweep(sweep.spec, sweep.source, [Param(param.key, values=[value])], sweep.folder)
            build_trial(probe, {param.key: value}, launcher_overrides)


def trial_env(parent_run_id: str, tracking_uri: str) -> dict[str, str]:
    """What a trial process needs to log as a child of the sweep run in the same store."""
    return {PARENT_RUN_ENV: parent_run_id, "MLFLOW_TRACKING_URI": tracking_uri}


def trial_command(sweep: Sweep, trial: Trial, python: Optional[str] = None) -> list[str]:
    return [python or sys.executable, "-m", "experiments.cli", "run", str(project_path(sweep.spec.base)), *trial.overrides]


# --------------------------------------------------------------------------- plans


class FixedPlan:
    """Trials known up front (grid, random): validated before the first one starts."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials
        self.total = len(trials)
        self._next = iter(trials)

    def next_trial(self) -> Optional[Trial]:
        return next(self._next, None)

    def tell(self, trial: Trial, value: Optional[float]) -> None:
        """Results do not change a fixed plan."""


class TPEPlan:
    """Optuna ask/tell: each proposal uses the results told so far."""

    def __init__(self, sweep: Sweep, launcher_overrides: list[str]) -> None:
        self.sweep, self.launcher_overrides = sweep, launcher_overrides
        self.study, self.dists = _new_study(sweep)
        self.total = int(sweep.spec.trials)
        self.asked = 0
        self.pending: dict[str, list] = {}

    def next_trial(self) -> Optional[Trial]:
        if self.asked >= self.total:
            return None
        self.asked += 1
        handle, params = _ask(self.study, self.dists)
        trial = build_trial(self.sweep, params, self.launcher_overrides)
        self.pending.setdefault(trial.id, []).append(handle)
        return trial

    def tell(self, trial: Trial, value: Optional[float]) -> None:
        from optuna.trial import TrialState

        handles = self.pending.get(trial.id)
        if not handles:
            return
        handle = handles.pop()  # last asked first: a repeated proposal is told at once, before the original ends
        if value is None:
            self.study.tell(handle, state=TrialState.FAIL)
        else:
            self.study.tell(handle, value)


def make_plan(sweep: Sweep, launcher_overrides: list[str]):
    """Grid and random: every trial, validated now. tpe: the search space validated now."""
    if sweep.spec.method == "tpe":
        validate_search_space(sweep, launcher_overrides)
        return TPEPlan(sweep, launcher_overrides)
    params = grid_params(sweep) if sweep.spec.method == "grid" else sampled_params(sweep, int(sweep.spec.trials))
    trials, seen = [], set()
    for p in params:
        trial = build_trial(sweep, p, launcher_overrides)
        if trial.id not in seen:  # a random sweep over few choices can repeat itself
            seen.add(trial.id)
            trials.append(trial)
    return FixedPlan(trials)


# --------------------------------------------------------------------------- launchers


class LocalLauncher:
    """Trials as subprocesses on this machine, `parallel` at a time, each logging to <trial>/trial.log."""

    poll_s = 0.5

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def capacity(self, total: int) -> int:
        return self.sweep.spec.launcher.parallel

    def trial_overrides(self) -> list[str]:
        return []

    def launch(self, trials: list[Trial], env: dict[str, str]) -> list["LocalHandle"]:
        handles = []
        for trial in trials:
            trial.output_dir.mkdir(parents=True, exist_ok=True)
            log = open(trial.output_dir / "trial.log", "ab")
            # Same process group as the sweep: Ctrl-C (or killing the group) stops trials too.
            proc = subprocess.Popen(trial_command(self.sweep, trial), env={**os.environ, **env},
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            handles.append(LocalHandle(proc, trial.output_dir / "trial.log"))
        return handles

    def reattach(self, record: dict) -> None:
        """A local trial does not outlive its sweep process: an unfinished one is rerun."""
        return None

    def preview(self, trials: list[Trial], env: dict[str, str]) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines = [f"launcher local: {self.sweep.spec.launcher.parallel} trial(s) at a time, in this process group"]
        for trial in trials:
            lines += _trial_lines(trial) + [f"  command: {prefix} {shlex.join(trial_command(self.sweep, trial))}"]
        return "\n".join(lines)

    def stop(self, handles: list["LocalHandle"]) -> None:
        for handle in handles:
            handle.terminate()


class LocalHandle:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log, self.job_id = proc, log, None

    def done(self) -> bool:
        return self.proc.poll() is not None

    def outcome(self) -> tuple[bool, str]:
        code = self.proc.wait()
        if code == 0:
            return True, ""
        text = self.log.read_text(errors="replace").replace("\r", "\n") if self.log.is_file() else ""
        tail = [line.strip()[:300] for line in text.splitlines() if line.strip()][-4:]
        return False, f"exit code {code} (log {self.log}): " + " | ".join(tail)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _trial_lines(trial: Trial, note: str = "") -> list[str]:
    """A trial's header for --dry-run: its id, varied values and every override it gets."""
    return [f"{trial.id}  {trial.describe()}{note}", f"  overrides: {shlex.join(trial.overrides)}"]


class SlurmLauncher:
    """One submitit job per trial (or one job array): nodes x gpus_per_node tasks, one per GPU."""

    poll_s = 15.0

    def __init__(self, sweep: Sweep) -> None:
        self.sweep, self.opts = sweep, sweep.spec.launcher
        self.folder = sweep.folder / "slurm" / "%j"

    def capacity(self, total: int) -> int:
        return max(total, 1) if self.opts.array else self.opts.parallel

    def trial_overrides(self) -> list[str]:
        """Lightning's devices and num_nodes must match the tasks SLURM starts, or ranks wait forever."""
        if self.opts.gpus_per_node == 0:
            return [f"trainer.num_nodes={self.opts.nodes}"]
        fixed = {"trainer.num_nodes": self.opts.nodes, "trainer.devices": self.opts.gpus_per_node}
        given = [item.split("=", 1)[0] for item in self.sweep.spec.overrides] + list(self.sweep.spec.parameters)
        clash = sorted(set(given) & set(fixed))
        if clash:
            raise SweepError(f"{self.sweep.source}: {', '.join(clash)} come from launcher.nodes / launcher.gpus_per_node "
                             "under slurm; remove them from overrides/parameters")
        return [f"{k}={v}" for k, v in fixed.items()]

    def parameters(self, job_name: str) -> dict[str, Any]:
        """submitit SlurmExecutor parameters (sbatch names)."""
        o = self.opts
        params = {"job_name": job_name, "partition": o.partition, "account": o.account, "time": o.time_min,
                  "nodes": o.nodes, "ntasks_per_node": max(1, o.gpus_per_node), "cpus_per_task": o.cpus_per_task,
                  "gpus_per_node": o.gpus_per_node or None, "mem": f"{o.mem_gb:g}GB" if o.mem_gb else None,
                  "additional_parameters": dict(o.extra_sbatch) or None, "setup": list(o.setup) or None,
                  "array_parallelism": o.parallel}
        return {k: v for k, v in params.items() if v is not None}

    def _executor(self, job_name: str, preview: bool = False):
        import submitit

        cls = _preview_executor_class() if preview else submitit.SlurmExecutor
        executor = cls(folder=self.folder, python=self.opts.python)
        executor.update_parameters(**self.parameters(job_name))
        return executor

    def _function(self, trial: Trial, env: dict[str, str]):
        """The trial's command behind `env`, so the compute node keeps its own SLURM_* variables."""
        from submitit.helpers import CommandFunction

        command = ["env", *(f"{k}={v}" for k, v in env.items()), *trial_command(self.sweep, trial, self.opts.python)]
        return CommandFunction(command, cwd=os.getcwd())

    def launch(self, trials: list[Trial], env: dict[str, str]) -> list["SlurmHandle"]:
        if self.opts.array and len(trials) > 1:
            executor = self._executor(self.sweep.name)
            with executor.batch():
                jobs = [executor.submit(self._function(t, env)) for t in trials]
        else:
            jobs = [self._executor(f"{self.sweep.name}-{t.id}").submit(self._function(t, env)) for t in trials]
        return [SlurmHandle(job) for job in jobs]

    def reattach(self, record: dict) -> Optional["SlurmHandle"]:
        """Follow a job submitted by an earlier launch of this sweep instead of submitting it again."""
        if not record.get("job_id"):
            return None
        import submitit

        return SlurmHandle(submitit.SlurmJob(folder=self.folder, job_id=record["job_id"]))

    def preview(self, trials: list[Trial], env: dict[str, str]) -> str:
        """The sbatch script(s) submitit would write, and the command each task runs."""
        lines = [f"launcher slurm: {'one job array' if self.opts.array else 'one job per trial'}, "
                 f"{self.opts.nodes} node(s) x {max(1, self.opts.gpus_per_node)} task(s); logs in {self.folder}"]
        if self.opts.array:
            executor = self._executor(self.sweep.name, preview=True)
            executor.parameters["map_count"] = len(trials)
            lines += ["--- sbatch script (job array) ---", executor._make_submission_file_text(executor._submitit_command_str, "dry-run")]
        for i, trial in enumerate(trials):
            lines += _trial_lines(trial, f"  (array task {i})" if self.opts.array else "")
            if not self.opts.array:
                executor = self._executor(f"{self.sweep.name}-{trial.id}", preview=True)
                lines += ["--- sbatch script ---", executor._make_submission_file_text(executor._submitit_command_str, "dry-run")]
            lines.append("  each task runs: " + shlex.join(self._function(trial, env).command))

        return "\n".join(lines)

    def stop(self, handles: list["SlurmHandle"]) -> None:
        ids = " ".join(h.job_id for h in handles)
        if ids:
            console.print(f"[yellow]SLURM jobs keep running[/]: {ids} — rerun the sweep to collect them, or `scancel {ids}`")


class SlurmHandle:
    def __init__(self, job) -> None:
        self.job, self.job_id = job, str(job.job_id)

    def done(self) -> bool:
        return self.job.done()

    def outcome(self) -> tuple[bool, str]:
        error = self.job.exception()
        return (error is None), ("" if error is None else f"job {self.job_id}: {str(error).strip()[-800:]}")


def _preview_executor_class():
    """A SlurmExecutor that renders its sbatch script on a machine without srun (for --dry-run)."""
    import submitit

    class PreviewSlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return PreviewSlurmExecutor


# --------------------------------------------------------------------------- state


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


class _exclusive:
    """A non-blocking lock on the sweep folder: a second driver of the same sweep fails at once."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle = path, None

    def __enter__(self):
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise SweepLocked(f"another `personafuse sweep` is driving {self.path.parent} (lock {self.path})") from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


# --------------------------------------------------------------------------- objective


class ObjectiveMissing(RuntimeError):
    """The trial ran but its runs do not log the objective (or log it ambiguously)."""


def trial_run_id(trial_dir: Path) -> Optional[str]:
    """The trial's pipeline run, as its pipeline recorded it."""
    state = read_json(trial_dir / "run_state.json") or {}
    return state.get("run_id")


def descendant_runs(client, experiment_id: str, run_id: str, depth: int = 3) -> list:
    """The run and its children down to `depth` levels (pipeline -> stage -> per-system runs)."""
    runs = [client.get_run(run_id)]
    frontier = [run_id]
    for _ in range(depth):
        children = []
        for parent in frontier:
            children += client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        runs += children
        frontier = [r.info.run_id for r in children]
        if not frontier:
            break
    return runs


def objective_value(runs: list, objective: ObjectiveSpec) -> float:
    """The objective from exactly one run; a glob metric is the mean of that run's matching metrics."""
    from fnmatch import fnmatchcase

    hits = []
    for run in runs:
        tags = run.data.tags
        if objective.stage and tags.get("stage") != objective.stage:
            continue
        if objective.system and tags.get("system") != objective.system:
            continue
        values = [v for k, v in run.data.metrics.items() if fnmatchcase(k, objective.metric)]
        if values:
            hits.append((run, sum(values) / len(values)))
    if not hits:
        logged = sorted({k for r in runs for k in r.data.metrics})
        raise ObjectiveMissing(f"no run of this trial logs '{objective.metric}'"
                               f"{f' (stage {objective.stage})' if objective.stage else ''}; logged: {', '.join(logged[:12]) or 'nothing'}")
    if len(hits) > 1:
        names = ", ".join(f"{r.info.run_name} (stage {r.data.tags.get('stage')}, system {r.data.tags.get('system')})" for r, _ in hits)
        raise ObjectiveMissing(f"'{objective.metric}' is logged by {len(hits)} runs ({names}): set objective.stage / objective.system")
    return float(hits[0][1])


# --------------------------------------------------------------------------- running


def run_sweep(sweep: Sweep, dry_run: bool = False) -> int:
    """Run (or with dry_run, print) every trial; 0 when all finished, 1 when some failed."""
    launcher = registry.LAUNCHERS.get(sweep.spec.launcher.kind)(sweep)
    launcher_overrides = launcher.trial_overrides()
    plan = make_plan(sweep, launcher_overrides)
    if dry_run:
        print(_dry_run_text(sweep, plan, launcher))
        return 0
    base_cfg = load_config(str(project_path(sweep.spec.base)), sweep.spec.overrides)
    uri = tracking.resolve_tracking_uri(base_cfg.tracking.tracking_uri)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(sweep.folder / ".lock"):
        state = SweepState(sweep.folder / STATE_FILE)
        exp_id = tracking.get_or_create_experiment(sweep.name, uri)
        parent = _resume_or_start_parent(sweep, state, uri, exp_id)
        runner = _Runner(sweep, plan, launcher, state, uri, exp_id, parent)
        with _sigterm_as_interrupt():
            try:
                runner.run()
            except KeyboardInterrupt:
                _end_parent(uri, parent, "KILLED")
                raise
        rows = ranked_rows(sweep, state, runner.seen)
        _report(sweep, rows, uri, parent)
        failed = sum(r["status"] != FINISHED for r in rows)
        _end_parent(uri, parent, "FAILED" if failed else "FINISHED")
        console.print(f"[bold green]sweep done[/]: {len(rows) - failed} finished, {failed} failed — MLflow: {tracking.runs_url(exp_id)}")
        return 1 if failed else 0


class _Runner:
    """Keeps up to `capacity` trials in flight, records each status change, tells the plan each result."""

    def __init__(self, sweep, plan, launcher, state: SweepState, uri: str, exp_id: str, parent: str) -> None:
        import mlflow

        self.sweep, self.plan, self.launcher, self.state = sweep, plan, launcher, state
        self.uri, self.exp_id, self.parent = uri, exp_id, parent
        self.client = mlflow.MlflowClient(uri)
        self.env = trial_env(parent, uri)
        self.running: dict[str, tuple[Trial, Any]] = {}
        self.tagged: set[str] = set()
        self.seen: list[str] = []
        self.reattached = self._reattach()

    def run(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.plan.total, desc=f"sweep {self.sweep.name}", unit="trial")
        try:
            exhausted = False
            while True:
                if not exhausted:
                    exhausted = self._fill()
                if not self.running:
                    break
                if not self._collect():
                    time.sleep(self.launcher.poll_s)
        finally:
            self.bar.close()
            self._stop()

    def _say(self, message: str) -> None:
        """A status line above the progress bar, on stderr with the rest of the progress output."""
        self.bar.write(message, file=sys.stderr)

    def _reattach(self) -> dict[str, Any]:
        """Jobs an earlier launch left queued or running (SLURM) are followed, not resubmitted."""
        out = {}
        for trial_id, record in self.state.trials.items():
            if record.get("status") == RUNNING:
                handle = self.launcher.reattach(record)
                if handle is not None:
                    out[trial_id] = handle
        return out

    def _fill(self) -> bool:
        """Propose trials until the launcher is full; True once the plan has no more."""
        batch: list[Trial] = []
        while len(self.running) + len(batch) < self.launcher.capacity(self.plan.total):
            trial = self.plan.next_trial()
            if trial is None:
                self._launch(batch)
                return True
            if trial.id in self.seen:  # tpe proposed the same values again: reuse, do not rerun
                self.plan.tell(trial, self.state.trials.get(trial.id, {}).get("objective"))
                self.bar.update(1)
                continue
            self.seen.append(trial.id)
            record = self.state.trials.get(trial.id, {})
            if record.get("status") == FINISHED and record.get("config_hash") == trial.config_hash:
                self.plan.tell(trial, record.get("objective"))
                self.bar.update(1)
                self._say(f"{trial.id} already finished ({trial.describe()}) — skipped")
            elif trial.id in self.reattached:
                self.running[trial.id] = (trial, self.reattached.pop(trial.id))
                self._say(f"{trial.id} following SLURM job {self.running[trial.id][1].job_id}")
            else:
                batch.append(trial)
        self._launch(batch)
        return False

    def _launch(self, trials: list[Trial]) -> None:
        if not trials:
            return
        handles = self.launcher.launch(trials, self.env)
        for trial, handle in zip(trials, handles):
            attempts = self.state.trials.get(trial.id, {}).get("attempts", 0) + 1
            self.state.update(trial, status=RUNNING, attempts=attempts, started=time.time(), ended=None,
                              job_id=handle.job_id, error=None, objective=None)
            self.running[trial.id] = (trial, handle)
            self._say(f"{trial.id} started ({trial.describe()}), attempt {attempts}"
                           + (f", SLURM job {handle.job_id}" if handle.job_id else f", log {trial.output_dir / 'trial.log'}"))

    def _collect(self) -> bool:
        """Record every trial that ended since the last poll; tag runs that appeared."""
        ended = [tid for tid, (_, handle) in self.running.items() if handle.done()]
        for trial_id, (trial, _) in self.running.items():
            if trial_id not in ended:
                self._tag(trial)
        for trial_id in ended:
            trial, handle = self.running.pop(trial_id)
            self._finish(trial, handle)
        return bool(ended)

    def _finish(self, trial: Trial, handle) -> None:
        ok, error = handle.outcome()
        run_id = self._tag(trial)
        value = None
        if ok:
            try:
                if not run_id:
                    raise ObjectiveMissing(f"{trial.output_dir / 'run_state.json'} names no pipeline run")
                value = objective_value(descendant_runs(self.client, self.exp_id, run_id), self.sweep.spec.objective)
            except ObjectiveMissing as err:
                ok, error = False, str(err)
        record = self.state.update(trial, status=FINISHED if ok else FAILED, objective=value, error=error or None,
                                   ended=time.time(), pipeline_run_id=run_id)
        self.plan.tell(trial, value)
        self.bar.update(1)
        if ok:
            self.client.log_metric(self.parent, "sweep/objective", value, step=record["index"])
            self._say(f"{trial.id} finished: {self.sweep.spec.objective.metric} = {value:.4g}")
        else:
            self._say(f"{trial.id} FAILED: {error}")

    def _tag(self, trial: Trial) -> Optional[str]:
        """Name the trial's pipeline run after the trial and tag it with its overrides, once."""
        run_id = trial_run_id(trial.output_dir)
        if not run_id or run_id in self.tagged:
            return run_id
        tags = {"sweep": self.sweep.name, "sweep.trial": trial.id, "sweep.overrides": json.dumps(trial.varied)}
        tags.update({f"sweep.param.{k}": format_value(v)[:5000] for k, v in trial.params.items()})
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.update_run(run_id, name=trial.id)
        self.tagged.add(run_id)
        return run_id

    def _stop(self) -> None:
        """On interrupt: stop local trials (they resume on relaunch), leave SLURM jobs queued."""
        if not self.running:
            return
        for trial, handle in self.running.values():
            if handle.job_id is None:
                self.state.update(trial, status=INTERRUPTED, ended=time.time())
        self.launcher.stop([handle for _, handle in self.running.values()])


def _resume_or_start_parent(sweep: Sweep, state: SweepState, uri: str, exp_id: str) -> str:
    """Continue the sweep's parent run on relaunch instead of starting a second one."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run_id = state.data.get("run_id")
    if run_id:
        try:
            if client.get_run(run_id).info.experiment_id == exp_id:
                client.update_run(run_id, status="RUNNING")
                return run_id
        except Exception:  # the store was reset: start over
            pass
    spec = sweep.spec
    tags = {"stage": "sweep", "sweep": sweep.name, "sweep.method": spec.method, "sweep.objective": spec.objective.metric,
            "sweep.direction": spec.objective.direction, "base_config": spec.base, "git_commit": tracking.git_commit()}
    run_id = tracking.start_run(uri, exp_id, sweep.name, tags)
    tracking.log_params(uri, run_id, flatten(OmegaConf.to_container(OmegaConf.structured(spec), resolve=True)))
    spec_file = sweep.folder / "sweep.yaml"
    atomic_write_text(spec_file, OmegaConf.to_yaml(OmegaConf.structured(spec)))
    client.log_artifact(run_id, str(spec_file))
    state.data.update(run_id=run_id, tracking_uri=uri, experiment_id=exp_id, sweep=sweep.name)
    state.save()
    return run_id


def _end_parent(uri: str, run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_terminated(run_id, status)


class _sigterm_as_interrupt:
    """SIGTERM (scancel, kill) unwinds like Ctrl-C, so running trials are stopped and recorded."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# --------------------------------------------------------------------------- report


def ranked_rows(sweep: Sweep, state: SweepState, trial_ids: list[str]) -> list[dict[str, Any]]:
    """This plan's trials, best objective first; failed trials last."""
    sign = -1.0 if sweep.spec.objective.direction == "maximize" else 1.0
    records = [(tid, state.trials[tid]) for tid in trial_ids if tid in state.trials]
    done = sorted((r for r in records if r[1].get("objective") is not None), key=lambda r: sign * r[1]["objective"])
    rest = [r for r in records if r[1].get("objective") is None]
    rows = []
    for rank, (tid, rec) in enumerate(done + rest, 1):
        duration = (rec.get("ended") or 0) - (rec.get("started") or 0)
        rows.append({"rank": rank if rec.get("objective") is not None else None, "trial": tid,
                     "status": rec.get("status"), sweep.spec.objective.metric: rec.get("objective"),
                     **rec.get("params", {}),
                     "duration_s": round(duration, 1) if duration > 0 else None,
                     "pipeline_run_id": rec.get("pipeline_run_id"), "error": rec.get("error")})
    return rows


def _report(sweep: Sweep, rows: list[dict[str, Any]], uri: str, parent: str) -> None:
    """Ranked table: printed, written as CSV and Markdown in the sweep folder, logged on the parent run."""
    import csv
    import io

    import mlflow
    from rich.table import Table
    from rich.text import Text

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep.folder / "trials.csv", buffer.getvalue())
    shown = [c for c in columns if c not in ("pipeline_run_id", "error")]
    md = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    atomic_write_text(sweep.folder / "trials.md", f"# Sweep {sweep.name}: trials ranked by {sweep.spec.objective.metric} "
                      f"({sweep.spec.objective.direction})\n\n" + "\n".join(md) + "\n")
    client = mlflow.MlflowClient(uri)
    for name in ("trials.csv", "trials.md"):
        client.log_artifact(parent, str(sweep.folder / name), "sweep")
    best = next((r for r in rows if r["rank"] == 1), None)
    client.log_metric(parent, "sweep/finished_trials", sum(r["status"] == FINISHED for r in rows))
    client.log_metric(parent, "sweep/failed_trials", sum(r["status"] != FINISHED for r in rows))
    if best:
        client.log_metric(parent, "sweep/best_objective", best[sweep.spec.objective.metric])
        client.set_tag(parent, "sweep.best_trial", best["trial"])
    table = Table(title=f"{sweep.name}: ranked by {sweep.spec.objective.metric} ({sweep.spec.objective.direction})")
    for column in shown:
        table.add_column(column, overflow="fold")  # wrap, never cut, values in narrow (CI) consoles
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in shown))
    Console(soft_wrap=True).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _dry_run_text(sweep: Sweep, plan, launcher) -> str:
    """Every trial's overrides and exact command / sbatch script; nothing is created."""
    spec = sweep.spec
    trials = plan.trials if isinstance(plan, FixedPlan) else [build_trial(sweep, p, launcher.trial_overrides())
                                                            for p in sampled_params(sweep, min(plan.total, spec.startup_trials))]
    env = trial_env("<sweep-run-id>", _display_uri(sweep))
    head = [f"sweep {sweep.name}: {spec.method} over {', '.join(p.key for p in sweep.params)} — {plan.total} trial(s)",
            f"base {spec.base}; MLflow experiment '{sweep.name}' on {env['MLFLOW_TRACKING_URI']}; output {sweep.folder}",
            f"objective: {spec.objective.direction} {spec.objective.metric}" + (f" (stage {spec.objective.stage})" if spec.objective.stage else "")]
    if isinstance(plan, TPEPlan):
        head.append(f"tpe: the first {len(trials)} trial(s) below come from the seeded sampler; later ones depend on results")
    tail = "dry run: nothing submitted, no folder or MLflow run created"
    return "\n".join(head + ["", launcher.preview(trials, env), "", tail])


def _display_uri(sweep: Sweep) -> str:
    """The store trials would log to, without creating it."""
    try:
        configured = load_config(str(project_path(sweep.spec.base)), sweep.spec.overrides).tracking.tracking_uri
    except ConfigError:
        configured = None
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').absolute() / 'mlflow.db'}"
