"""`personafuse run --launcher slurm`: its flags are the sweep launcher's keys, --dry-run shows the job,
and a SQLite MLflow store is refused before anything is submitted (sweep and run) unless allowed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from experiments import cli
from experiments.sweep import LauncherSpec, SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_flags_are_the_sweep_launcher_keys():
    """One vocabulary: every launcher key a single run can use is a flag of the same name."""
    run = next(a for a in cli._build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    flags = {opt for action in run._actions for opt in action.option_strings}
    keys = {f.name for f in dataclasses.fields(LauncherSpec)} - cli._NOT_RUN_FLAGS
    assert {"--" + k.replace("_", "-") for k in keys} <= flags
    assert {"partition", "nodes", "gpus_per_node", "time_min", "extra_sbatch", "max_requeues", "allow_sqlite"} <= keys


def test_run_dry_run_prints_tasks_per_gpu_sbatch_and_command(tmp_path, mlflow_uri, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "run", "smoke", f"output_dir={out_dir}", "--launcher", "slurm", "--dry-run",
                           "--partition", "gpu-a100", "--nodes", "2", "--gpus-per-node", "4", "--time-min", "240",
                           "--account", "persona", "--extra-sbatch", "qos=high", "--setup", "module load cuda/12.4",
                           "--max-requeues", "5")
    assert code == 0
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=240", "#SBATCH --account=persona", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR2@90", "module load cuda/12.4", "-m submitit.core._submit",
                 "requeue: up to 5 time(s)", "sbatch parameters: job_name=smoke"):
        assert line in out
    command = next(line for line in out.splitlines() if line.startswith("each task runs:"))
    assert f"MLFLOW_TRACKING_URI={mlflow_uri}" in command
    assert "-m experiments.cli run" in command and "trainer.num_nodes=2 trainer.devices=4" in command
    assert "would be refused: MLflow tracking store sqlite:" in out  # the dry run says what a submit would do
    assert not out_dir.exists()


def test_run_refuses_devices_set_by_hand_and_slurm_flags_without_slurm(capsys):
    code, _, err = run_cli(capsys, "run", "smoke", "trainer.devices=8", "--launcher", "slurm", "--dry-run")
    assert code == 2 and "trainer.devices come from --nodes / --gpus-per-node" in err
    code, _, err = run_cli(capsys, "run", "smoke", "--partition", "gpu")
    assert code == 2 and "--partition applies to --launcher slurm only" in err
    with pytest.raises(SystemExit):
        cli.main(["run", "smoke", "--launcher", "slurm", "--max-requeues", "-1"])
    assert "--max-requeues must be >= 0" in capsys.readouterr().err


def test_run_on_slurm_refuses_a_sqlite_store_before_submitting(tmp_path, mlflow_uri, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "smoke", f"output_dir={out_dir}", "--launcher", "slurm", "--partition", "gpu")
    assert code == 2
    assert f"MLflow tracking store {mlflow_uri} is a SQLite file" in err
    assert "mlflow server" in err and "MLFLOW_TRACKING_URI" in err and "--allow-sqlite" in err
    assert not out_dir.exists()  # refused before the job folder (or anything else) was written


def write_sweep(tmp_path: Path, **launcher) -> Path:
    spec = {"base": "experiments/smoke.yaml", "overrides": ["stages=[router]"], "parameters": {"router.hidden": [16]},
            "objective": {"metric": "router/val_f1_micro"}, "output_dir": str(tmp_path / "sweep"),
            "launcher": {"kind": "slurm", **launcher}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_slurm_sweep_refuses_a_sqlite_store_before_anything_starts(tmp_path, mlflow_uri, capsys):
    code, _, err = run_cli(capsys, "sweep", str(write_sweep(tmp_path)))
    assert code == 2 and "is a SQLite file" in err and "launcher.allow_sqlite=true" in err
    assert not (tmp_path / "sweep").exists()


def test_sweep_launcher_validation_names_the_key(tmp_path):
    with pytest.raises(SweepError, match=r"launcher.max_requeues must be >= 0 \(got -1\)"):
        load_sweep(write_sweep(tmp_path, max_requeues=-1))
    with pytest.raises(SweepError, match="launcher.time_min must be >= 1"):
        load_sweep(write_sweep(tmp_path, time_min=0))
