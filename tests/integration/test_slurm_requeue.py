"""SLURM jobs requeue at their time limit and resume, run here on submitit's local executor.

submitit's local executor plays the cluster: its controller restarts a task that exits for a requeue
under the same job id, as `scontrol requeue` keeps the SLURM job id. The time limit is simulated as
SLURM does it: USR2 to every process of the job (sbatch --signal=USR2@90 reaches the whole step).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import submitit
import yaml

from experiments.slurm import PipelineJob, sbatch_parameters, submit_pipeline
from experiments.sweep import LauncherSpec, load_sweep, run_sweep
from experiments.sweep.launchers import SlurmLauncher

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A stand-in pipeline: the first attempt records its start and works until SIGTERM (the pipeline's
# interrupt), recording that it was stopped; a later attempt sees the record and finishes at once.
RESUMABLE = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
if (out / "started").exists():
    (out / "resumed").write_text("1"); sys.exit(0)
signal.signal(signal.SIGTERM, lambda *a: ((out / "stopped").write_text("1"), sys.exit(130)))
(out / "started").write_text("1")
time.sleep(120)
"""


def local_executor(folder: Path, max_requeues: int, timeout_min: float = 10):
    """submitit's local executor; with timeout_min=10 every USR2 counts as a time-limit signal
    (submitit deems a job timed out past min(0.8 x limit, limit - 10 min) of its run)."""
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(timeout_min=timeout_min)
    return executor


def signal_time_limit(job_id: str, ready: Path, timeout_s: float = 120) -> int:
    """Once `ready` exists, send USR2 to every process of local job `job_id` (its controller's pid),
    as SLURM does near the time limit. Returns how many processes got it."""
    controller = psutil.Process(int(job_id))
    deadline = time.time() + timeout_s
    while not ready.exists():
        assert controller.is_running() and time.time() < deadline, f"{ready} did not appear"
        time.sleep(0.1)
    tree = controller.children(recursive=True)
    for proc in tree:
        proc.send_signal(signal.SIGUSR2)
    return len(tree)


def test_a_job_at_its_time_limit_is_requeued_under_the_same_id_and_resumes(tmp_path):
    (tmp_path / "work").mkdir()
    job_fn = PipelineJob([sys.executable, "-c", RESUMABLE, str(tmp_path / "work")], {}, str(tmp_path))
    job = local_executor(tmp_path / "jobs", max_requeues=1).submit(job_fn)
    first_id = job.job_id
    assert signal_time_limit(job.job_id, tmp_path / "work" / "started") >= 2  # the task and the pipeline below it
    assert job.result() == 0
    assert job.job_id == first_id
    work = tmp_path / "work"
    assert (work / "stopped").exists(), "the pipeline was not stopped through its interrupt (SIGTERM) before the requeue"
    assert (work / "resumed").exists()
    log = job.stdout() + job.stderr()
    assert "pipeline stopped for requeue 1" in log and "attempt 2 of this job (requeued)" in log


def test_max_requeues_caps_time_limit_requeues(tmp_path):
    (tmp_path / "work").mkdir()
    job_fn = PipelineJob([sys.executable, "-c", RESUMABLE, str(tmp_path / "work")], {}, str(tmp_path))
    job = local_executor(tmp_path / "jobs", max_requeues=0).submit(job_fn)
    signal_time_limit(job.job_id, tmp_path / "work" / "started")
    job.wait()
    assert "timed-out too many times" in str(job.exception())
    assert not (tmp_path / "work" / "resumed").exists()


class LocalClusterLauncher(SlurmLauncher):
    """The sweep's slurm launcher with submitit's local executor as the cluster: the same PipelineJob,
    parameters and requeue cap; only where the job runs differs."""

    poll_s = 0.5

    def _executor(self, job_name: str, preview: bool = False):
        executor = local_executor(self.folder, self.opts.max_requeues, timeout_min=self.opts.time_min)
        executor.update_parameters(**sbatch_parameters(self.opts, job_name))
        return executor


