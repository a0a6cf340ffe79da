"""Sweep files: loading, strict validation, grid / random / TPE expansion, objective lookup, --dry-run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from experiments import cli
from experiments.sweep import (
    FixedPlan, ObjectiveMissing, ObjectiveSpec, SweepError, TPEPlan, format_value, grid_params, load_sweep,
    make_plan, objective_value, sampled_params,
)

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


def write_sweep(tmp_path: Path, name: str = "s", **spec) -> Path:
    """A sweep file on the smoke experiment, with `spec` replacing the defaults below."""
    data = {"base": "experiments/smoke.yaml", "overrides": ["stages=[router]"],
            "parameters": {"router.hidden": [16, 32]}, "objective": {"metric": "router/val_f1_micro"},
            "output_dir": str(tmp_path / "out" / name)}
    data.update(spec)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.name for p in SWEEP_FILES])
def test_every_shipped_sweep_loads_and_expands(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# personafuse sweep sweeps/{path.name}"), "the first line must give the command"
    sweep = load_sweep(path, [f"output_dir={tmp_path}"])  # a TPE plan keeps its study in the sweep folder
    plan = make_plan(sweep, [])
    if isinstance(plan, FixedPlan):
        assert plan.total == len(plan.trials) >= 2
        assert len({t.id for t in plan.trials}) == len(plan.trials)
    else:
        trial = plan.next_trial()
        assert set(trial.params) == {p.key for p in sweep.params}


def test_shipped_sweep_list_is_complete():
    assert {p.stem for p in SWEEP_FILES} >= {"sft_rank_lr", "router_encoder_gate", "router_loss_weights", "smoke_grid"}


def test_grid_is_the_product_in_file_order_with_one_folder_per_trial(tmp_path):
    path = write_sweep(tmp_path, parameters={"router.hidden": [16, 32], "router.lr": [0.001, 0.01]})
    sweep = load_sweep(path)
    assert grid_params(sweep) == [{"router.hidden": 16, "router.lr": 0.001}, {"router.hidden": 16, "router.lr": 0.01},
                                  {"router.hidden": 32, "router.lr": 0.001}, {"router.hidden": 32, "router.lr": 0.01}]
    trials = make_plan(sweep, []).trials
    assert [t.output_dir for t in trials] == [sweep.folder / t.id for t in trials]
    assert all(re.fullmatch(r"trial-[0-9a-f]{10}", t.id) for t in trials)
    first = trials[0].overrides
    assert first[:3] == ["stages=[router]", "router.hidden=16", "router.lr=0.001"]
    assert f"output_dir={sweep.folder / trials[0].id}" in first and "tracking.experiment=s" in first


def test_trial_identity_is_the_resolved_value_not_its_spelling(tmp_path):
    a = make_plan(load_sweep(write_sweep(tmp_path, "a", parameters={"router.lr": [0.001]})), []).trials[0]
    b = make_plan(load_sweep(write_sweep(tmp_path, "b", parameters={"router.lr": ["1e-3"]})), []).trials[0]
    c = make_plan(load_sweep(write_sweep(tmp_path, "c", parameters={"router.lr": [0.002]})), []).trials[0]
    assert a.id == b.id != c.id
    assert a.config_hash == b.config_hash


def test_random_and_tpe_proposals_are_deterministic_given_the_seed(tmp_path):
    params = {"router.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "lora.r": {"low": 4, "high": 64, "log": True},
              "router.gate": {"choices": ["sigmoid", "softmax"]}, "router.dropout": [0.0, 0.1]}
    for method in ("random", "tpe"):
        seed0 = load_sweep(write_sweep(tmp_path, method, method=method, trials=6, seed=0, parameters=params))
        again = load_sweep(write_sweep(tmp_path, method + "_again", method=method, trials=6, seed=0, parameters=params))
        seed1 = load_sweep(write_sweep(tmp_path, method + "_1", method=method, trials=6, seed=1, parameters=params))
        proposals = sampled_params(seed0, 6)
        assert proposals == sampled_params(again, 6)
        assert proposals != sampled_params(seed1, 6)
        for p in proposals:
            assert 1e-4 <= p["router.lr"] <= 1e-1 and isinstance(p["router.lr"], float)
            assert 4 <= p["lora.r"] <= 64 and isinstance(p["lora.r"], int)  # int because LoraConfig.r is int
            assert p["router.gate"] in ("sigmoid", "softmax") and p["router.dropout"] in (0.0, 0.1)
    random_plan = make_plan(load_sweep(write_sweep(tmp_path, "r2", method="random", trials=6, seed=0, parameters=params)), [])
    proposals = sampled_params(load_sweep(write_sweep(tmp_path, "r3", method="random", trials=6, seed=0, parameters=params)), 6)
    assert [t.params for t in random_plan.trials] == proposals  # a random sweep runs exactly the seeded proposals


def test_tpe_plan_asks_and_tells(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, method="tpe", trials=3, parameters={"router.lr": {"low": 1e-4, "high": 1e-2}}))
    plan = make_plan(sweep, [])
    assert isinstance(plan, TPEPlan)
    trials = [plan.next_trial() for _ in range(3)]
    assert plan.next_trial() is None
    plan.tell(trials[0], 0.5)
    plan.tell(trials[1], None)  # a failed trial is told as FAIL, not as a value
    states = sorted(str(t.state) for t in plan.study.trials)
    assert states == ["TrialState.COMPLETE", "TrialState.FAIL", "TrialState.RUNNING"]


TPE_SPACE = {"router.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "lora.r": {"low": 4, "high": 64},
             "router.gate": {"choices": ["sigmoid", "softmax"]}}


def fake_objective(params: dict) -> float:
    """Deterministic in the params, with an optimum TPE can move towards."""
    import math

    return -abs(math.log10(params["router.lr"]) + 2.5) - abs(params["lora.r"] - 24) / 20 + (params["router.gate"] == "softmax")


def tpe_sweep(tmp_path: Path, name: str, **spec):
    data = {"method": "tpe", "trials": 9, "startup_trials": 3, "seed": 7, "parameters": TPE_SPACE}
    data.update(spec)
    return load_sweep(write_sweep(tmp_path, name, **data))


def ask_and_tell(plan, n: int) -> list[dict]:
    """n rounds of the runner's sequential loop, each trial told the fake objective."""
    proposals = []
    for _ in range(n):
        trial = plan.next_trial()
        proposals.append(trial.params)
        plan.tell(trial, fake_objective(trial.params))
    return proposals


