"""Where trials run: `local` subprocesses or `slurm` jobs through submitit, and their --dry-run previews.

A launcher has `poll_s`, `capacity(total)`, `check(tracking_uri)` (refuses before anything starts),
`trial_overrides()`, `launch(trials, env)` -> handles,
`reattach(record)`, `preview(trials, env)` and `stop(handles)`; a handle has `job_id`, `record()`
(what sweep_state.json keeps to find it again), `done()` and `outcome()` -> (ok, error), or None
when the launcher cannot know how the trial ended (then the sweep runs it again to find out).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from experiments.slurm import (
    PipelineJob, check_tracking_store, lightning_overrides, sbatch_script, slurm_executor,
    sqlite_store_problem,
)
from experiments.sweep.schema import Sweep, SweepError
from experiments.sweep.trials import Trial, override_key, trial_command

console = Console(stderr=True, soft_wrap=True)


def _trial_lines(trial: Trial, note: str = "") -> list[str]:
    """A trial's header for --dry-run: its id, varied values and every override it gets."""
    return [f"{trial.id}  {trial.describe()}{note}", f"  overrides: {shlex.join(trial.overrides)}"]


class LocalLauncher:
    """Trials as subprocesses on this machine, `parallel` at a time, each logging to <trial>/trial.log."""

    poll_s = 0.5

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def capacity(self, total: int) -> int:
        return self.sweep.spec.launcher.parallel

    def check(self, tracking_uri: str) -> None:
        """Trials on this machine may share any store, SQLite included."""

    def trial_overrides(self) -> list[str]:
        return []

    def launch(self, trials: list[Trial], env: dict[str, str]) -> list["LocalHandle"]:
        handles = []
        for trial in trials:
            trial.output_dir.mkdir(parents=True, exist_ok=True)
            log = open(trial.log_file, "ab")
            # Same process group as the sweep: Ctrl-C (or killing the group) stops trials too.
            proc = subprocess.Popen(trial_command(self.sweep, trial), env={**os.environ, **env},
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            handles.append(LocalHandle(proc, trial.log_file))
        return handles

    def reattach(self, record: dict) -> Optional["OrphanHandle"]:
        """A trial process that an earlier launch started and that still runs (that launch was killed
        with -9 and could not stop it) is waited for, not started a second time on the same folder.
        None for a trial whose process is gone: it is run again and resumes."""
        pid, host = record.get("pid"), record.get("host")
        if not pid:
            return None
        if host != socket.gethostname():
            console.print(f"[yellow]warning[/]: {record.get('output_dir')} was started on {host}, where this sweep "
                          "cannot see whether it still runs; starting it again (its pipeline lock refuses a second run)")
            return None
        if process_started(pid) != record.get("pid_started"):  # gone, or the pid now belongs to another process
            return None
        return OrphanHandle(pid, record["pid_started"])

    def preview(self, trials: list[Trial], env: dict[str, str]) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines = [f"launcher local: {self.sweep.spec.launcher.parallel} trial(s) at a time, in this process group"]
        for trial in trials:
            lines += _trial_lines(trial) + [f"  command: {prefix} {shlex.join(trial_command(self.sweep, trial))}"]
        return "\n".join(lines)

    def stop(self, handles: list["LocalHandle"]) -> None:
        for handle in handles:
            handle.terminate()


def process_started(pid: int) -> Optional[float]:
    """When process `pid` started, or None when no such process runs (a zombie counts as ended). With the
    pid it identifies one process: a pid the OS has reused since has another start time."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else round(proc.create_time(), 2)
    except psutil.Error:
        return None


class LocalHandle:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log, self.job_id = proc, log, None

    def record(self) -> dict:
        """The process's identity, so a relaunch after this sweep process is killed can find it running."""
        return {"job_id": None, "pid": self.proc.pid, "host": socket.gethostname(),
                "pid_started": process_started(self.proc.pid)}

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


class OrphanHandle:
    """A trial process started by an earlier, killed launch of this sweep (so not this process's child).
    Its exit code cannot be read, so outcome() is None: the sweep then runs the trial again, which
    skips the stages it finished and reports the real result."""

    def __init__(self, pid: int, started: float) -> None:
        self.pid, self.started, self.job_id = pid, started, None

    def describe(self) -> str:
        return f"process {self.pid}, left running by an earlier launch of this sweep"

    def done(self) -> bool:
        return process_started(self.pid) != self.started

    def outcome(self) -> None:
        return None

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after 20 s, like LocalHandle (it is not a child: poll instead of wait)."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if self.done():
                return
            os.kill(self.pid, sig)
            deadline = time.monotonic() + grace
            while not self.done() and time.monotonic() < deadline:
                time.sleep(0.2)


class SlurmLauncher:
    """One submitit job per trial (or one job array): nodes x gpus_per_node tasks, one per GPU.

    Each job runs a `PipelineJob`: at its time limit submitit requeues it under the same job id and the
    trial's pipeline resumes, so sweep_state.json keeps following the same job and a requeue is not a failure."""

    poll_s = 15.0

    def __init__(self, sweep: Sweep) -> None:
        self.sweep, self.opts = sweep, sweep.spec.launcher
        self.folder = sweep.folder / "slurm" / "%j"

    def capacity(self, total: int) -> int:
        return max(total, 1) if self.opts.array else self.opts.parallel

    def check(self, tracking_uri: str) -> None:
        """Before anything is submitted: trials on several nodes must not share a SQLite MLflow store."""
        check_tracking_store(tracking_uri, self.opts.allow_sqlite, "launcher.allow_sqlite=true")

    def trial_overrides(self) -> list[str]:
        """Lightning's devices and num_nodes must match the tasks SLURM starts, or ranks wait forever."""
        fixed = lightning_overrides(self.opts)
        given = [override_key(item) for item in self.sweep.spec.overrides] + list(self.sweep.spec.parameters)
        clash = sorted(set(given) & set(fixed))
        if clash:
            raise SweepError(f"{self.sweep.source}: {', '.join(clash)} come from launcher.nodes / launcher.gpus_per_node "
                             "under slurm; remove them from overrides/parameters")
        return [f"{k}={v}" for k, v in fixed.items()]

    def _job_name(self, trial: Trial) -> str:
        return f"{self.sweep.name}-{trial.id}"

    def _executor(self, job_name: str, preview: bool = False):
        executor = slurm_executor(self.opts, self.folder, job_name, preview=preview)
        executor.update_parameters(array_parallelism=self.opts.parallel)  # the job array's %N throttle
        return executor

    def _function(self, trial: Trial, env: dict[str, str]) -> PipelineJob:
        """The trial's command with the sweep's `env` added to the node's own (SLURM_*) variables."""
        return PipelineJob(trial_command(self.sweep, trial, self.opts.python), env, os.getcwd())

    def launch(self, trials: list[Trial], env: dict[str, str]) -> list["SlurmHandle"]:
        if self.opts.array and len(trials) > 1:
            executor = self._executor(self.sweep.name)
            with executor.batch():
                jobs = [executor.submit(self._function(t, env)) for t in trials]
        else:
            jobs = [self._executor(self._job_name(t)).submit(self._function(t, env)) for t in trials]
        return [SlurmHandle(job) for job in jobs]

    def reattach(self, record: dict) -> Optional["SlurmHandle"]:
        """Follow a job submitted by an earlier launch of this sweep instead of submitting it again."""
        if not record.get("job_id"):
            return None
        import submitit

        return SlurmHandle(submitit.SlurmJob(folder=self.folder, job_id=record["job_id"]))

    def _sbatch_script(self, job_name: str, map_count: Optional[int] = None) -> str:
        """The sbatch script submitit would write for one job (or, with map_count, a job array)."""
        return sbatch_script(self._executor(job_name, preview=True), map_count)

    def preview(self, trials: list[Trial], env: dict[str, str]) -> str:
        """The sbatch script(s) submitit would write, and the command each task runs."""
        lines = [f"launcher slurm: {'one job array' if self.opts.array else 'one job per trial'}, "
                 f"{self.opts.nodes} node(s) x {max(1, self.opts.gpus_per_node)} task(s); logs in {self.folder}",
                 f"requeue: up to {self.opts.max_requeues} time(s) at the time limit (launcher.max_requeues); "
                 "the trial resumes under the same job id"]
        problem = None if self.opts.allow_sqlite else sqlite_store_problem(env["MLFLOW_TRACKING_URI"], "launcher.allow_sqlite=true")
        if problem:
            lines.append(f"would be refused: {problem}")
        if self.opts.array:
            lines += ["--- sbatch script (job array) ---", self._sbatch_script(self.sweep.name, map_count=len(trials))]
        for i, trial in enumerate(trials):
            lines += _trial_lines(trial, f"  (array task {i})" if self.opts.array else "")
            if not self.opts.array:
                lines += ["--- sbatch script ---", self._sbatch_script(self._job_name(trial))]
            lines.append("  each task runs: " + self._function(trial, env).describe())
        return "\n".join(lines)

    def stop(self, handles: list["SlurmHandle"]) -> None:
        ids = " ".join(h.job_id for h in handles)
        if ids:
            console.print(f"[yellow]SLURM jobs keep running[/]: {ids} — rerun the sweep to collect them, or `scancel {ids}`")


class SlurmHandle:
    def __init__(self, job) -> None:
        self.job, self.job_id = job, str(job.job_id)

    def record(self) -> dict:
        return {"job_id": self.job_id}

    def describe(self) -> str:
        return f"SLURM job {self.job_id}"

    def done(self) -> bool:
        return self.job.done()

    def outcome(self) -> tuple[bool, str]:
        error = self.job.exception()
        return (error is None), ("" if error is None else f"job {self.job_id}: {str(error).strip()[-800:]}")
