"""Fetch the benchmark files from their pinned upstream commits, verified by SHA-256.

For users without ``../shared/benchmarks``: ``download_benchmarks(dest)`` lays the files out exactly
as the data root expects. Each file goes to a temporary name beside its target, is hashed, and is
renamed into place only if the hash equals the one in ``manifest.sha256`` (shipped with this
package); a mismatch deletes the temporary file and raises. Verified files already present are
skipped, so the call is idempotent. Nothing here runs at evaluation time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# data-root folder -> (upstream repo, pinned commit, {local file: upstream path} or upstream folder prefix)
UPSTREAM: dict[str, tuple[str, str, dict[str, str] | str]] = {
    "eq_bench": ("EQ-bench/EQ-Bench", "d28c60c5",
                 {"eq_bench_v2_questions_171.json": "data/eq_bench_v2_questions_171.json", "LICENSE": "LICENSE"}),
    "emobench": ("Sahandfer/EmoBench", "3b4f8431",
                 {"EU.jsonl": "data/EU.jsonl", "EA.jsonl": "data/EA.jsonl", "LICENSE": "LICENSE"}),
    "mpi": ("jianggy/MPI", "0f44b562", {"mpi_120.csv": "inventories/mpi_120.csv", "LICENSE": "LICENSE"}),
    "gsm8k": ("openai/grade-school-math", "3101c7d5",
              {"test.jsonl": "grade_school_math/data/test.jsonl", "LICENSE": "LICENSE"}),
    "mmlu": ("stanford-cs336/spring2024-assignment5-alignment", "fcbfe2b3", "data/mmlu/"),
    "xstest": ("paul-rottger/exaggerated-safety", "d7bb5bd7",
               {"xstest_prompts.csv": "xstest_prompts.csv", "LICENSE": "LICENSE"}),
}
# Licence texts not confirmed to exist as files upstream: a failed fetch only warns.
OPTIONAL = {"xstest/LICENSE"}


class ChecksumError(RuntimeError):
    """A downloaded file's SHA-256 differs from the manifest."""


@dataclass(frozen=True)
class Source:
    """Where one data-root file comes from and what it must hash to."""

    repo: str
    commit: str
    path: str
    sha256: str
    optional: bool = False


def read_manifest(text: str | None = None) -> dict[str, str]:
    """{relative path: sha256} from ``sha256sum`` output (the packaged manifest by default)."""
    if text is None:
        text = resources.files(__package__).joinpath("manifest.sha256").read_text(encoding="utf-8")
    manifest = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            manifest[name.strip().lstrip("*")] = digest.lower()
    return manifest


def _source(relative: str, digest: str) -> Source:
    folder, _, name = relative.partition("/")
    repo, commit, mapping = UPSTREAM[folder]
    path = mapping + name if isinstance(mapping, str) else mapping[name]
    return Source(repo, commit, path, digest, relative in OPTIONAL)


SOURCES: dict[str, Source] = {rel: _source(rel, digest) for rel, digest in read_manifest().items()}


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def urllib_fetch(url: str, destination: Path) -> None:
    """Stream ``url`` into ``destination`` (raises urllib errors on HTTP failure)."""
    with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
        shutil.copyfileobj(response, out)


def _fetch_verified(relative: str, source: Source, target: Path, url: str, fetch: Callable[[str, Path], None]) -> None:
    """Download to a temp file beside ``target``, check the hash, then atomically rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        fetch(url, temp)
        actual = sha256_of(temp)
        if actual != source.sha256:
            raise ChecksumError(f"{relative}: SHA-256 mismatch for {url} (expected {source.sha256}, got {actual})")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def download_benchmarks(dest: str | Path, base_url_template: str = DEFAULT_BASE_URL,
                        fetch: Callable[[str, Path], None] = urllib_fetch,
                        files: Iterable[str] | None = None) -> list[Path]:
    """Download (a subset of) ``SOURCES`` into ``dest``; returns the files written, skipping verified ones."""
    dest = Path(dest).expanduser()
    wanted = list(SOURCES) if files is None else list(files)
    unknown = [f for f in wanted if f not in SOURCES]
    if unknown:
        raise KeyError(f"not in the benchmark manifest: {unknown}")
    written = []
    for relative in wanted:
        source, target = SOURCES[relative], dest / relative
        if target.is_file() and sha256_of(target) == source.sha256:
            continue
        url = base_url_template.format(repo=source.repo, commit=source.commit, path=source.path)
        try:
            _fetch_verified(relative, source, target, url, fetch)
        except OSError as err:  # urllib.error.URLError/HTTPError are OSErrors
            if source.optional:
                warnings.warn(f"optional file {relative} could not be fetched from {url}: {err}")
                continue
            raise RuntimeError(f"{relative}: download from {url} failed: {err}") from err
        written.append(target)
    return written


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("~/.cache/personafuse/benchmarks")
    print(f"{len(download_benchmarks(root))} files written to {root.expanduser()}")