def test_tpe_relaunch_resumes_the_study_exactly_including_a_trial_asked_but_not_told(tmp_path):
    uninterrupted = make_plan(tpe_sweep(tmp_path, "whole"), [])
    expected = ask_and_tell(uninterrupted, 9)
    assert uninterrupted.next_trial() is None
    assert len({json.dumps(p, sort_keys=True) for p in expected}) == 9
    assert sampled_params(tpe_sweep(tmp_path, "dry"), 3) == expected[:3]  # what --dry-run lists

    sweep = tpe_sweep(tmp_path, "killed")
    first = make_plan(sweep, [])
    assert ask_and_tell(first, 4) == expected[:4]
    running = first.next_trial()  # asked; the sweep is "killed" before it is told
    assert running.params == expected[4]
    del first

    relaunched = make_plan(tpe_sweep(tmp_path, "killed"), [])  # a new process: only the folder is shared
    earlier = [relaunched.next_trial() for _ in range(5)]
    assert [t.params for t in earlier] == expected[:5]  # told ones for the report, then the one in flight
    for trial in earlier:  # the runner tells finished ones their recorded objective: a no-op for the study
        relaunched.tell(trial, fake_objective(trial.params))
    assert ask_and_tell(relaunched, 4) == expected[5:]
    assert relaunched.next_trial() is None
    stored = relaunched.study.trials
    assert [t.number for t in stored] == list(range(9)) and {str(t.state) for t in stored} == {"TrialState.COMPLETE"}
    assert [t.params for t in stored] == [t.params for t in uninterrupted.study.trials]
    assert (sweep.folder / "optuna.journal").is_file()


