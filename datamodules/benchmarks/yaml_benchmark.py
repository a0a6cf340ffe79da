"""A benchmark defined by one YAML file (no code): multiple choice or questionnaire, log-likelihood scored.

See experiments/benchmarks/README.md for the schema and a complete example. Validation is
strict: an unknown or misplaced key, a missing required key or a wrong type raises an error that
names the key and the YAML file, and data rows lacking a referenced field name the data file:line.
"""
from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from .base import (
    LETTERS,
    Benchmark,
    BenchmarkDataError,
    argmax,
    checked_option_logprobs,
    format_error,
    keyed_questionnaire_metrics,
    mean,
    read_csv,
    read_json,
    read_jsonl,
    slug,
    softmax,
    user_turn,
)

FORMATS = ("jsonl", "csv", "json")
KINDS = ("multiple_choice", "questionnaire")
ANSWER_TYPES = ("text", "label", "index")
COMMON_KEYS = {
    "name": str, "file": str, "format": str, "kind": str, "prompt_template": str, "description": str,
    "system_prompt": str, "id_field": str, "question_field": str, "filter": dict, "csv_columns": list,
    "limit": int, "seed": int, "metric_prefix": str, "option_format": str,
}
KIND_KEYS = {
    "multiple_choice": {"options_field": (str, list), "answer_field": str, "answer_type": str,
                        "option_labels": list, "shuffle_options": bool},
    "questionnaire": {"dimension_field": str, "reverse_field": str, "reverse_values": list,
                      "options": list, "dimension_names": dict},
}
REQUIRED = {"name", "file", "format", "kind", "prompt_template"}
KIND_REQUIRED = {"multiple_choice": {"options_field", "answer_field"}, "questionnaire": {"dimension_field", "options"}}


class YamlSpecError(ValueError):
    """The YAML benchmark definition itself is invalid."""


def _check_spec(spec: Any, source: str) -> dict:
    """Strict schema check: known keys only, required keys present, types and enums right."""
    if not isinstance(spec, dict):
        raise YamlSpecError(f"{source}: expected a mapping at the top level")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise YamlSpecError(f"{source}: key 'kind' must be one of {KINDS}, got {kind!r}")
    allowed = {**COMMON_KEYS, **KIND_KEYS[kind]}
    for key, value in spec.items():
        if key not in allowed:
            raise YamlSpecError(f"{source}: unknown key '{key}' for kind {kind} (allowed: {sorted(allowed)})")
        _check_type(key, value, allowed[key], source)
    missing = sorted((REQUIRED | KIND_REQUIRED[kind]) - set(spec))
    if missing:
        raise YamlSpecError(f"{source}: missing required key(s) {missing}")
    if spec["format"] not in FORMATS:
        raise YamlSpecError(f"{source}: key 'format' must be one of {FORMATS}, got {spec['format']!r}")
    if not re.fullmatch(r"[a-z0-9_]+", spec["name"]):
        raise YamlSpecError(f"{source}: key 'name' must be lower snake case, got {spec['name']!r}")
    if kind == "multiple_choice" and spec.get("answer_type", "text") not in ANSWER_TYPES:
        raise YamlSpecError(f"{source}: key 'answer_type' must be one of {ANSWER_TYPES}")
    if kind == "questionnaire":
        _check_questionnaire_options(spec["options"], source)
    return spec


def _check_type(key: str, value: Any, expected, source: str) -> None:
    """Only limit/seed may be null; bools are not accepted where numbers are expected."""
    if value is None and key in ("limit", "seed"):
        return
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
        raise YamlSpecError(f"{source}: key '{key}' has type {type(value).__name__}, expected {expected}")


def _check_questionnaire_options(options: list, source: str) -> None:
    if len(options) < 2:
        raise YamlSpecError(f"{source}: key 'options' needs at least two entries")
    for i, option in enumerate(options):
        if not isinstance(option, dict) or set(option) != {"label", "text", "score"}:
            raise YamlSpecError(f"{source}: key 'options[{i}]' must have exactly label, text, score")
        if not isinstance(option["score"], (int, float)) or isinstance(option["score"], bool):
            raise YamlSpecError(f"{source}: key 'options[{i}].score' must be a number")


def template_fields(template: str) -> set[str]:
    """Top-level field names a str.format template uses."""
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


