"""Benchmark suite: data loading and exact scoring against the ``EvalModel`` protocol.

``BUILTIN_BENCHMARKS`` maps benchmark ids to their classes; ``load_yaml_benchmarks`` adds
benchmarks defined by YAML files alone (see experiments/benchmarks/README.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .base import Benchmark, BenchmarkDataError, resolve_data_root
from .emobench import EmoBenchEA, EmoBenchEU
from .eq_bench import EQBench
from .gsm8k import GSM8K
from .mmlu import MMLU
from .mpi import MPI
from .xstest import XSTest
from .yaml_benchmark import YamlBenchmark, YamlSpecError
from .yaml_benchmark import load_yaml_benchmarks as _load_yaml

BUILTIN_BENCHMARKS: dict[str, type[Benchmark]] = {
    "eq_bench": EQBench,
    "emobench_eu": EmoBenchEU,
    "emobench_ea": EmoBenchEA,
    "mpi": MPI,
    "gsm8k": GSM8K,
    "mmlu": MMLU,
    "xstest": XSTest,
}


def load_yaml_benchmarks(folder_or_files: str | Path | Iterable[str | Path], data_root=None,
                         limit: int | None = None, seed: int | None = None) -> dict[str, Benchmark]:
    """YAML-defined benchmarks keyed by name; a name that shadows a built-in id is an error."""
    return _load_yaml(folder_or_files, data_root, limit, seed, reserved=set(BUILTIN_BENCHMARKS))


__all__ = [
    "BUILTIN_BENCHMARKS", "Benchmark", "BenchmarkDataError", "EQBench", "EmoBenchEA", "EmoBenchEU", "GSM8K",
    "MMLU", "MPI", "XSTest", "YamlBenchmark", "YamlSpecError", "load_yaml_benchmarks", "resolve_data_root",
]
