"""The README as a new user meets it: every command of its CLI reference, pasted in order on a
fresh copy of the repository with the test data in ``../shared/data`` beside it, runs (with
fewer training steps and smaller synthetic slides), and then every Python snippet of
"Fine-tuning from Python" runs as written and loads the export it made strictly.

(``make demo`` / ``make test`` of the Quickstart build a virtualenv and are not run here; the
demo itself is, as ``scratchpath demo`` of the CLI reference. ``make`` lines of the CLI reference
are dry-run with ``make -n``.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# what the test shrinks, each found verbatim (so a README edit cannot silently dodge it)
COMMAND_REDUCTIONS = {
    "--slides 4 --size 8192x8192": "--slides 1 --size 1024x1024",
    "--slides 1 --size 50000x50000": "--slides 1 --size 2048x2048",
    "scratchpath demo --out demo_output": "scratchpath demo --out demo_output --quick",
}
RECIPE_REDUCTIONS = {"max_steps: 50": "max_steps: 4", "every_n_steps: 25": "every_n_steps: 2",
                     "log_every_n_steps: 5": "log_every_n_steps: 2"}  # fmt: skip


def _section(start: str, end: str) -> str:
    return README[README.index(start) : README.index(end)]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell commands of a block, continuation lines joined."""
    return [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def readme_commands() -> list[str]:
    commands = [
        c
        for block in _blocks(_section("## CLI reference", "## Fine-tuning from Python"), "bash")
        for c in _commands(block)
    ]
    text = "\n".join(commands)
    for old, new in COMMAND_REDUCTIONS.items():
        assert old in text, f"README no longer has {old!r}: update COMMAND_REDUCTIONS"
        commands = [c.replace(old, new) for c in commands]
    return commands


def test_readme_commands_are_concrete() -> None:
    """No placeholders a paste would trip on: brackets, '...' or angle-bracket names."""
    for command in readme_commands():
        code = command.split("#")[0]
        assert not re.search(r"\[--|\.\.\.|<\w+>", code), command


@pytest.fixture(scope="module")
def fresh_clone(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files (as `git clone` would give, plus uncommitted edits) in a new
    folder, ``../shared/data`` beside it, the smoke recipe shortened."""
    root = tmp_path_factory.mktemp("first_hour")
    clone = root / "scratchpath"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(data_dir.resolve())
    recipe = clone / "recipes" / "smoke_dino.yaml"
    text = recipe.read_text()
    for old, new in RECIPE_REDUCTIONS.items():
        assert old in text, f"smoke_dino.yaml no longer has {old!r}"
        text = text.replace(old, new)
    recipe.write_text(text)
    return clone


@pytest.fixture(scope="module")
def first_hour(fresh_clone: Path) -> dict[str, str]:
    """Run every command, in README order; the output of each."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(fresh_clone / "src"),
        "HF_HUB_OFFLINE": "1",
    }
    outputs = {}
    for command in readme_commands():
        # make targets (re)build a virtualenv and run long jobs of their own (make
        # pretrain-cpu): dry-run them, which checks that the target exists and parses
        dry = command.replace("make ", "make -n ", 1) if command.startswith("make ") else command
        done = subprocess.run(
            ["bash", "-c", dry], cwd=fresh_clone, env=env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"README command failed: {command}\n{output[-3000:]}"
        outputs[command] = output
    return outputs


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~15 CLI runs, each importing torch: minutes on 2 shared cores
def test_every_readme_command_runs_in_order_on_a_fresh_clone(first_hour, fresh_clone):
    assert len(first_hour) >= 15
    assert (fresh_clone / "models" / "smoke_dino" / "model.safetensors").is_file()
    assert (fresh_clone / "runs" / "eval_smoke_dino" / "metrics.json").is_file()
    fit = next(
        out
        for cmd, out in first_hour.items()
        if "fit --config recipes/smoke_dino.yaml" in cmd
        and "--ckpt_path" not in cmd
        and "--print_config" not in cmd
    )
    assert "step 4/4 (100%)" in fit and " left 0:00" in fit  # the progress line


def _strict(model: torch.nn.Module, folder: Path) -> None:
    exported = load_file(folder / "model.safetensors")
    state = getattr(model, "timm_model", getattr(model, "backbone", model)).state_dict()
    assert set(state) == set(exported)
    assert all(torch.equal(state[k], v) for k, v in exported.items())


@pytest.mark.slow
@pytest.mark.timeout(1800)
@torch.no_grad()
def test_every_python_snippet_runs_on_what_the_commands_made(
    first_hour, fresh_clone, monkeypatch: pytest.MonkeyPatch
):
    import scratchpath

    monkeypatch.chdir(fresh_clone)
    export = fresh_clone / "models" / "smoke_dino"
    reference = scratchpath.load_backbone(export)
    blocks = _blocks(_section("## Fine-tuning from Python", "## From tiles to slides"), "python")
    assert len(blocks) == 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README snippet {i + 1}", "exec"), namespace)
        _strict(namespace["model"], export)
        x = namespace["x"] if i == 0 else namespace["x"].unsqueeze(0)
        torch.testing.assert_close(namespace["embeddings"], reference(x), atol=1e-5, rtol=0)
        if i == 0:
            torch.testing.assert_close(
                namespace["features"], namespace["embeddings"], atol=1e-5, rtol=0
            )
            assert namespace["patches"].shape[:2] == (3, reference.num_features)


def test_slide_level_snippet_calls_the_api_as_it_is():
    """The slide-level snippet needs slides and a trained export, so it is not run here (the
    demo's step 9 runs the same calls); each call in it must still bind to the function's
    signature, so a renamed function or argument fails here rather than in a user's hands."""
    import ast
    import inspect

    (block,) = _blocks(_section("## From tiles to slides", "## Running on GPUs"), "python")
    namespace: dict = {}
    tree = ast.parse(block)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            exec(compile(ast.Module([node], []), "README slide snippet", "exec"), namespace)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert {c.func.id for c in calls} == {"embed", "read_slide", "run_slide_evaluation"}
    for call in calls:
        signature = inspect.signature(namespace[call.func.id])
        signature.bind(
            *[ast.literal_eval(a) for a in call.args],
            **{k.arg: ast.literal_eval(k.value) for k in call.keywords},
        )
