"""The lowest module: utilities and error types every layer may import (and it imports no project module).

- Crash-safe file I/O: write to a temporary file, then rename. A kill at any point leaves either
  the old file or the new one, never half of one. JSONL readers report bad lines as file:line.
- Locks, the console, `did_you_mean`, `project_root`.
- `Registry`, the one name -> builder mechanism (see experiments/registry.py for the registries).
- The error types: `ConfigError`, `DataError`, `StageFailed`.
"""
from __future__ import annotations

import difflib
import hashlib
import fcntl
import importlib
import json
import os
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
_UMASK = os.umask(0)
os.umask(_UMASK)


def did_you_mean(name: str, valid) -> str:
    """' — did you mean 'x'?' for the closest valid name (difflib, cutoff 0.6), or nothing: the hint
    every "unknown ..." error in the suite ends with."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" — did you mean '{match[0]}'?" if match else ""


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


class DataError(ValueError):
    """Bad input data, with the file (and line) it comes from."""


class StageFailed(RuntimeError):
    """A stage ran but its result is not fit to build on (e.g. the teacher did not answer): exit 1,
    the stage's MLflow run FAILED and its state incomplete, so the rerun continues it."""


def project_root() -> Path:
    """The folder holding pyproject.toml; relative config paths resolve from here."""
    return Path(__file__).resolve().parent.parent


def project_path(path: str | Path) -> Path:
    """A config path as given when it exists or is absolute, else relative to the project root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else project_root() / p


def to_container(cfg: Any) -> dict:
    """Plain dict of a config object (or section)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_hash(section: Any) -> str:
    """Stable short hash of a config section (or any JSON-able value) for caching and tags."""
    payload = to_container(section) if is_dataclass(section) else section
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry:
    """Named entries of one kind (stages, teachers, ...): each maps an id to the callable that builds
    the thing (a function or a class). Entries may be `module:attribute` strings, resolved on first
    use, so that `personafuse --help` and config validation do not import torch."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str | Callable[..., Any] | Any] = {}
        self._docs: dict[str, str] = {}

    def add(self, name: str, target: str | Any, doc: str = "") -> None:
        if name in self._entries:
            raise KeyError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = target
        self._docs[name] = doc

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        target = self._entries[name]
        if isinstance(target, str) and ":" in target:
            module, attr = target.split(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, self._entries)
        return f"unknown {self.kind} '{name}'{hint} (registered: {', '.join(sorted(self._entries))})"

    def describe(self) -> dict[str, str]:
        return dict(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared cluster folders want the usual mode
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """All records at once, atomically; keys keep their order so reruns are byte-identical."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)


def read_yaml_mapping(path: str | Path, kind: str, error: type[Exception] = DataError) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); every error names the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: malformed YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def read_json(path: str | Path) -> Optional[Any]:
    """The parsed file, or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def iter_jsonl(path: str | Path, on_bad_line: str = "fail") -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs. on_bad_line: 'fail' raises naming file:line, 'skip' warns with a count.

    Bad lines are malformed JSON, a value that is not an object, and bytes that are not UTF-8 (read
    line by line, so one bad byte costs one line under 'skip', not the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    skipped = 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                record = _jsonl_record(raw)
            except ValueError as err:
                if on_bad_line == "fail":
                    raise DataError(f"{path}:{lineno}: {err}") from None
                skipped += 1
                continue
            if record is not None:
                yield lineno, record
    if skipped:
        console.print(f"[yellow]warning[/]: skipped {skipped} malformed line(s) in {path}")


def _jsonl_record(raw: bytes) -> Optional[dict]:
    """One JSONL line as a dict, None for a blank line; a ValueError says what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"malformed JSONL line ({err})") from None
    if not isinstance(record, dict):
        raise ValueError("malformed JSONL line (a JSON object is expected on each line)")
    return record


def parse_jsonl(path: str | Path, parse: Callable[[dict, str, int], Any], on_bad_line: str = "fail",
                what: str = "record") -> list:
    """Every line of a JSONL file through `parse(record, "file:line", line)`. A DataError it raises
    fails the read, or with on_bad_line="skip" drops that line with one counted warning."""
    out, skipped = [], 0
    for lineno, record in iter_jsonl(path, on_bad_line):
        try:
            out.append(parse(record, f"{path}:{lineno}", lineno))
        except DataError:
            if on_bad_line != "skip":
                raise
            skipped += 1
    if skipped:
        console.print(f"[yellow]warning[/]: skipped {skipped} invalid {what}(s) in {path}")
    return out


def read_jsonl(path: str | Path, on_bad_line: str = "fail") -> list[dict]:
    return [record for _, record in iter_jsonl(path, on_bad_line)]


def require_keys(record: dict, keys: Iterable[str], where: str) -> None:
    """Raise naming the first missing key and where the record came from."""
    for key in keys:
        if key not in record:
            raise DataError(f"{where}: missing key '{key}'")


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """A blocking inter-process lock: the second process waits until the first is done."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ExclusiveLock:
    """A non-blocking lock file: a second process that wants the same folder fails at once with
    `error(message)` instead of interleaving writes. Released on exit, and by the OS on a crash.

    heartbeat_s: also touch the file every heartbeat_s seconds while held, so that processes that
    cannot take the lock themselves (the other ranks of a run) can tell a live holder from a dead one."""

    def __init__(self, path: Path, error: type[Exception], message: str, heartbeat_s: Optional[float] = None) -> None:
        self.path, self.error, self.message, self.handle = Path(path), error, message, None
        self.heartbeat_s, self.stopped = heartbeat_s, threading.Event()

    def __enter__(self) -> "ExclusiveLock":
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise self.error(self.message) from None
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        if self.heartbeat_s:
            threading.Thread(target=self._beat, name=f"heartbeat {self.path}", daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # a vanished lock file must not end the run; the watchers then time out
                pass

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
