"""`personafuse human-eval export`: blinded pairs from an evaluate run's downstream replies.

Replies come from `<run>/evaluate/records/<system>/downstream.json` (situation id + reply, written
when the evaluate stage judges downstream tasks), or from an external JSONL of {situation_id, reply}
(e.g. GPT-4o's replies to the same situations). A/B positions are drawn per pair from the seed; the
key that unblinds them goes to key.json, apart from pairs.jsonl and assignments.json, which hold no
system name. The study folder is written whole or not at all (temporary sibling folder + rename).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from datamodules.io import ConfigError, DataError, atomic_write_text, did_you_mean, iter_jsonl, read_json, write_jsonl
from experiments.human_eval import ASSIGNMENTS_FILE, KEY_FILE, PAIRS_FILE, VERDICTS_DIR

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class EvaluateRun:
    """What a study needs from a finished pipeline folder."""

    run_dir: Path
    config: dict
    replies: dict[str, dict[str, str]]
    """system -> situation id -> reply."""
    situations: dict[str, dict]
    """situation id -> corpus record (messages, domain)."""


def load_run(run_dir: str | Path) -> EvaluateRun:
    """The run's config, corpus and downstream replies; an error names what is missing and why."""
    run_dir = Path(run_dir).resolve()
    config_file, stage = run_dir / "config.yaml", run_dir / "evaluate"
    if not config_file.is_file():
        raise DataError(f"{run_dir}: not a pipeline output folder (no config.yaml; `personafuse run` writes it)")
    state = read_json(stage / "state.json") or {}
    if not state.get("complete"):
        raise DataError(f"{stage / 'state.json'}: the evaluate stage has not finished (run it with `personafuse run`)")
    config = yaml.safe_load(config_file.read_text())
    replies = {p.parent.name: _replies(p) for p in sorted((stage / "records").glob("*/downstream.json"))}
    if not replies:
        raise DataError(f"{stage / 'records'}: no <system>/downstream.json; the evaluate stage writes them when "
                        "evaluate.judge.enabled is true")
    return EvaluateRun(run_dir, config, replies, _situations(config))


def _replies(path: Path) -> dict[str, str]:
    return {r["item_id"]: r["reply"] for r in read_json(path)}


def _situations(config: dict) -> dict[str, dict]:
    from datamodules.io import project_path

    path = project_path(config["data"]["situations"])
    return {record["id"]: record for _, record in iter_jsonl(path)}


def read_external(path: str | Path, situations: dict[str, dict]) -> dict[str, str]:
    """situation id -> reply from a JSONL of {situation_id, reply}; malformed lines, situation ids the
    corpus does not hold and repeated ids are errors naming file:line."""
    path, out, first = Path(path), {}, {}
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        sid, reply = record.get("situation_id"), record.get("reply")
        if not isinstance(sid, str) or not isinstance(reply, str):
            raise DataError(f"{where}: each line needs string keys 'situation_id' and 'reply', got {sorted(record)}")
        if sid not in situations:
            raise DataError(f"{where}: unknown situation id '{sid}'{did_you_mean(sid, situations)}")
        if sid in first:
            raise DataError(f"{where}: situation '{sid}' again (first on line {first[sid]})")
        first[sid], out[sid] = lineno, reply
    return out


def parse_comparisons(pairs: list[str], systems: list[str]) -> list[tuple[str, str]]:
    """`X:Y` flags as (X, Y); each side must be an evaluated system or a named external file."""
    out = []
    for text in pairs:
        left, sep, right = text.partition(":")
        if not sep or not left or not right or left == right:
            raise ConfigError(f"--pair takes SYSTEM:OTHER with two different systems, got {text!r}")
        for name in (left, right):
            if name not in systems:
                raise ConfigError(f"--pair {text}: no downstream replies for '{name}'{did_you_mean(name, systems)} "
                                  f"(systems: {', '.join(systems)}; add a file with --external {name}=FILE)")
        out.append((left, right))
    if len(set(out)) != len(out):
        raise ConfigError(f"--pair: a comparison is listed twice ({', '.join(pairs)})")
    return out


def rater_names(raters: str) -> list[str]:
    """`3` -> r1, r2, r3; `alice,bob` -> those names (they become file names)."""
    names = [f"r{i + 1}" for i in range(int(raters))] if raters.isdigit() else [r.strip() for r in raters.split(",")]
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"--raters takes a count or distinct names of letters, digits, . _ -; got {raters!r}")
    return names


