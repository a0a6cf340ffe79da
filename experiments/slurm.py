"""SLURM through submitit, for sweep trials and single runs: the one home for what such a job is.

    personafuse run quickstart --launcher slurm --partition gpu --nodes 2 --gpus-per-node 4 [--dry-run]
    personafuse sweep sweeps/sft_rank_lr.yaml --launcher slurm [--dry-run]

- `sbatch_parameters` turns a launcher section (the sweep YAML's `launcher:`, or the same names as
  `run --launcher slurm` flags) into submitit SlurmExecutor parameters: nodes x gpus_per_node tasks,
  one per GPU, as Lightning's SLURM support expects; `lightning_overrides` gives the run the
  matching trainer.num_nodes / trainer.devices.
- `PipelineJob` is what every task runs: `personafuse run ...` as a child process, checkpointable,
  so that at the time limit (or on preemption) submitit requeues the same job id and the relaunched
  pipeline resumes from the state files and checkpoints in its output_dir.
- `check_tracking_store`: SLURM jobs on several nodes must not share a SQLite MLflow store (refused
  before anything is submitted, unless --allow-sqlite / launcher.allow_sqlite).
"""
from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from submitit.helpers import Checkpointable

from experiments.config import ConfigError


def lightning_overrides(opts) -> dict[str, Any]:
    """trainer.num_nodes / trainer.devices matching the tasks SLURM starts (else ranks wait forever)."""
    if opts.gpus_per_node == 0:
        return {"trainer.num_nodes": opts.nodes}
    return {"trainer.num_nodes": opts.nodes, "trainer.devices": opts.gpus_per_node}


