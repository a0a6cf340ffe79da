"""Shared pieces of the benchmark suite: data root, strict file readers, subsets, scoring loop.

Every benchmark is a plain class with the same small surface:
``load_items()`` -> deterministic items, ``evaluate(model, batch_size)`` -> (metrics, records),
``score_records(records)`` -> metrics recomputed from the records alone. ``evaluate`` builds its
metrics by calling ``score_records`` on the records it returns, and ``score_records`` re-derives
every parsed answer from the raw output / log-likelihoods stored in each record, so a saved
records file can be re-scored later and always reproduces the logged numbers exactly.
"""
from __future__ import annotations

import csv
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from datamodules.io import DataError, iter_jsonl
from datamodules.io import read_json as _read_json

from .eval_model import Conversation, EvalModel

ENV_VAR = "PERSONAFUSE_BENCHMARKS"
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ROOT = Path("~/.cache/personafuse/benchmarks")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkDataError(DataError):
    """A benchmark file is missing or does not match its documented format."""


def resolve_data_root(configured: str | os.PathLike | None = None) -> Path:
    """Pick the data root: config, then $PERSONAFUSE_BENCHMARKS, then ../shared/benchmarks, then the cache.

    Resolution is pure (nothing is created or downloaded) so runs stay offline and reproducible.
    """
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    shared = REPO_ROOT.parent / "shared" / "benchmarks"
    if shared.is_dir():
        return shared
    return CACHE_ROOT.expanduser()


def slug(text: str) -> str:
    """Metric-key-safe lower snake case ("Personal-Others" -> "personal_others")."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def mean(values: Iterable[float]) -> float:
    """Exactly rounded float64 mean (math.fsum); 0.0 for no values so metric dicts stay finite.

    Plain Python rather than torchmetrics: every bootstrap interval re-aggregates a benchmark's
    records about a thousand times, and a MeanMetric costs ~180 us per call against ~2 us here.
    Local by design: evaluation runs per rank and nothing here may wait for other ranks."""
    values = [float(v) for v in values]
    return math.fsum(values) / len(values) if values else 0.0


def select_subset(items: list[dict], limit: int | None, seed: int) -> list[dict]:
    """Seeded subset of ``limit`` items kept in file order; the same call always gives the same items."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split into consecutive batches of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def user_turn(content: str, system: str | None = None) -> Conversation:
    """A one-question conversation, optionally behind a system prompt."""
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": content}]


def lettered(options: Sequence[str], letters: Sequence[str] = LETTERS) -> str:
    """Render options as "A. text" lines, the layout the letter log-likelihood is asked about."""
    return "\n".join(f"{letters[i]}. {text}" for i, text in enumerate(options))


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def softmax(values: Sequence[float]) -> list[float]:
    """Numerically stable softmax over option log-likelihoods."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def keyed_questionnaire_metrics(prefix: str, records: Sequence[dict]) -> dict[str, float]:
    """Acquiescence and acquiescence-adjusted dimension scores for a keyed Likert questionnaire.

    Why: a model that agrees (or disagrees) with every statement shifts each dimension by that bias
    times its keying imbalance (MPI-120 has 18 of 24 extraversion items forward-keyed but only 7 of
    24 agreeableness items), which reads as a trait change. Each record needs ``dimension``,
    ``reverse`` (bool), ``expected_score`` and ``option_scores``. ``<prefix>/acquiescence`` is the
    mean expected agreement over all items (on the option scale, its midpoint = no bias);
    ``<prefix>/<dimension>_adjusted`` is the expected score after subtracting that bias from every
    item, the usual within-respondent correction for balanced inventories.
    """
    if not records:
        return {}
    mid = [(min(r["option_scores"]) + max(r["option_scores"])) / 2 for r in records]
    sign = [-1.0 if r["reverse"] else 1.0 for r in records]
    agreement = [m + s * (r["expected_score"] - m) for r, m, s in zip(records, mid, sign)]
    bias = [a - m for a, m in zip(agreement, mid)]
    acquiescence = mean(bias)
    metrics = {f"{prefix}/acquiescence": mean(agreement)}
    groups: dict[str, list[float]] = {}
    for record, s in zip(records, sign):
        groups.setdefault(record["dimension"], []).append(record["expected_score"] - s * acquiescence)
    for dimension, adjusted in sorted(groups.items()):
        metrics[f"{prefix}/{dimension}_adjusted"] = mean(adjusted)
    return metrics


class Benchmark:
    """Base of every benchmark: subclasses read items, run one batch, and score one record."""

    name: str = ""  # benchmark id, also the metric prefix

    def __init__(self, data_root: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0):
        self.data_root = resolve_data_root(data_root)
        self.limit = limit
        self.seed = seed
        self._all_items: list[dict] | None = None

    # ----- data -------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        """Absolute path of a benchmark file, with an error naming benchmark, file and root when absent."""
        path = Path(relative) if Path(relative).is_absolute() else self.data_root / relative
        if not path.is_file():
            raise BenchmarkDataError(
                f"benchmark '{self.name}': expected file '{relative}' not found (looked for {path}; "
                f"data root tried: {self.data_root}). Configure the data root, set ${ENV_VAR}, or run "
                "datamodules.benchmarks.download.download_benchmarks()."
            )
        return path

    def read_items(self) -> list[dict]:
        """Every item of the benchmark in file order, validated; subclasses implement."""
        raise NotImplementedError

    def load_items(self) -> list[dict]:
        """The evaluated items: the seeded ``limit`` subset of ``read_items`` (read once, copied out)."""
        if self._all_items is None:
            self._all_items = self.read_items()
        return [dict(item) for item in self.select(self._all_items)]

    def select(self, items: list[dict]) -> list[dict]:
        """Subset rule; benchmarks with strata (traits, subjects) override it."""
        return select_subset(items, self.limit, self.seed)

    # ----- evaluation -------------------------------------------------------------------
    def evaluate(self, model: EvalModel, batch_size: int = 8) -> tuple[dict[str, float], list[dict]]:
        """Run the model over the items in batches and score; metrics == score_records(records)."""
        items = self.load_items()
        records: list[dict] = []
        batches = batched(items, batch_size)
        # tqdm rather than rich: it nests under a running Lightning/rich display instead of raising
        for batch in tqdm(batches, desc=f"{self.name} ({len(items)} items)", unit="batch", leave=False, disable=None):
            for record in self.run_batch(model, batch):
                record.update(self.score_record(record))
                records.append(record)
        return self.score_records(records), records

    def run_batch(self, model: EvalModel, batch: Sequence[dict]) -> list[dict]:
        """Query the model for a batch and return raw records (prompt, output, reference)."""
        raise NotImplementedError

    def score_record(self, record: dict) -> dict:
        """Derived fields (parsed answer, score/correct) from one record's raw output only."""
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Metrics from records whose derived fields are fresh; subclasses implement."""
        raise NotImplementedError

    def score_records(self, records: list[dict]) -> dict[str, float]:
        """Recompute every derived field from the raw outputs, then aggregate."""
        fresh = [{**record, **self.score_record(record)} for record in records]
        return self.aggregate(fresh)


# ----- model calls shared by the log-likelihood benchmarks --------------------------------
def checked_option_logprobs(
    model: EvalModel, conversations: Sequence[Conversation], options: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Call ``option_logprobs`` and fail loudly if the model returns a wrongly shaped answer."""
    scores = model.option_logprobs(conversations, options)
    if len(scores) != len(conversations) or any(len(s) != len(o) for s, o in zip(scores, options)):
        raise RuntimeError("EvalModel.option_logprobs returned a result whose shape does not match the options")
    return [[float(v) for v in row] for row in scores]


