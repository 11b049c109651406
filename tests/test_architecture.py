"""The layering of docs/architecture.md: a lower module never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scratchpath"

# module -> the scratchpath modules it may import (besides itself, `errors`, `files` and
# `distributed`, which every module may import)
EVERYWHERE = {"errors", "files", "distributed"}
ALLOWED = {
    "errors": set(),
    "files": set(),
    "distributed": set(),
    "slides": set(),
    "tissue": {"slides"},
    "store": set(),
    "ingest": {"slides", "tissue", "store"},
    "augment": set(),
    "views": {"augment"},
    "data": {"store", "views", "augment"},
    "backbones": set(),
    "weights": set(),  # init from given weights and its record; the export folder's files
    "objectives": {"backbones", "weights"},
    "eva_configs": set(),  # the eva section of the model card (export's card.py)
    "export": {"backbones", "weights", "eva_configs"},
    # embed: ingest's tiling of slides, stores, the export's load_backbone, data's EncodedTiles
    "embed": {"slides", "tissue", "ingest", "store", "backbones", "export", "data"},
    "finetune": {"export", "store", "augment", "backbones", "weights", "embed", "slides"},
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


def test_modules_every_layer_may_import_import_none_of_ours():
    for module in EVERYWHERE:
        path = PACKAGE / f"{module}.py"
        assert not _imported_modules(path) - {module}, f"{module}.py imports scratchpath modules"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_layers(path: Path):
    module = _top_level_module(path)
    forbidden = _imported_modules(path) - ALLOWED[module] - {module} - EVERYWHERE
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


# Calls that draw random numbers. The views' random parameters are drawn in views/params.py
# alone (both view paths use that draw); augment/transforms.py keeps the albumentations
# transforms' own draws (user-facing building blocks, not a view path).
RANDOM_DRAWS = {"random", "uniform", "integers", "normal", "choice", "permutation", "shuffle",
                "rand", "randn", "randint", "randperm", "bernoulli", "multinomial"}  # fmt: skip
DRAWING_MODULES = {"views/params.py", "augment/transforms.py"}
VIEW_SOURCES = sorted(
    p for p in PACKAGE.rglob("*.py") if _top_level_module(p) in ("augment", "views")
)


def _random_draws(path: Path) -> list[str]:
    return [
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in RANDOM_DRAWS
    ]


@pytest.mark.parametrize("path", VIEW_SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_view_augmentations_draw_random_numbers_in_one_place(path: Path):
    name = str(path.relative_to(PACKAGE))
    assert name in DRAWING_MODULES or not _random_draws(path), f"{name}: {_random_draws(path)}"


def test_the_random_draw_check_sees_draws():
    assert _random_draws(PACKAGE / "views" / "params.py") == ["random"]
    assert "uniform" in _random_draws(PACKAGE / "augment" / "transforms.py")