class YamlBenchmark(Benchmark):
    """Benchmark from a YAML spec; metrics <prefix>/accuracy or <prefix>/<dimension>(_expected, _adjusted)."""

    def __init__(self, data_root=None, limit: int | None = None, seed: int | None = None, *,
                 spec: dict, source: str | Path = "<yaml>"):
        self.source = str(source)
        self.spec = _check_spec(spec, self.source)
        super().__init__(data_root, limit if limit is not None else spec.get("limit"),
                         seed if seed is not None else spec.get("seed") or 0)
        self.name = spec["name"]
        self.prefix = spec.get("metric_prefix") or spec["name"]
        self.kind = spec["kind"]

    @classmethod
    def from_file(cls, path: str | Path, data_root=None, limit: int | None = None, seed: int | None = None):
        """Load and validate one YAML definition."""
        path = Path(path)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise YamlSpecError(f"{path}: invalid YAML ({err})") from err
        return cls(data_root, limit, seed, spec=spec, source=path)

    # ----- reading ----------------------------------------------------------------------
    def _raw_rows(self) -> tuple[Path, list[dict]]:
        path = self.path(self.spec["file"])
        fmt = self.spec["format"]
        if fmt == "jsonl":
            return path, read_jsonl(self.name, path)
        if fmt == "csv":
            return path, read_csv(self.name, path, columns=self.spec.get("csv_columns"))
        data = read_json(self.name, path)
        if isinstance(data, dict):
            return path, [{"_key": key, **row, "_line": f"item {key}"} if isinstance(row, dict) else row
                          for key, row in data.items()]
        if isinstance(data, list):
            return path, [{**row, "_line": f"item {i}"} if isinstance(row, dict) else row for i, row in enumerate(data)]
        raise format_error(self.name, path, 1, "expected a JSON list or object of rows")

    def _needed_fields(self) -> set[str]:
        spec = self.spec
        fields = template_fields(spec["prompt_template"]) - {"options", "question"}
        for key in ("id_field", "question_field", "answer_field", "dimension_field", "reverse_field"):
            if spec.get(key):
                fields.add(spec[key])
        options_field = spec.get("options_field")
        fields.update([options_field] if isinstance(options_field, str) else options_field or [])
        return fields | set(spec.get("filter") or {})

    def read_items(self) -> list[dict]:
        path, rows = self._raw_rows()
        needed = self._needed_fields()
        items = []
        for index, row in enumerate(rows):
            where = row.get("_line", index + 1) if isinstance(row, dict) else index + 1
            if not isinstance(row, dict):
                raise format_error(self.name, path, where, "expected an object row")
            missing = sorted(needed - set(row))
            if missing:
                raise format_error(self.name, path, where, f"missing field(s) {missing} named in {self.source}")
            if all(str(row[k]) == str(v) for k, v in (self.spec.get("filter") or {}).items()):
                items.append(self._item(path, where, index, row))
        return items

    def _item_id(self, index: int, row: dict) -> str:
        if self.spec.get("id_field"):
            return str(row[self.spec["id_field"]])
        return str(row.get("_key", index))

    def _item(self, path: Path, where, index: int, row: dict) -> dict:
        item = {"item_id": self._item_id(index, row)}
        if self.kind == "multiple_choice":
            item.update(self._mc_fields(path, where, item["item_id"], row))
        else:
            item.update(self._questionnaire_fields(path, where, row))
        item["prompt"] = self._render(path, where, row, item)
        return item

    def _mc_fields(self, path: Path, where, item_id: str, row: dict) -> dict:
        spec = self.spec
        field = spec["options_field"]
        raw = row[field] if isinstance(field, str) else [row[c] for c in field]
        if not isinstance(raw, list):
            raise format_error(self.name, path, where, f"field '{field}' must be a list of options")
        options = [str(o) for o in raw]
        labels = [str(x) for x in spec.get("option_labels") or LETTERS[: len(options)]]
        if len(labels) < len(options):
            raise format_error(self.name, path, where, f"{len(options)} options but only {len(labels)} option_labels")
        answer = self._answer_text(path, where, row[spec["answer_field"]], options, labels)
        if spec.get("shuffle_options"):
            random.Random(f"{self.seed}:{item_id}").shuffle(options)
        return {"options": options, "labels": labels[: len(options)], "reference": answer}

    def _answer_text(self, path: Path, where, raw: Any, options: list[str], labels: list[str]) -> str:
        kind = self.spec.get("answer_type", "text")
        try:
            if kind == "label":
                return options[labels.index(str(raw).strip())]
            if kind == "index":
                return options[int(raw)]
        except (ValueError, IndexError) as err:
            raise format_error(self.name, path, where, f"answer {raw!r} is not a valid {kind}") from err
        if str(raw) not in options:
            raise format_error(self.name, path, where, f"answer {raw!r} is not one of the options")
        return str(raw)

    def _questionnaire_fields(self, path: Path, where, row: dict) -> dict:
        spec = self.spec
        raw_dimension = str(row[spec["dimension_field"]])
        dimension = slug(str((spec.get("dimension_names") or {}).get(raw_dimension, raw_dimension)))
        reverse_values = [str(v) for v in spec.get("reverse_values") or ["-1"]]
        reverse = bool(spec.get("reverse_field")) and str(row[spec["reverse_field"]]).strip() in reverse_values
        scores = [float(o["score"]) for o in spec["options"]]
        if reverse:
            scores = [min(scores) + max(scores) - s for s in scores]
        return {"dimension": dimension, "reverse": reverse, "option_scores": scores,
                "options": [str(o["text"]) for o in spec["options"]], "labels": [str(o["label"]) for o in spec["options"]]}

    def _render(self, path: Path, where, row: dict, item: dict) -> list[dict]:
        fmt = self.spec.get("option_format") or "{label}. {text}"
        block = "\n".join(fmt.format(label=l, text=t) for l, t in zip(item["labels"], item["options"]))
        fields = {**row, "options": block}
        if self.spec.get("question_field"):
            fields["question"] = row[self.spec["question_field"]]
        try:
            text = self.spec["prompt_template"].format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise format_error(self.name, path, where, f"prompt_template of {self.source} failed: {err!r}") from err
        return user_turn(text, self.spec.get("system_prompt"))

    # ----- scoring ----------------------------------------------------------------------
    def run_batch(self, model, batch) -> list[dict]:
        scores = checked_option_logprobs(model, [i["prompt"] for i in batch], [i["labels"] for i in batch])
        records = []
        for item, logprobs in zip(batch, scores):
            record = {"item_id": item["item_id"], "prompt": item["prompt"], "options": item["options"],
                      "labels": item["labels"], "logprobs": logprobs}
            if self.kind == "multiple_choice":
                record["reference"] = item["reference"]
            else:
                record.update(dimension=item["dimension"],
                              reference={"reverse": item["reverse"], "option_scores": item["option_scores"]})
            records.append(record)
        return records

    def score_record(self, record: dict) -> dict:
        choice = argmax(record["logprobs"])
        if self.kind == "multiple_choice":
            return {"parsed_answer": record["options"][choice], "correct": record["options"][choice] == record["reference"]}
        scores = record["reference"]["option_scores"]
        probs = softmax(record["logprobs"])
        return {"parsed_answer": record["labels"][choice], "score": scores[choice],
                "expected_score": sum(p * s for p, s in zip(probs, scores))}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        if self.kind == "multiple_choice":
            return {f"{self.prefix}/accuracy": mean(r["correct"] for r in records)}
        groups: dict[str, list[dict]] = defaultdict(list)
        for record in records:
            groups[record["dimension"]].append(record)
        metrics = {}
        for dimension, group in sorted(groups.items()):
            metrics[f"{self.prefix}/{dimension}"] = mean(r["score"] for r in group)
            metrics[f"{self.prefix}/{dimension}_expected"] = mean(r["expected_score"] for r in group)
        keyed = [{"dimension": r["dimension"], "reverse": r["reference"]["reverse"], "expected_score": r["expected_score"],
                  "option_scores": r["reference"]["option_scores"]} for r in records]
        return {**metrics, **keyed_questionnaire_metrics(self.prefix, keyed)}


def load_yaml_benchmarks(folder_or_files, data_root=None, limit: int | None = None,
                         seed: int | None = None, reserved: set[str] = frozenset()) -> dict[str, YamlBenchmark]:
    """Every YAML benchmark in a folder (*.yaml, *.yml) or a list of files, keyed by name; duplicates fail."""
    if isinstance(folder_or_files, (str, Path)) and Path(folder_or_files).is_dir():
        folder = Path(folder_or_files)
        paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    else:
        paths = [Path(folder_or_files)] if isinstance(folder_or_files, (str, Path)) else [Path(p) for p in folder_or_files]
    benchmarks: dict[str, YamlBenchmark] = {}
    for path in paths:
        if not path.is_file():
            raise BenchmarkDataError(f"YAML benchmark file not found: {path}")
        bench = YamlBenchmark.from_file(path, data_root, limit, seed)
        if bench.name in benchmarks or bench.name in reserved:
            raise YamlSpecError(f"{path}: benchmark name '{bench.name}' is already defined")
        benchmarks[bench.name] = bench
    return benchmarks