def sbatch_parameters(opts, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) for a launcher section; unset ones are left out."""
    o = opts
    params = {"job_name": job_name, "partition": o.partition, "account": o.account, "time": o.time_min,
              "nodes": o.nodes, "ntasks_per_node": max(1, o.gpus_per_node), "cpus_per_task": o.cpus_per_task,
              "gpus_per_node": o.gpus_per_node or None, "mem": f"{o.mem_gb:g}GB" if o.mem_gb else None,
              "additional_parameters": dict(o.extra_sbatch) or None, "setup": list(o.setup) or None}
    return {k: v for k, v in params.items() if v is not None}


def slurm_executor(opts, folder: Path, job_name: str, preview: bool = False):
    """A SlurmExecutor for one job; max_requeues caps its requeues at the time limit (max_num_timeout)."""
    import submitit

    cls = _preview_executor_class() if preview else submitit.SlurmExecutor
    executor = cls(folder=folder, max_num_timeout=opts.max_requeues, python=opts.python)
    executor.update_parameters(**sbatch_parameters(opts, job_name))
    return executor


def sbatch_script(executor, map_count: Optional[int] = None) -> str:
    """The sbatch script `executor` would submit (with map_count, for a job array of that size)."""
    if map_count is not None:
        executor.parameters["map_count"] = map_count
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def _preview_executor_class():
    """A SlurmExecutor that renders its sbatch script on a machine without srun (for --dry-run)."""
    import submitit

    class PreviewSlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return PreviewSlurmExecutor


class PipelineJob(Checkpointable):
    """`personafuse run ...` as the callable of a submitit job, requeued at the time limit or on preemption.

    submitit signals its job (USR2, 90 s before the limit) and, in rank 0's handler, calls `checkpoint`;
    that stops the pipeline like Ctrl-C (its MLflow runs end KILLED, its checkpoints stay) and hands
    submitit this same object to run again: SLURM requeues the job under the same id and the rerun of
    the command resumes from what the pipeline left in its output_dir.
    """

    stop_grace_s = 60.0
    """How long the pipeline gets to stop after SIGTERM before SIGKILL: under submitit's 90 s signal delay."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: str) -> None:
        self.command, self.env, self.cwd = list(command), dict(env), cwd
        self.requeues = 0
        self._proc: Optional[subprocess.Popen] = None

    def __call__(self) -> int:
        if self.requeues:
            print(f"personafuse: attempt {self.requeues + 1} of this job (requeued); the pipeline resumes", flush=True)
        from datamodules.redaction import redact

        print(f"personafuse: running {redact(self.describe())}", flush=True)  # the job log may be widely readable
        # On the node the job's own SLURM_* variables stay (Lightning reads ranks from them); `env` adds ours.
        self._proc = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env},
                                      preexec_fn=_ignoring(_requeue_signal()))
        while (code := self._proc.poll()) is None:  # poll, not wait(): the requeue handler may interrupt
            time.sleep(0.5)                          # here and poll the same process (Popen.wait holds a lock)
        if code:
            raise RuntimeError(f"`{shlex.join(self.command)}` exited with code {code} (output above in this job's log)")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Stop the pipeline so it records its state, then requeue this same job (submitit's DelayedSubmission)."""
        self._stop_pipeline()
        self.requeues += 1
        print(f"personafuse: pipeline stopped for requeue {self.requeues}", flush=True)
        return super().checkpoint(*args, **kwargs)

    def _stop_pipeline(self) -> None:
        """SIGTERM (the pipeline's interrupt: runs KILLED, resumable), SIGKILL after stop_grace_s."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + self.stop_grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()

    def describe(self) -> str:
        """The command each task runs, as a shell line (for --dry-run)."""
        return shlex.join(["env", *(f"{k}={v}" for k, v in self.env.items()), *self.command])

    def __getstate__(self) -> dict:
        """Pickled for the requeue without the finished child process."""
        return {**self.__dict__, "_proc": None}


def _requeue_signal() -> signal.Signals:
    """The signal submitit's jobs get before their time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


def _ignoring(signum: signal.Signals):
    """A preexec_fn for the pipeline process: SLURM's --signal reaches every process of the job step and
    Python would die of it; only submitit's handler, in the task process above, acts on it. (An ignored
    signal stays ignored across exec.)"""
    return functools.partial(signal.signal, signum, signal.SIG_IGN)


def sqlite_store_problem(uri: str, flag: str) -> Optional[str]:
    """Why SLURM jobs must not log to `uri` and what to do instead, or None when it is not a SQLite file.

    Jobs on other nodes reach that file over a network filesystem, where SQLite's locking is unreliable:
    concurrent writers can lose runs or corrupt the store. `flag` is how the user allows it anyway."""
    if not uri.startswith("sqlite:"):
        return None
    return (f"MLflow tracking store {uri} is a SQLite file: SLURM jobs on several nodes would write it over a "
            "network filesystem, where SQLite's locking is unreliable (lost runs, a corrupted store). Run a "
            f"tracking server the nodes can reach, e.g. `mlflow server --backend-store-uri {uri} --host 0.0.0.0 "
            "--port 5000`, and point MLFLOW_TRACKING_URI or tracking.tracking_uri at http://<host>:5000; "
            f"or pass {flag} to use the SQLite file anyway")


def check_tracking_store(uri: str, allowed: bool, flag: str) -> None:
    """Before anything is submitted: refuse a SQLite store for SLURM jobs (ConfigError), or warn when `allowed`."""
    problem = sqlite_store_problem(uri, flag)
    if problem and not allowed:
        raise ConfigError(problem)
    if problem:
        print(f"warning: {uri} is a SQLite store shared by SLURM jobs ({flag} given)", file=sys.stderr)


def submit_pipeline(config: str, overrides: list[str], opts, dry_run: bool = False,
                    executor: Optional[Callable[..., Any]] = None) -> Optional[Any]:
    """`personafuse run CONFIG --launcher slurm`: one pipeline as one checkpointable SLURM job.

    Returns the submitted job (None for dry_run). executor: builds the submitit executor from
    (opts, folder, job_name); tests pass one that returns submitit's LocalExecutor."""
    from experiments import tracking
    from experiments.config import experiment_path, load_config

    fixed = lightning_overrides(opts)
    clash = sorted({item.split("=", 1)[0] for item in overrides} & set(fixed))
    if clash:
        raise ConfigError(f"{', '.join(clash)} come from --nodes / --gpus-per-node under --launcher slurm; "
                          "remove them from the overrides")
    extra = [f"{k}={v}" for k, v in fixed.items()]
    path = str(experiment_path(config))
    cfg = load_config(path, [*overrides, *extra])  # a bad key fails here, before anything is queued
    from experiments.validation import preflight

    preflight(cfg)  # and a missing file, benchmark or endpoint key: a job that would fail in the queue never waits there
    uri = tracking.planned_uri(cfg.tracking.tracking_uri) if dry_run else tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    if not dry_run:
        check_tracking_store(uri, opts.allow_sqlite, "--allow-sqlite")
    folder = Path(cfg.output_dir).absolute() / "slurm" / "%j"
    command = [opts.python or sys.executable, "-m", "experiments.cli", "run", path, *overrides, *extra]
    job = PipelineJob(command, {"MLFLOW_TRACKING_URI": uri}, os.getcwd())
    if dry_run:
        problem = None if opts.allow_sqlite else sqlite_store_problem(uri, "--allow-sqlite")
        from datamodules.redaction import redact

        print(redact(_preview(opts, cfg.name, folder, job, problem)))  # a URI or an env value may hold a secret
        return None
    make = executor or slurm_executor
    submitted = make(opts, folder, cfg.name).submit(job)
    print(f"submitted SLURM job {submitted.job_id}: {opts.nodes} node(s) x {max(1, opts.gpus_per_node)} task(s), "
          f"logs in {str(folder).replace('%j', str(submitted.job_id))}; requeued up to {opts.max_requeues} time(s) "
          "at its time limit, resuming each time")
    return submitted


def _preview(opts, job_name: str, folder: Path, job: PipelineJob, problem: Optional[str]) -> str:
    """What `run --launcher slurm --dry-run` prints: parameters, sbatch script, the task's command."""
    params = sbatch_parameters(opts, job_name)
    lines = [f"slurm: {opts.nodes} node(s) x {max(1, opts.gpus_per_node)} task(s) (one per GPU); logs in {folder}",
             f"requeue: up to {opts.max_requeues} time(s) at the time limit (launcher.max_requeues), resuming the pipeline",
             "sbatch parameters: " + " ".join(f"{k}={v}" for k, v in params.items()),
             "--- sbatch script ---", sbatch_script(slurm_executor(opts, folder, job_name, preview=True)),
             "each task runs: " + job.describe()]
    if problem:
        lines.append(f"would be refused: {problem}")
    lines.append("dry run: nothing submitted")
    return "\n".join(lines)
