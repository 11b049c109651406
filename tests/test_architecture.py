"""The layering of docs/architecture.md: a lower module never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scratchpath"

# module -> the scratchpath modules it may import (besides itself, `errors` and `files`)
ALLOWED = {
    "errors": set(),
    "files": set(),
    "slides": set(),
    "tissue": {"slides"},
    "store": set(),
    "ingest": {"slides", "tissue", "store"},
    "augment": set(),
    "views": {"augment"},
    "data": {"store", "views", "augment"},
    "backbones": set(),
    "weights": set(),
    "objectives": {"backbones", "weights"},
    "export": {"backbones", "weights"},
    "finetune": {"export", "store", "augment", "backbones", "weights"},
    "callbacks": {"finetune", "store", "augment", "backbones"},
    "synthetic": set(),
}


def _top_level_module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "scratchpath" and len(parts) > 1:
                found.add(parts[1])
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _top_level_module(p) in ALLOWED)


def test_every_layered_module_is_checked():
    assert {_top_level_module(p) for p in SOURCES} == set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_layers(path: Path):
    module = _top_level_module(path)
    forbidden = _imported_modules(path) - ALLOWED[module] - {module, "errors", "files"}
    assert not forbidden, f"{path.relative_to(PACKAGE)} imports higher layers: {sorted(forbidden)}"


OBJECTIVE_SOURCES = sorted((PACKAGE / "objectives").glob("*.py"))


@pytest.mark.parametrize("path", OBJECTIVE_SOURCES, ids=lambda p: p.name)
def test_only_objectives_collectives_talks_to_torch_distributed(path: Path):
    """Cross-rank code lives in objectives/collectives.py; losses and heads import it from there."""
    imports = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imports.add(node.module)
        elif isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
    distributed = {name for name in imports if name.startswith("torch.distributed")}
    assert path.name == "collectives.py" or not distributed, f"{path.name}: {sorted(distributed)}"
