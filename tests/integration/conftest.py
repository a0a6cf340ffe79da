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


EVALUATE_ONLY = ["model.name_or_path=tiny-random-llama", "stages=[evaluate]", "evaluate.systems=[base,prompting]",
                 *(f"evaluate.benchmarks.{b}.limit=1" for b in ("eq_bench", "emobench_eu", "emobench_ea", "mpi", "gsm8k",
                                                                 "mmlu", "xstest")),
                 *(f"evaluate.benchmarks.{b}.options.max_new_tokens=4" for b in ("eq_bench", "gsm8k", "xstest")),
                 "evaluate.judge.limit=1", "evaluate.judge.reply_max_new_tokens=8", "evaluate.judge.teacher.max_new_tokens=4",
                 "evaluate.bootstrap_samples=200"]
"""The quickstart's evaluate stage alone (base and prompting need no trained stage) on the tiny model:
the real evaluate folder and MLflow runs in about 20 s."""


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """(output_dir, tracking uri) of a fresh quickstart evaluate run, one per test module: the human-eval
    tests import results into it, which must not touch the session's smoke_run."""
    if not _benchmark_data_present():
        pytest.skip("benchmark files not found (../shared/benchmarks or $PERSONAFUSE_BENCHMARKS)")
    tmp = tmp_path_factory.mktemp("evaluated")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(ROOT / "experiments/quickstart.yaml",
                      [f"output_dir={tmp / 'out'}", f"tracking.tracking_uri={uri}", *EVALUATE_ONLY])
    run_pipeline(cfg)
    return tmp / "out", uri
