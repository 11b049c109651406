"""Static checks of docker/Dockerfile (no Docker engine runs in CI)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _pins() -> dict[str, str]:
    """Exact ``name==version`` pins of pyproject's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([\w.]+)", requirement)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions()


def _base_images(instructions) -> list[str]:
    return [args.split()[0] for keyword, args in instructions if keyword == "FROM"]


def test_base_image_is_pinned_by_an_explicit_tag(instructions):
    images = _base_images(instructions)
    assert images, "no FROM"
    for image in images:
        assert "$" not in image, f"{image}: base image must not come from a build arg"
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and "latest" not in tag, f"{image}: floating tag"


def test_base_image_torch_matches_pyproject_pin(instructions):
    pins = _pins()
    image = _base_images(instructions)[-1]
    pip_runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    if image.startswith("pytorch/pytorch:"):  # tag = <torch version>-cuda<x>-cudnn<y>-<flavour>
        torch_version = image.rpartition(":")[2].split("-")[0]
        assert torch_version == pins["torch"], f"{image}: torch {torch_version} != {pins['torch']}"
    else:  # a plain CUDA base must install the pinned torch itself
        assert f"torch=={pins['torch']}" in pip_runs, f"{image}: torch not pinned"


def test_torch_installed_separately_uses_pyproject_pins(instructions):
    pins = _pins()
    for keyword, args in instructions:
        if keyword != "RUN" or "pip" not in args:
            continue
        for word in shlex.split(args.replace("&&", " ")):
            match = re.fullmatch(r"(torch|torchvision)==([\w.+]+)", word)
            if match:
                assert match.group(2).split("+")[0] == pins[match.group(1)], word


def test_installs_the_package_from_pyproject(instructions):
    copies = " ".join(args for keyword, args in instructions if keyword == "COPY")
    assert "pyproject.toml" in copies and "src" in copies
    installs = [
        args for keyword, args in instructions if keyword == "RUN" and "pip install" in args
    ]
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", args) for args in installs), installs


def test_runs_as_a_non_root_user(instructions):
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_entrypoint_is_the_scratchpath_command(instructions):
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].replace(" ", "") == '["scratchpath"]'


def test_declares_workdir_and_data_volumes(instructions):
    keywords = {keyword for keyword, _ in instructions}
    assert "WORKDIR" in keywords
    volumes = " ".join(args for keyword, args in instructions if keyword == "VOLUME")
    assert "/data" in volumes and "/runs" in volumes


def test_header_documents_build_and_gpu_run():
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert "docker build -t scratchpath -f docker/Dockerfile ." in header
    assert "--gpus all" in header and "--shm-size" in header


def test_dockerignore_keeps_environment_and_data_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "runs", "data"} <= ignored
