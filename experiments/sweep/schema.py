"""The typed sweep file (what a YAML may say) and a loaded sweep (what is derived from it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from experiments.config import ConfigError, project_path

METHODS = ("grid", "random", "tpe")
DIRECTIONS = ("maximize", "minimize")


class SweepError(ConfigError):
    """A problem with a sweep file or its trials, naming the file and key."""


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
    """SLURM nodes per job, a trial's or a run's (multi-node: sets trainer.num_nodes)."""
    gpus_per_node: int = 1
    """GPUs per node, one task each (sets trainer.devices); 0 for CPU-only jobs."""
    cpus_per_task: int = 8
    """CPU cores per task (data loading, tokenisation)."""
    mem_gb: Optional[float] = None
    """Memory per node in GB (None: the partition's default)."""
    time_min: int = 60
    """Wall-clock limit per job in minutes (a trial's or a run's)."""
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    """Extra #SBATCH flags, e.g. {qos: high, constraint: a100}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the job before the trial (module load ..., source .venv/bin/activate)."""
    array: bool = False
    """Submit all trials as one job array (grid and random sweeps only)."""
    python: Optional[str] = None
    """Python interpreter on the compute nodes (None: this one)."""
    max_requeues: int = 3
    """slurm: times a job that reaches its time limit is requeued to resume where it stopped (submitit's
    max_num_timeout; 0: never). Preemptions requeue without counting."""
    allow_sqlite: bool = False
    """slurm: log to a SQLite MLflow store anyway (refused by default: several nodes writing one SQLite file
    over a network filesystem can lose runs; run `mlflow server` and point MLFLOW_TRACKING_URI at it)."""


LAUNCHER_MINIMUMS = {"parallel": 1, "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 1, "max_requeues": 0}
"""The smallest valid value of each integer launcher field (checked for sweep files and `run --launcher slurm` flags)."""


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

    @property
    def base_path(self) -> str:
        """The base experiment config, resolved against the project (what every trial runs)."""
        return str(project_path(self.spec.base))