def test_tpe_plan_creates_nothing_until_it_is_asked(tmp_path):
    sweep = tpe_sweep(tmp_path, "lazy")
    plan = make_plan(sweep, [])  # what --dry-run builds
    assert not sweep.folder.exists()
    plan.next_trial()
    assert (sweep.folder / "optuna.journal").is_file()


def test_tpe_study_from_another_version_of_the_sweep_file_is_refused(tmp_path):
    ask_and_tell(make_plan(tpe_sweep(tmp_path, "s"), []), 2)
    changed = make_plan(tpe_sweep(tmp_path, "s", seed=8), [])
    with pytest.raises(SweepError, match=r"s\.yaml: seed changed since the TPE study in .*optuna\.journal"):
        changed.next_trial()
    more = make_plan(tpe_sweep(tmp_path, "s", trials=12), [])  # more trials extends the same study
    assert [more.next_trial().params for _ in range(2)] == [t.params for t in more.study.trials[:2]]


@pytest.mark.parametrize("value", [3, 0.001, 1.5e-05, True, None, "base_hidden", ["q_proj", "v_proj"]])
def test_format_value_round_trips_through_omegaconf(value):
    from omegaconf import OmegaConf

    assert OmegaConf.from_dotlist([f"k={format_value(value)}"]).k == value


