"""Verdict files: `verdicts/<rater>.jsonl`, one line per rated pair, the only record of a rater's work.

The page appends by rewriting the whole file to a temporary name and renaming it (under a lock), so
a kill or a full disk leaves the previous file, never half a line. Readers never rewrite it: a bad or
duplicate line is an error naming file:line, for a person to fix.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from datamodules.io import DataError, atomic_write_text, file_lock, iter_jsonl
from experiments.human_eval import CHOICES, VERDICTS_DIR

_LOCK = threading.Lock()  # the page's threads; file_lock keeps two `serve` processes apart


def verdict_path(out: str | Path, rater: str) -> Path:
    return Path(out) / VERDICTS_DIR / f"{rater}.jsonl"


def read_verdicts(out: str | Path, rater: str, assigned: list[str]) -> list[dict]:
    """The rater's verdicts in file order, each checked: a JSON object naming an assigned pair once,
    a choice in A/B/tie, a string comment."""
    path, seen, out_ = verdict_path(out, rater), {}, []
    if not path.is_file():
        return []
    allowed = set(assigned)
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        pair, choice = record.get("pair_id"), record.get("choice")
        if pair not in allowed:
            raise DataError(f"{where}: pair '{pair}' is not in rater {rater}'s assignment")
        if choice not in CHOICES:
            raise DataError(f"{where}: choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if not isinstance(record.get("comment", ""), str):
            raise DataError(f"{where}: comment must be text")
        if pair in seen:
            raise DataError(f"{where}: pair '{pair}' rated again (first on line {seen[pair]}); keep one line")
        seen[pair] = lineno
        out_.append(record)
    return out_


def add_verdict(out: str | Path, rater: str, assigned: list[str], pair_id: str, choice: str, comment: str) -> dict:
    """Append one verdict atomically; a second verdict for the same pair is refused (ValueError)."""
    path = verdict_path(out, rater)
    with _LOCK, file_lock(path.parent / f".{rater}.lock"):
        done = read_verdicts(out, rater, assigned)
        if pair_id not in assigned:
            raise ValueError(f"pair '{pair_id}' is not in rater {rater}'s assignment")
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        if any(v["pair_id"] == pair_id for v in done):
            raise FileExistsError(f"pair '{pair_id}' is already rated by {rater}")
        record = {"pair_id": pair_id, "rater": rater, "choice": choice, "comment": comment.strip(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(path, old + json.dumps(record, ensure_ascii=False) + "\n")
        return record
