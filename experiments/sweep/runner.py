"""Running a sweep: the parent MLflow run, trials kept in flight by a launcher, statuses, the final report."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any, Optional

from omegaconf import OmegaConf
from rich.console import Console

from datamodules.io import atomic_write_text
from datamodules.redaction import redact
from experiments import registry, tracking
from experiments.config import flatten, load_config
from experiments.sweep.dry_run import dry_run_text
from experiments.sweep.objective import ObjectiveMissing, descendant_runs, objective_value, trial_run_id
from experiments.sweep.plans import make_plan
from experiments.sweep.report import failed_count, ranked_rows, report
from experiments.sweep.schema import Sweep
from experiments.sweep.state import FAILED, FINISHED, INTERRUPTED, RUNNING, STATE_FILE, SweepLock, SweepState
from experiments.sweep.trials import Trial, format_value, trial_env

console = Console(stderr=True, soft_wrap=True)


def run_sweep(sweep: Sweep, dry_run: bool = False, launcher=None) -> int:
    """Run (or with dry_run, print) every trial; 0 when all finished, 1 when some failed.

    launcher: instead of the registered launcher.kind (tests run the slurm launcher on submitit's local executor)."""
    launcher = launcher or registry.LAUNCHERS.get(sweep.spec.launcher.kind)(sweep)
    launcher_overrides = launcher.trial_overrides()
    plan = make_plan(sweep, launcher_overrides)
    if dry_run:
        print(dry_run_text(sweep, plan, launcher))
        return 0
    base_cfg = load_config(sweep.base_path, sweep.spec.overrides)
    uri = tracking.resolve_tracking_uri(base_cfg.tracking.tracking_uri)
    launcher.check(uri)  # before the sweep folder, its MLflow run or any trial exists
    sweep.folder.mkdir(parents=True, exist_ok=True)
    with SweepLock(sweep.folder / ".lock"):
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
        report(sweep, rows, uri, parent)
        failed = failed_count(rows)
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

    def _tell(self, trial: Trial, value: Optional[float]) -> None:
        """Give the plan a trial's result and count the trial as done."""
        self.plan.tell(trial, value)
        self.bar.update(1)

    def _reattach(self) -> dict[str, Any]:
        """Jobs an earlier launch left queued or running (SLURM jobs; local trial processes that outlived a
        killed sweep process) are followed, not started a second time."""
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
                self._tell(trial, self.state.trials.get(trial.id, {}).get("objective"))
                continue
            self.seen.append(trial.id)
            record = self.state.trials.get(trial.id, {})
            if record.get("status") == FINISHED and record.get("config_hash") == trial.config_hash:
                self._tell(trial, record.get("objective"))
                self._say(f"{trial.id} already finished ({trial.describe()}) — skipped")
            elif trial.id in self.reattached:
                self.running[trial.id] = (trial, self.reattached.pop(trial.id))
                self._say(f"{trial.id} following {self.running[trial.id][1].describe()}")
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
                              error=None, objective=None, **handle.record())
            self.running[trial.id] = (trial, handle)
            self._say(f"{trial.id} started ({trial.describe()}), attempt {attempts}"
                      + (f", SLURM job {handle.job_id}" if handle.job_id else f", log {trial.log_file}"))

    def _collect(self) -> bool:
        """Record every trial that ended since the last poll; tag runs that appeared."""
        ended = [tid for tid, (_, handle) in self.running.items() if handle.done()]
        for trial_id, (trial, _) in self.running.items():
            if trial_id not in ended:
                self._tag(trial)
        for trial_id in ended:
            trial, handle = self.running.pop(trial_id)
            outcome = handle.outcome()
            if outcome is None:  # an earlier launch's process ended unobserved: a rerun reports its real result
                self._say(f"{trial.id}: {handle.describe()} has ended; running the trial again to collect its result "
                          "(stages it finished are skipped)")
                self._launch([trial])
            else:
                self._finish(trial, *outcome)
        return bool(ended)

    def _finish(self, trial: Trial, ok: bool, error: str) -> None:
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
        self._tell(trial, value)
        if ok:
            self.client.log_metric(self.parent, "sweep/objective", value, step=record["index"])
            # on the trial's own run too, beside its params: MLflow's parallel-coordinates and
            # scatter charts relate one run's params to that run's metrics
            self.client.log_metric(run_id, "sweep/objective", value)
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
        for key, value in redact(tags).items():
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
    spec = sweep.spec
    tags = {"stage": "sweep", "sweep": sweep.name, "sweep.method": spec.method, "sweep.objective": spec.objective.metric,
            "sweep.direction": spec.objective.direction, "base_config": spec.base, "git_commit": tracking.git_commit()}
    previous = state.data.get("run_id")
    run_id = tracking.open_run(uri, exp_id, sweep.name, tags, key=tracking.run_key(str(sweep.folder.resolve()), "sweep"),
                               previous=previous)
    if run_id == previous:
        return run_id
    structured = OmegaConf.structured(spec)
    tracking.log_params(uri, run_id, flatten(OmegaConf.to_container(structured, resolve=True)))
    spec_file = sweep.folder / "sweep.yaml"
    atomic_write_text(spec_file, redact(OmegaConf.to_yaml(structured)))
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