def test_dry_run_local_prints_every_trial_and_command_and_creates_nothing(tmp_path, mlflow_uri, capsys):
    src = yaml.safe_load((ROOT / "sweeps" / "smoke_grid.yaml").read_text())
    src["output_dir"] = str(tmp_path / "sweep")
    path = tmp_path / "smoke_grid.yaml"
    path.write_text(yaml.safe_dump(src))
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    trials = make_plan(load_sweep(path), []).trials
    assert len(trials) == 4
    for trial in trials:
        assert trial.id in out
        assert "-m experiments.cli run experiments/smoke.yaml" in out
        assert f"output_dir={trial.output_dir}" in out
    assert out.count("command: PERSONAFUSE_PARENT_RUN_ID=") == 4
    assert not (tmp_path / "sweep").exists()
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_dry_run_slurm_prints_the_sbatch_script(tmp_path, mlflow_uri, capsys):
    path = write_sweep(tmp_path, launcher={"kind": "local", "partition": "gpu-a100", "nodes": 2, "gpus_per_node": 4,
                                           "time_min": 240, "account": "persona", "mem_gb": 64,
                                           "extra_sbatch": {"qos": "high"}, "setup": ["module load cuda/12.4"]})
    assert cli.main(["sweep", str(path), "--dry-run", "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=4", "#SBATCH --time=240", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --account=persona", "#SBATCH --mem=64GB", "#SBATCH --qos=high",
                 "module load cuda/12.4", "-m submitit.core._submit"):
        assert line in out
    assert out.count("#!/bin/bash") == 2  # one job per trial
    assert "trainer.num_nodes=2 trainer.devices=4" in out  # Lightning must match the SLURM tasks
    assert not (tmp_path / "out").exists()


def test_dry_run_slurm_array_is_one_script(tmp_path, capsys):
    path = write_sweep(tmp_path, parameters={"router.hidden": [8, 16, 32]},
                       launcher={"kind": "slurm", "array": True, "parallel": 2, "partition": "gpu", "gpus_per_node": 1})
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 1 and "#SBATCH --array=0-2%2" in out


@pytest.mark.parametrize("spec, message", [
    ({"paramters": {"router.hidden": [1]}}, "unknown sweep key 'paramters' — did you mean 'parameters'"),
    ({"launcher": {"partion": "gpu"}}, "unknown sweep key 'launcher.partion' — did you mean 'launcher.partition'"),
    ({"objective": {"metrik": "x"}}, "unknown sweep key 'objective.metrik'"),
    ({"objective": {}}, "missing required key 'objective.metric'"),
    ({"parameters": {"router.hiden": [16]}}, "unknown key 'router.hiden' — did you mean 'router.hidden'"),
    ({"parameters": {"router.hidden": ["wide"]}}, "router.hidden"),
    ({"parameters": {"router.lr": {"low": 0.1, "high": 1}}}, "a grid takes a list of values"),
    ({"method": "random", "trials": 2, "parameters": {"router.lr": {"lo": 0.1, "high": 1}}},
     "parameters.router.lr: unknown range key 'lo' — did you mean 'low'"),
    ({"method": "random", "trials": 2, "parameters": {"router.lr": {"low": 1, "high": 0.1}}}, "a range needs low <= high"),
    ({"method": "random", "trials": 2, "parameters": {"lora.r": {"low": 2.5, "high": 8}}}, "integer key"),
    ({"method": "random", "parameters": {"router.lr": [0.1]}}, "method random needs trials"),
    ({"method": "bayes", "trials": 2}, "method 'bayes' is not one of grid, random, tpe"),
    ({"trials": 3}, "trials applies to random and tpe only"),
    ({"launcher": {"kind": "k8s"}}, "unknown launcher 'k8s'"),
    ({"objective": {"metric": "m", "direction": "up"}}, "objective.direction 'up'"),
    ({"objective": {"metric": "m", "stage": "adapter_sft"}}, "objective.stage 'adapter_sft' is not among the trial's stages"),
    ({"method": "tpe", "trials": 4, "parameters": {"router.lr": {"low": 0.1, "high": 1}},
      "launcher": {"kind": "slurm", "array": True}}, "launcher.array needs every trial up front"),
])
def test_bad_sweep_files_fail_before_anything_starts(tmp_path, spec, message):
    path = write_sweep(tmp_path, **spec)
    with pytest.raises(SweepError) as err:
        make_plan(load_sweep(path), [])
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_slurm_refuses_devices_set_by_hand(tmp_path):
    path = write_sweep(tmp_path, overrides=["stages=[router]", "trainer.devices=8"], launcher={"kind": "slurm"})
    sweep = load_sweep(path)
    from experiments.registry import LAUNCHERS

    with pytest.raises(SweepError, match="trainer.devices come from launcher"):
        LAUNCHERS.get("slurm")(sweep).trial_overrides()


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, paramters={"router.hidden": [1]})
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    assert "did you mean 'parameters'" in capsys.readouterr().err


def _run(stage, metrics, system=None, name="r"):
    return SimpleNamespace(data=SimpleNamespace(tags={"stage": stage, **({"system": system} if system else {})},
                                                metrics=metrics), info=SimpleNamespace(run_name=name))


def test_objective_is_read_from_exactly_one_run():
    runs = [_run("pipeline", {}), _run("adapter_sft", {"val/loss/a": 1.0, "val/loss/b": 3.0, "train/loss": 9.0}),
            _run("router", {"router/val_f1_micro": 0.4})]
    assert objective_value(runs, ObjectiveSpec(metric="router/val_f1_micro")) == 0.4
    assert objective_value(runs, ObjectiveSpec(metric="val/loss/*", stage="adapter_sft")) == 2.0
    with pytest.raises(ObjectiveMissing, match="logged: router/val_f1_micro, train/loss"):
        objective_value(runs, ObjectiveSpec(metric="eq_bench/score"))
    per_system = [_run("evaluate", {"eq_bench/score": s}, system=n, name=n) for n, s in (("base", 1.0), ("personafuse", 2.0))]
    with pytest.raises(ObjectiveMissing, match="set objective.stage / objective.system"):
        objective_value(per_system, ObjectiveSpec(metric="eq_bench/score"))
    assert objective_value(per_system, ObjectiveSpec(metric="eq_bench/score", system="personafuse")) == 2.0


def test_sweep_help_is_there():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "--help"])
    assert exit_.value.code == 0
