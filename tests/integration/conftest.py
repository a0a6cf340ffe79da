"""The uninterrupted smoke pipeline, run once per session: the smoke tests inspect it and the
fault-injection suite compares its killed-and-resumed runs against it."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.config import load_config
from experiments.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _benchmark_data_present() -> bool:
    from datamodules.benchmarks import resolve_data_root

    return (resolve_data_root(None) / "eq_bench").is_dir()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    if not _benchmark_data_present():
        pytest.skip("benchmark files not found (../shared/benchmarks or $PERSONAFUSE_BENCHMARKS); see README 'Add a benchmark'")
    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(ROOT / "experiments/smoke.yaml", [f"output_dir={tmp / 'out'}", f"tracking.tracking_uri={uri}"])
    results = run_pipeline(cfg)
    return cfg, uri, results, tmp
