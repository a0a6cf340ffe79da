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
and reattaches to SLURM jobs that are still queued or running, and to local trial processes that
a killed (`kill -9`) sweep process left running (recorded by pid, start time and host).
A TPE sweep keeps its Optuna study in `<sweep output>/optuna.journal` (Optuna's JournalStorage):
a relaunch loads it, reruns a trial that was asked but never told as that same Optuna trial, and
then proposes exactly what an uninterrupted sweep would have (see plans.TPEPlan).

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

Each srun task unpickles the trial (an `experiments.slurm.PipelineJob` running the trial's command)
and runs it; Lightning reads the node and process ranks from the SLURM_* variables. At the time
limit submitit requeues the job under the same id (up to `launcher.max_requeues` times) and the
trial's pipeline resumes; the sweep keeps following that job id. A SQLite MLflow store is refused
under slurm (several nodes writing one SQLite file) unless `launcher.allow_sqlite=true`.

Package layout (one home per concern; the public names of each are re-exported here):

    schema.py     the typed sweep file (SweepSpec, ...), Param, Sweep, SweepError
    loading.py    load_sweep: YAML <- overrides, strict validation with one-line errors
    trials.py     Trial: overrides validated against the experiment schema, identity hash, command
    plans.py      grid / seeded random / TPE ask-tell plans (the TPE study in optuna.journal)
    launchers.py  local and slurm launchers and their --dry-run previews
    dry_run.py    the --dry-run text
    state.py      sweep_state.json and the sweep folder's lock
    objective.py  a trial's objective from its MLflow runs
    report.py     the ranked trial table (CSV, Markdown, parent-run metrics, console)
    runner.py     run_sweep: the parent run, trials in flight, statuses, resume
"""
from __future__ import annotations

from experiments.sweep.dry_run import display_uri, dry_run_text
from experiments.sweep.launchers import LocalHandle, LocalLauncher, SlurmHandle, SlurmLauncher
from experiments.sweep.loading import load_sweep
from experiments.sweep.objective import ObjectiveMissing, descendant_runs, objective_value, trial_run_id
from experiments.sweep.plans import (
    FixedPlan, TPEPlan, grid_params, make_plan, sampled_params, validate_search_space,
)
from experiments.sweep.report import failed_count, ranked_rows, report
from experiments.sweep.runner import run_sweep
from experiments.sweep.schema import (
    DIRECTIONS, METHODS, LauncherSpec, ObjectiveSpec, Param, RangeSpec, Sweep, SweepError, SweepSpec,
)
from experiments.sweep.state import (
    FAILED, FINISHED, INTERRUPTED, RUNNING, STATE_FILE, SweepLock, SweepLocked, SweepState,
)
from experiments.sweep.trials import Trial, build_trial, format_value, override_key, trial_command, trial_env

__all__ = [
    "DIRECTIONS", "FAILED", "FINISHED", "INTERRUPTED", "METHODS", "RUNNING", "STATE_FILE",
    "FixedPlan", "LauncherSpec", "LocalHandle", "LocalLauncher", "ObjectiveMissing", "ObjectiveSpec", "Param",
    "RangeSpec", "SlurmHandle", "SlurmLauncher", "Sweep", "SweepError", "SweepLock", "SweepLocked", "SweepSpec",
    "SweepState", "TPEPlan", "Trial",
    "build_trial", "descendant_runs", "display_uri", "dry_run_text", "failed_count", "format_value", "grid_params",
    "load_sweep", "make_plan", "objective_value", "override_key", "ranked_rows", "report", "run_sweep",
    "sampled_params", "trial_command", "trial_env", "trial_run_id", "validate_search_space",
]
