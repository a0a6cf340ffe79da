"""Shared fixtures: the tiny random Llama (built once per machine in the user cache) and a temp MLflow store."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from lightning_modules.components.base_model import TINY, resolve_model_path

    return resolve_model_path(TINY)


@pytest.fixture()
def tiny_model(tiny_model_path):
    """A fresh (model, tokenizer) per test: tests mutate models by injecting experts."""
    from lightning_modules.components.base_model import load_base_model

    return load_base_model("tiny-random-llama")


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
