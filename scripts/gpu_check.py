"""The one GPU check (issue #20): everything that needs CUDA, in one run of at most 9 minutes on one
GPU, ending in one summary table. See scripts/gpu_check.sh for how to call it.

The GPU machine has torch, lightning, transformers, peft and torchmetrics but no package index, so
`--prepare` (run here, before) fills build/gpu_check/ with what it lacks: wheels for the rest of
the project's imports (resolved by pip against the packages the image has) and the tiny random
Llama with its tokenizer (it is built from the embedded model, which the image does not have).
On the GPU machine the check installs only the carried wheels whose packages are missing, then
runs its steps, each under its own time limit and all under one budget.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "build" / "gpu_check"
WHEELS, CACHE = CARRY / "wheels", CARRY / "cache"
IMAGE_HAS = ["torch", "lightning", "transformers", "peft", "torchmetrics"]
"""What the GPU image provides (the device tool's notes); their dependencies are not carried."""
NEEDED = ["mlflow-skinny", "sqlalchemy", "alembic", "omegaconf", "deepspeed", "torchdata", "psutil", "rich", "gguf", "submitit",
          "httpx", "safetensors", "pyyaml", "pytest", "pytest-timeout"]
"""What the gpu tier and the benchmark import beyond the image (mlflow-skinny: the client and the
SQLite store without the UI's heavy dependencies; sqlalchemy and alembic serve the store)."""
BUDGET_S = 540


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: int
    why: str


def steps(out: Path) -> list[Step]:
    py = sys.executable
    return [
        Step("environment", [py, "-c", ENV_PROBE], 30, "GPU, driver, torch/CUDA versions, bf16 support"),
        Step("gpu tier", [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
                          f"--junitxml={out / 'gpu_tier.xml'}"], 330,
             "pytest -m gpu: Lightning DeepSpeed ZeRO-2 and ZeRO-3 in bf16 and FSDP, adapter SFT on a small random Llama"),
        Step("throughput 8B bf16", [py, "benchmarks/gpu_throughput.py", "--shape", "llama8b", "--json",
                                    str(out / "throughput.json")], 150,
             "routed ÷ base generation tokens/s on an 8B-shaped random Llama in bf16, batch 1 and 8"),
    ]


ENV_PROBE = """
import json, torch
ok = torch.cuda.is_available()
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if ok else "none", "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16": bool(ok and torch.cuda.is_bf16_supported())}))
"""


# --------------------------------------------------------------------------- prepare (here, before)


def prepare() -> int:
    """build/gpu_check/: wheels of what the image lacks, and the tiny model's cache folder."""
    shutil.rmtree(CARRY, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    pins = _carried_pins()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(WHEELS),
                        *[p for p in pins if not p.startswith("deepspeed==")]], check=True)
        # deepspeed ships as an sdist: a wheel without compiled ops (they are built on first use, if ever)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(WHEELS),
                        *[p for p in pins if p.startswith("deepspeed==")]], check=True, env={**os.environ, "DS_BUILD_OPS": "0"},
                       cwd=tmp)
    _other_pythons()
    from lightning_modules.components.base_model import cache_root, resolve_model_path

    resolve_model_path("tiny-random-llama")  # built here from the embedded tokenizer
    shutil.copytree(cache_root() / "models" / "tiny-random-llama", CACHE / "models" / "tiny-random-llama")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(f"{CARRY.relative_to(ROOT)}: {len(list(WHEELS.glob('*.whl')))} wheels + the tiny model, {size:.1f} MiB "
          f"(for python {sys.version_info.major}.{sys.version_info.minor}); carry it: carry=[\"build/gpu_check\"]")
    return 0


OTHER_PYTHONS = ("3.10", "3.12", "3.13")


def _other_pythons() -> None:
    """The compiled wheels again for the other CPython versions the GPU image may run (pure and abi3
    wheels already fit them); pip on the device picks the one that matches."""
    for wheel in list(WHEELS.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if "-none-any" in wheel.name or "abi3" in wheel.name:
            continue
        for python in OTHER_PYTHONS:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(WHEELS),
                            "--python-version", python, "--platform", "manylinux_2_28_x86_64", "--platform",
                            "manylinux2014_x86_64", f"{name}=={version}"], check=False, capture_output=True)


def _carried_pins() -> list[str]:
    """name==version of everything NEEDED pulls in that IMAGE_HAS does not, at this machine's versions."""
    def closure(requirements: list[str]) -> dict[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                            "--report", str(report), *requirements], check=True)
            return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}

    def local(name: str) -> str:  # mlflow-skinny at the version of this machine's mlflow
        return f"{name}=={metadata.version('mlflow' if name == 'mlflow-skinny' else name)}"

    image = closure([local(n) for n in IMAGE_HAS])
    # torch pinned to this machine's build, so deepspeed's torch requirement adds no CUDA wheels
    wanted = closure([local(n) for n in NEEDED] + [local("torch")])
    return [f"{name}=={version}" for name, version in sorted(wanted.items()) if name not in image]


