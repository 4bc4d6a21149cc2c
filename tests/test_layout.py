"""The package layout is the architecture: imports run only downwards.

Each top-level part of ``vmtrim`` has a rank. A module may import from its own part
and from parts of a lower rank, never from a part of the same rank (sideways) or a
higher one (upwards). Imports inside functions and under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vmtrim"

RANK = {
    "errors": 0,
    "_util": 1,
    "model": 2,
    "output": 2,
    "facts": 3,
    "history": 3,
    "channels": 4,
    "image": 4,
    "lab": 4,
    "report": 4,
    "sources": 5,
    "vm": 5,
    "storage": 5,
    "audit": 6,
    "fix": 7,
    "trim": 7,
    "verify": 7,
    "sparsify": 8,
    "run": 8,
    "fleet": 8,
    "cli": 9,
}
# The package root re-exports nothing from below; __main__ only starts the CLI.
ROOT_MODULES = {"__init__": 0, "__main__": 10}


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def rank(part: str) -> int:
    return RANK[part] if part in RANK else ROOT_MODULES[part]


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vmtrim":
                found += [(node.lineno, f"vmtrim.{alias.name}") for alias in node.names]
            elif node.module.startswith("vmtrim."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("vmtrim.")]
    return found


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_part_has_a_rank() -> None:
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in modules()}
    assert parts <= set(RANK) | set(ROOT_MODULES), parts - set(RANK) - set(ROOT_MODULES)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_downwards(path: Path) -> None:
    here = part_of("vmtrim." + ".".join(path.relative_to(SRC).with_suffix("").parts))
    wrong = []
    for line, target in imports(path):
        there = part_of(target)
        if there == here or target == "vmtrim" or (target == "vmtrim.__version__"):
            continue
        if rank(there) >= rank(here):
            wrong.append(
                f"line {line}: {here} (rank {rank(here)}) imports {target} (rank {rank(there)})"
            )
    assert not wrong, "\n".join(wrong)


def test_packages_declare_their_api() -> None:
    for init in sorted(SRC.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        names = [
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        ]
        assert "__all__" in names, f"{init.relative_to(SRC)} has no __all__"