def checked_generate(model: EvalModel, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
    """Call ``generate`` and check one reply per conversation."""
    replies = model.generate(conversations, max_new_tokens)
    if len(replies) != len(conversations):
        raise RuntimeError(f"EvalModel.generate returned {len(replies)} replies for {len(conversations)} prompts")
    return [str(r) for r in replies]


# ----- strict readers ---------------------------------------------------------------------
def _fail(benchmark: str, path: Path, where: str, problem: str) -> BenchmarkDataError:
    return BenchmarkDataError(f"benchmark '{benchmark}': {path}{where}: {problem}")


def read_json(benchmark: str, path: Path) -> Any:
    """Parse a JSON file (datamodules.io.read_json); a syntax error reports file:line and the benchmark."""
    try:
        return _read_json(path)
    except DataError as err:
        raise BenchmarkDataError(f"benchmark '{benchmark}': {err}") from None


def read_jsonl(benchmark: str, path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Parse JSON Lines (datamodules.io.iter_jsonl) into dicts with a ``_line`` entry; each needs the
    ``required`` keys (errors: file:line and the benchmark)."""
    rows = []
    try:
        for lineno, row in iter_jsonl(path):
            require_keys(benchmark, path, lineno, row, required)
            rows.append({**row, "_line": lineno})
    except BenchmarkDataError:
        raise
    except DataError as err:
        raise BenchmarkDataError(f"benchmark '{benchmark}': {err}") from None
    return rows


def require_keys(benchmark: str, path: Path, lineno: int | str, row: Any, required: Sequence[str]) -> None:
    """Check ``row`` is an object holding every required key."""
    if not isinstance(row, dict):
        raise _fail(benchmark, path, f":{lineno}", f"expected an object, got {type(row).__name__}")
    missing = [key for key in required if key not in row]
    if missing:
        raise _fail(benchmark, path, f":{lineno}", f"missing key(s) {missing}")


def read_csv(benchmark: str, path: Path, required: Sequence[str] = (), columns: Sequence[str] | None = None) -> list[dict]:
    """Read a CSV into dicts with a ``_line`` entry; header (or given ``columns``) must hold ``required``."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = list(columns) if columns is not None else next(reader, None)
        if header is None:
            raise _fail(benchmark, path, ":1", "empty file, expected a header row")
        missing = [c for c in required if c not in header]
        if missing:
            raise _fail(benchmark, path, ":1", f"missing column(s) {missing} (header: {header})")
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise _fail(benchmark, path, f":{reader.line_num}", f"expected {len(header)} columns, got {len(cells)}")
            rows.append({**dict(zip(header, cells)), "_line": reader.line_num})
    return rows


def format_error(benchmark: str, path: Path, lineno: int | str, problem: str) -> BenchmarkDataError:
    """Public helper for subclasses: an error naming benchmark, file, line and problem."""
    return _fail(benchmark, path, f":{lineno}", problem)