def build_pairs(comparisons, replies, situations, seed: int) -> tuple[list[dict], dict[str, dict]]:
    """(blinded pairs for raters, pair id -> unblinding entry). Every comparison covers the situations
    both sides replied to; pair ids are shuffled so that neighbouring ids do not share a comparison."""
    rng = random.Random(seed)
    drafts = []
    for left, right in comparisons:
        shared = [s for s in replies[left] if s in replies[right]]
        if not shared:
            raise DataError(f"{left} and {right} replied to no common situation: nothing to compare")
        for sid in shared:
            a, b = (left, right) if rng.random() < 0.5 else (right, left)
            drafts.append((sid, a, b, [left, right]))
    rng.shuffle(drafts)
    blinded, key = [], {}
    for i, (sid, a, b, comparison) in enumerate(drafts, 1):
        pair_id = f"p{i:04d}"
        situation = situations[sid]
        blinded.append({"pair_id": pair_id, "situation_id": sid, "domain": situation.get("domain", ""),
                        "conversation": situation["messages"], "a": replies[a][sid], "b": replies[b][sid]})
        key[pair_id] = {"situation_id": sid, "a": a, "b": b, "comparison": comparison}
    return blinded, key


def assign(pair_ids: list[str], raters: list[str], overlap: float, seed: int) -> tuple[dict[str, list[str]], list[str]]:
    """(rater -> pair ids in their own shuffled order, the pairs every rater rates). A fraction
    `overlap` of the pairs goes to every rater (agreement is measured there); the rest is dealt out
    so each pair is rated once and the raters' loads differ by at most one."""
    if not 0.0 <= overlap <= 1.0:
        raise ConfigError(f"--overlap must be in [0, 1], got {overlap}")
    rng = random.Random(seed + 1)
    order = list(pair_ids)
    rng.shuffle(order)
    shared = sorted(order[: round(overlap * len(order))]) if len(raters) > 1 else []
    rest = [p for p in order if p not in set(shared)]
    out = {r: list(shared) + rest[i:: len(raters)] for i, r in enumerate(raters)}
    for ids in out.values():
        rng.shuffle(ids)
    return out, shared


def export_study(run_dir: str | Path, out: str | Path, pairs: list[str], externals: dict[str, str], raters: str,
                 overlap: float, seed: int) -> Path:
    """Check everything, then write OUT whole (pairs.jsonl, assignments.json, key.json, verdicts/)."""
    run, out = load_run(run_dir), Path(out)
    replies = dict(run.replies)
    for name, path in externals.items():
        if name in replies:
            raise ConfigError(f"--external {name}={path}: '{name}' is an evaluated system; give the file another name")
        replies[name] = read_external(path, run.situations)
    comparisons = parse_comparisons(pairs or _default_pairs(list(run.replies), list(externals)), list(replies))
    names = rater_names(raters)
    blinded, key = build_pairs(comparisons, replies, run.situations, seed)
    assignments, shared = assign([p["pair_id"] for p in blinded], names, overlap, seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty (it may hold verdicts): choose another OUT")
    settings = {"run_dir": str(run.run_dir), "seed": seed, "raters": names, "overlap": overlap, "overlap_pairs": shared,
                "comparisons": [list(c) for c in comparisons],
                "external": {n: str(Path(p).resolve()) for n, p in externals.items()}}
    _write_whole(out, blinded, assignments, {"schema": 1, **settings, "pairs": key})
    return out


def _default_pairs(systems: list[str], externals: list[str]) -> list[str]:
    """personafuse against every external reply file, or against base when there is none."""
    others = externals or ["base"]
    return [f"personafuse:{o}" for o in others]


def _write_whole(out: Path, blinded: list[dict], assignments: dict, key: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_jsonl(tmp / PAIRS_FILE, blinded)
        atomic_write_text(tmp / ASSIGNMENTS_FILE, json.dumps(assignments, indent=1))
        atomic_write_text(tmp / KEY_FILE, json.dumps(key, indent=1))
        (tmp / VERDICTS_DIR).mkdir()
        if out.exists():
            out.rmdir()  # empty: checked by the caller
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_study(out: str | Path) -> tuple[list[dict], dict[str, list[str]]]:
    """(blinded pairs, assignments) of a study folder: what the rating page serves."""
    out = Path(out)
    if not (out / PAIRS_FILE).is_file() or not (out / ASSIGNMENTS_FILE).is_file():
        raise DataError(f"{out}: not a study folder (no {PAIRS_FILE} / {ASSIGNMENTS_FILE}; "
                        "`personafuse human-eval export` writes them)")
    return [r for _, r in iter_jsonl(out / PAIRS_FILE)], read_json(out / ASSIGNMENTS_FILE)


def load_key(out: str | Path) -> dict:
    key = read_json(Path(out) / KEY_FILE)
    if key is None:
        raise DataError(f"{Path(out) / KEY_FILE}: the unblinding key is missing")
    return key


def unblind(key: dict, pair_id: str, choice: str) -> Optional[str]:
    """The system a verdict prefers (None for a tie)."""
    entry = key["pairs"][pair_id]
    return {"A": entry["a"], "B": entry["b"]}.get(choice)
