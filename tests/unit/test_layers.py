"""Imports run one way: experiments/ -> lightning_modules/ (stages) -> lightning_modules/components/ ->
datamodules/, and datamodules/io.py (utilities, error types) imports no project module at all.

Every module is parsed with `ast`, so imports inside functions count too. Imports under
`if TYPE_CHECKING:` never run and are exempt: they let a stage annotate the typed config section it
receives. A stage (a STAGES entry) also imports no other stage, nor another stage's helper modules
(`lightning_modules/<stage>_*.py`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("experiments", "lightning_modules", "datamodules")
STAGES = ("datagen", "adapter_sft", "router", "joint", "evaluate", "sft_baseline")


def layer(module: str) -> int:
    """Higher may import lower or equal, never the reverse."""
    if module == "datamodules.io":
        return -1
    if module.startswith("datamodules"):
        return 0
    if module.startswith("lightning_modules.components"):
        return 1
    if module.startswith("lightning_modules"):
        return 2
    return 3


def stage_of(module: str) -> str | None:
    """The stage a lightning_modules module belongs to (its own file or a `<stage>_*.py` helper)."""
    parts = module.split(".")
    if len(parts) != 2 or parts[0] != "lightning_modules":
        return None
    return next((s for s in STAGES if parts[1] == s or parts[1].startswith(f"{s}_")), None)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported project module) for every import that runs, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return out


def _known(name: str, known: dict) -> str | None:
    """The project module an imported name refers to (`a.b.func` -> `a.b`)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


ALL = modules()


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_run_downward(module):
    problems = []
    for line, name in imports(module, ALL[module]):
        target = _known(name, ALL)
        if target is None or target == module:
            continue
        if layer(target) > layer(module):
            problems.append(f"{ALL[module].relative_to(ROOT)}:{line}: imports {target} (a higher layer)")
        own, other = stage_of(module), stage_of(target)
        if own and other and own != other:
            problems.append(f"{ALL[module].relative_to(ROOT)}:{line}: stage '{own}' imports stage '{other}' ({target})")
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_the_checker_sees_upward_and_nested_imports(tmp_path):
    """The test itself catches an import inside a function and a relative one, and skips TYPE_CHECKING."""
    path = tmp_path / "x.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from experiments.config import A\n"
                    "def f():\n    from experiments import registry\nfrom .base import b\n")
    found = [name for _, name in imports("datamodules.benchmarks.x", path)]
    assert "experiments.registry" in found and "datamodules.benchmarks.base" in found
    assert "experiments.config" not in found
    assert stage_of("lightning_modules.evaluate_gates") == "evaluate" and stage_of("lightning_modules.common") is None


def test_stage_list_matches_the_registry():
    from experiments import registry

    modules = {registry.STAGES.get(stage).__module__ for stage in registry.STAGES}
    assert {module.rpartition(".")[2] for module in modules} <= set(STAGES)
