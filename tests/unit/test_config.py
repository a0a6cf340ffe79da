"""Config errors name the key and the file, suggest the right key, exit non-zero and write nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import ConfigError, ExperimentConfig, flatten, help_text, load_config, to_container

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT_YAMLS = sorted(p for p in (ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=lambda p: p.name)
def test_every_shipped_experiment_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig) and cfg.stages


def test_typo_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"max_stepz.*did you mean 'trainer.max_steps'"):
        load_config(ROOT / "experiments/quickstart.yaml", ["trainer.max_stepz=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"wrong type for key 'trainer.max_steps'"):
        load_config(ROOT / "experiments/quickstart.yaml", ["trainer.max_steps=abc"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [router]\nrouter:\n  hiden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'router.hiden' — did you mean 'router.hidden'"):
        load_config(bad)


def test_unregistered_names_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [routr]\n")
    with pytest.raises(ConfigError, match=r"unknown stage 'routr' — did you mean 'router'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown system"):
        load_config(ROOT / "experiments/smoke.yaml", ["evaluate.systems=[base,personafusion]"])


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [router\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(broken)


def test_name_defaults_to_file_stem_and_output_dir_follows():
    cfg = load_config(ROOT / "experiments/smoke.yaml")
    assert cfg.name == "smoke" and cfg.output_dir == "outputs/smoke"


def test_flatten_gives_dotted_params():
    params = flatten(to_container(load_config(ROOT / "experiments/smoke.yaml")))
    assert params["model.name_or_path"] == "tiny-random-llama" and "router.loss.bce" in params


def test_help_lists_every_key_with_its_doc():
    text = help_text()
    assert "trainer.max_steps" in text and "Optimizer steps per training stage" in text


@pytest.mark.parametrize("override", ["trainer.max_stepz=3", "trainer.max_steps=abc"])
def test_cli_fails_cleanly_and_creates_no_run(tmp_path, override):
    env_store = tmp_path / "mlruns"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/quickstart.yaml"), override,
         f"output_dir={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{env_store}/db"},
    )
    assert proc.returncode == 2
    assert "max_step" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not env_store.exists() and not (tmp_path / "mlruns").exists()


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "key=value" in out.stdout
