"""Benchmark suite: data loading and exact scoring against the ``EvalModel`` protocol.

``BENCHMARKS`` maps benchmark ids to their classes (the registry: calling one builds the benchmark); ``load_yaml_benchmarks`` adds
benchmarks defined by YAML files alone (see experiments/benchmarks/README.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from datamodules.io import Registry

from .base import Benchmark, BenchmarkDataError, resolve_data_root
from .emobench import EmoBenchEA, EmoBenchEU
from .eq_bench import EQBench
from .gsm8k import GSM8K
from .mmlu import MMLU
from .mpi import MPI
from .persona_expression import PersonaExpression
from .xstest import XSTest
from .yaml_benchmark import YamlBenchmark, YamlSpecError
from .yaml_benchmark import load_yaml_benchmarks as _load_yaml

BENCHMARKS = Registry("benchmark")
"""Built-in benchmarks: add one with a class here and one line below (or with a YAML file alone)."""
BENCHMARKS.add("eq_bench", EQBench, "EQ-Bench v2 emotion-intensity prediction")
BENCHMARKS.add("emobench_eu", EmoBenchEU, "EmoBench emotional understanding")
BENCHMARKS.add("emobench_ea", EmoBenchEA, "EmoBench emotional application")
BENCHMARKS.add("mpi", MPI, "MPI-120 Big Five questionnaire")
BENCHMARKS.add("gsm8k", GSM8K, "GSM8K grade-school maths")
BENCHMARKS.add("mmlu", MMLU, "MMLU multiple choice")
BENCHMARKS.add("xstest", XSTest, "XSTest exaggerated safety")
BENCHMARKS.add("persona_expression", PersonaExpression,
               "built-in: do replies to held-out curated situations express the poles their labels call for?")


def load_yaml_benchmarks(folder_or_files: str | Path | Iterable[str | Path], data_root=None,
                         limit: int | None = None, seed: int | None = None) -> dict[str, Benchmark]:
    """YAML-defined benchmarks keyed by name; a name that shadows a built-in id is an error."""
    return _load_yaml(folder_or_files, data_root, limit, seed, reserved=set(BENCHMARKS))


__all__ = [
    "BENCHMARKS", "Benchmark", "BenchmarkDataError", "EQBench", "EmoBenchEA", "EmoBenchEU", "GSM8K",
    "MMLU", "MPI", "PersonaExpression", "XSTest", "YamlBenchmark", "YamlSpecError", "load_yaml_benchmarks", "resolve_data_root",
]