# --------------------------------------------------------------------------- the check (on the GPU machine)


def install_missing() -> list[str]:
    """Install the carried wheels whose distributions the image lacks; never replace the image's own."""
    missing = set()
    for wheel in WHEELS.glob("*.whl"):
        name = wheel.name.split("-")[0].replace("_", "-")
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
    if missing:  # by name: pip picks the wheel built for this Python
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(WHEELS), "-q",
                        *sorted(missing)], check=True)
    return sorted(missing)


def run_checks(out: Path, budget_s: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERSONAFUSE_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    started = time.monotonic()
    try:
        installed = install_missing() if WHEELS.is_dir() else []
        rows.append(("install carried wheels", "ok", time.monotonic() - started, f"{len(installed)} installed"))
    except subprocess.CalledProcessError as err:
        rows.append(("install carried wheels", "FAILED", time.monotonic() - started, str(err)))
    for step in steps(out):
        limit = min(step.limit_s, deadline - time.monotonic())
        if limit < 10:
            rows.append((step.name, "SKIPPED", 0.0, "budget spent"))
            continue
        start = time.monotonic()
        log = out / f"{step.name.replace(' ', '_')}.log"
        try:
            with log.open("w") as sink:
                proc = subprocess.run(step.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT ({limit:.0f} s)"
        rows.append((step.name, status, time.monotonic() - start, summarize(step.name, out, log)))
        rows += detail_rows(step.name, out)
    table = render(rows)
    print(table)
    partial = out / "gpu_check.md.partial"
    partial.write_text(table + "\n")
    partial.replace(out / "gpu_check.md")  # whole or absent: a reader never sees half a table
    return 0 if all(r[1] in ("ok", "passed") for r in rows) else 1


def summarize(name: str, out: Path, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    if name == "environment":
        try:
            env = json.loads(text.strip().splitlines()[-1])
            return f"{env['gpu']}; torch {env['torch']}, CUDA {env['cuda']}, bf16 {env['bf16']}"
        except (ValueError, IndexError, KeyError):
            return text.strip()[-200:]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][-200:] if lines else ""


def detail_rows(name: str, out: Path) -> list[tuple]:
    """One row per gpu test (from pytest's JUnit XML) and per throughput batch size."""
    if name == "gpu tier" and (out / "gpu_tier.xml").exists():
        rows = []
        for case in ET.parse(out / "gpu_tier.xml").getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
            rows.append((f"  {case.get('name')}", outcome, float(case.get("time", 0)), message[:160]))
        return rows
    if name == "throughput 8B bf16" and (out / "throughput.json").exists():
        result = json.loads((out / "throughput.json").read_text())
        return [(f"  batch {r['batch']}", "passed" if r["ratio"] >= r["target"] else "below target", 0.0,
                 f"routed ÷ base {r['ratio']:.3f} [{r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f}], target "
                 f"{r['target']}; base {r['base_tok_s']:.0f} tok/s") for r in result["rows"]]
    return []


def render(rows: list[tuple]) -> str:
    lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {detail.replace('|', '/')} |" for name, status, seconds, detail in rows]
    return "\n".join(lines)


def dry_run(out: Path, budget_s: int) -> int:
    print(f"gpu check: at most {budget_s} s in all; results under {out}")
    print("steps:")
    for step in steps(out):
        shown = ["'<environment probe>'" if part == ENV_PROBE else part for part in step.command]
        print(f"  {step.name} (limit {step.limit_s} s): {step.why}\n    $ {' '.join(shown)}")
    print("carries (device tool: carry=[\"build/gpu_check\"]):")
    if not CARRY.is_dir():
        print("  nothing yet: run `scripts/gpu_check.sh --prepare` here first")
        return 0
    for wheel in sorted(WHEELS.glob("*.whl")):
        print(f"  {wheel.relative_to(ROOT)}  {wheel.stat().st_size / 2**20:.1f} MiB")
    model = CACHE / "models" / "tiny-random-llama"
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20 if model.is_dir() else 0.0
    print(f"  {model.relative_to(ROOT)}  {size:.1f} MiB (PERSONAFUSE_CACHE points here)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="The one GPU check (issue #20).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="here, before: build build/gpu_check (wheels + tiny model)")
    mode.add_argument("--dry-run", action="store_true", help="list the steps and what is carried; run nothing")
    p.add_argument("--budget-s", type=int, default=BUDGET_S, help="all steps together (default 540 = 9 minutes)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "build" / "gpu_check_results"),
                   help="where logs, JUnit XML and the table go (default $OUT, the device tool's folder)")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.dry_run:
        return dry_run(Path(args.out), args.budget_s)
    return run_checks(Path(args.out), args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
