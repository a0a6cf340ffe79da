"""The whole run is checked before its first stage: one line naming the key (and file), exit 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import ConfigError, load_config
from experiments.validation import preflight

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments/smoke.yaml"


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=-1", "trainer.max_steps"),  # trained forever
    ("lora.r=0", "lora.r"),  # divided by zero
    ("adapter_sft.lr=0", "adapter_sft.lr"),
    ("router.lr=-1e-3", "router.lr"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("datagen.min_accepted_fraction=2", "datagen.min_accepted_fraction"),
    ("datagen.teacher.timeout_s=0", "datagen.teacher.timeout_s"),
    ("evaluate.judge.teacher.max_new_tokens=0", "evaluate.judge.teacher.max_new_tokens"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("evaluate.benchmarks.mpi.limit=-2", "evaluate.benchmarks.mpi.limit"),
    ("data.on_bad_line=skp", "data.on_bad_line"),
])
def test_out_of_range_value_names_file_and_key(override, key):
    with pytest.raises(ConfigError, match=rf"smoke.yaml: key '{key}': must be"):
        load_config(SMOKE, [override])


def test_fractions_that_leave_no_training_data_are_rejected():
    with pytest.raises(ConfigError, match=r"'data.val_fraction' \+ 'data.test_fraction' must be < 1"):
        load_config(SMOKE, ["data.val_fraction=0.5", "data.test_fraction=0.5"])


def test_benchmark_typo_exits_2_before_any_stage_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", str(SMOKE), "evaluate.benchmarks.eq_bnech.limit=1",
                           f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "key 'evaluate.benchmarks.eq_bnech'" in lines[0] and "did you mean 'eq_bench'" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (["evaluate.benchmarks.eq_bench.options.max_new_tokenz=8"],
     r"key 'evaluate.benchmarks.eq_bench.options.max_new_tokenz': .*did you mean 'max_new_tokens'"),
    (["stages=[adapter_sft,evaluate]"], r"key 'evaluate.systems': system 'sft' needs stage\(s\) \['sft_baseline'\]"),
    (["personas.file=/nonexistent/personas.yaml"], r"persona file not found: /nonexistent/personas.yaml"),
    (["datagen.teacher.kind=openai", "datagen.teacher.model=m"], r"key 'datagen.teacher.base_url' is required"),
    (["datagen.teacher.kind=openai", "datagen.teacher.model=m", "datagen.teacher.base_url=127.0.0.1:8000"],
     r"key 'datagen.teacher.base_url': must be an http"),
    (["datagen.teacher.kind=openai", "datagen.teacher.model=m", "datagen.teacher.base_url=http://127.0.0.1:9/v1",
      "datagen.teacher.api_key_env=PERSONAFUSE_TEST_UNSET_KEY"],
     r"key 'datagen.teacher.api_key_env': environment variable PERSONAFUSE_TEST_UNSET_KEY is not set"),
    (["evaluate.judge.teacher.kind=openai"], r"key 'evaluate.judge.teacher.base_url' is required"),
    (["evaluate.benchmarks.mpi.systems=[base,personafuze]"],
     r"key 'evaluate.benchmarks.mpi.systems': \['personafuze'\] are not in evaluate.systems"),
    (["evaluate.benchmarks.mpi.systems=[personafuse]"], r"key 'evaluate.benchmarks.mpi.systems': include the baseline 'base'"),
    (["trainer.strategy=fsdp", "trainer.accelerator=cpu"],
     r"key 'trainer.strategy': fsdp needs a GPU .*use trainer.strategy=fsdp_cpu"),
    (["trainer.strategy=fsdp_cpu", "stages=[adapter_sft,router,joint]"],
     r"key 'trainer.strategy': fsdp_cpu cannot run stage joint"),
    (["trainer.strategy=fsdp_cpi"], r"key 'trainer.strategy'.*did you mean 'fsdp_cpu'"),
])
def test_preflight_names_the_key(overrides, message, monkeypatch):
    monkeypatch.delenv("PERSONAFUSE_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=message):
        preflight(load_config(SMOKE, overrides))


def test_preflight_accepts_fsdp_cpu():
    preflight(load_config(SMOKE, ["trainer.strategy=fsdp_cpu", "trainer.devices=2", "stages=[adapter_sft,router]"]))


def test_missing_benchmark_data_names_key_and_file(tmp_path):
    cfg = load_config(SMOKE, [f"evaluate.data_root={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"key 'evaluate.benchmarks.eq_bench': .*not found \(looked for {tmp_path}"):
        preflight(cfg)


def test_empty_situations_file_is_an_error(tmp_path):
    empty = tmp_path / "situations.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=rf"key 'data.situations': {empty}: no situations: the file is empty"):
        preflight(load_config(SMOKE, [f"data.situations={empty}"]))


def test_every_shipped_config_passes_preflight_without_a_teacher_key(monkeypatch):
    """quickstart and smoke need no service; paper.yaml's teachers need one, and say which variable."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for name in ("smoke", "quickstart"):
        preflight(load_config(ROOT / f"experiments/{name}.yaml"))


def test_a_benchmark_runs_only_its_systems():
    """evaluate.benchmarks.<id>.systems: jobs for those systems alone, batched together or one by one."""
    from lightning_modules.evaluate import plan_jobs

    cfg = load_config(SMOKE, ["evaluate.benchmarks.mpi.systems=[base,personafuse]"])
    ecfg = cfg.evaluate
    jobs = {(tuple(j.systems), j.benchmark) for j in plan_jobs(ecfg, dict.fromkeys(ecfg.benchmarks))}
    assert (("base", "personafuse"), "mpi") in jobs and not any(b == "mpi" and len(s) > 2 for s, b in jobs)
    assert any(b != "mpi" and s == tuple(ecfg.systems) for s, b in jobs)  # the others: every system
    ecfg.batch_systems = False
    assert sorted(j.systems[0] for j in plan_jobs(ecfg, dict.fromkeys(ecfg.benchmarks)) if j.benchmark == "mpi") == \
        ["base", "personafuse"]