def sft_sweep(tmp_path: Path, **launcher) -> Path:
    """One adapter_sft trial of 8 steps with a checkpoint every 2: the time limit lands mid-training."""
    spec = {"base": "experiments/smoke.yaml", "output_dir": str(tmp_path / "sweep"),
            "overrides": ["stages=[adapter_sft]", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2",
                          "adapter_sft.batch_size=4"],
            "parameters": {"adapter_sft.lr": [0.0002]},
            "objective": {"metric": "val/loss/*", "direction": "minimize", "stage": "adapter_sft"},
            "launcher": {"kind": "slurm", "gpus_per_node": 0, "time_min": 10, **launcher}}
    path = tmp_path / "requeue.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def the_trial(state_file: Path) -> dict:
    trials = json.loads(state_file.read_text())["trials"] if state_file.is_file() else {}
    return next(iter(trials.values()), {})


def test_a_sweep_trial_requeued_at_its_time_limit_resumes_and_is_not_a_failure(tmp_path, mlflow_uri):
    sweep = load_sweep(sft_sweep(tmp_path, max_requeues=1, allow_sqlite=True))  # one machine: SQLite is fine here
    launcher = LocalClusterLauncher(sweep)
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(rc=run_sweep(sweep, launcher=launcher)), daemon=True)
    driver.start()
    state_file = sweep.folder / "sweep_state.json"
    deadline = time.time() + 120
    while not the_trial(state_file).get("job_id"):
        assert driver.is_alive() and time.time() < deadline
        time.sleep(0.1)
    record = the_trial(state_file)
    trial_dir = Path(record["output_dir"])
    signal_time_limit(record["job_id"], trial_dir / "adapter_sft" / "checkpoints" / "step=2.ckpt", timeout_s=240)
    interrupted = json.loads((trial_dir / "adapter_sft" / "state.json").read_text())
    driver.join(timeout=300)
    assert not driver.is_alive() and outcome["rc"] == 0

    after = the_trial(state_file)
    assert after["status"] == "finished" and after["objective"] is not None
    assert after["attempts"] == 1 and after["job_id"] == record["job_id"]  # the same job, followed throughout
    final = json.loads((trial_dir / "adapter_sft" / "state.json").read_text())
    assert final["complete"] and final["result"]["steps"] == 8
    assert final["run_id"] == interrupted["run_id"]  # the stage's MLflow run continued, not duplicated
    logs = "".join(p.read_text() for p in (sweep.folder / "slurm" / record["job_id"]).glob("*_log.*"))
    assert "pipeline stopped for requeue 1" in logs and "attempt 2 of this job (requeued)" in logs
    assert "Restoring states from the checkpoint" in logs  # resumed from step 2, not from scratch

    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("requeue").experiment_id])
    assert sorted(r.data.tags.get("stage") for r in runs) == ["adapter_sft", "pipeline", "sweep"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_run_on_slurm_with_allow_sqlite_submits(tmp_path, mlflow_uri, capsys):
    """`run --launcher slurm --allow-sqlite` gets through to submission; submitit's local executor plays the cluster."""
    def local(opts, folder, job_name):
        return local_executor(folder, opts.max_requeues, timeout_min=opts.time_min)

    out_dir = tmp_path / "out"
    opts = LauncherSpec(kind="slurm", gpus_per_node=0, allow_sqlite=True)
    job = submit_pipeline("smoke", [f"output_dir={out_dir}", "stages=[]"], opts, executor=local)  # a pipeline of no stages
    assert job.result() == 0
    printed = capsys.readouterr()
    assert f"submitted SLURM job {job.job_id}" in printed.out and "(--allow-sqlite given)" in printed.err
    assert "trainer.num_nodes=1" in job.stdout() and "done — MLflow runs" in job.stderr()
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the job logged to the store it was allowed to use
