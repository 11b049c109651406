"""docker/Dockerfile and docker/lock_for_base.py without a Docker engine (what `make test` can
check); tests/test_container.py builds the image and runs it (`make test-container`)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _load_lock_for_base():
    spec = importlib.util.spec_from_file_location("lock_for_base", REPO / "docker/lock_for_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_for_base = _load_lock_for_base()


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


def _lock() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and line[0] != "#")


def test_base_is_a_build_argument_defaulting_to_the_lock_torch_on_its_cuda() -> None:
    instructions = _instructions()
    default = next(a for k, a in instructions if k == "ARG" and a.startswith("BASE="))
    image = default.split("=", 1)[1]
    assert instructions[[k for k, _ in instructions].index("FROM")][1].startswith("${BASE}")
    name, _, tag = image.rpartition(":")
    assert name == "pytorch/pytorch" and "latest" not in tag, image
    torch_version, cuda = tag.split("-")[:2]  # <torch>-cuda<x.y>-cudnn<n>-runtime
    lock = _lock()
    assert torch_version == lock["torch"]
    assert cuda == "cuda" + ".".join(lock["cuda-toolkit"].split(".")[:2])


def test_dependencies_install_before_the_source_is_copied() -> None:
    """So that a change in src/ alone reuses the dependency layer."""
    steps = [f"{k} {a}" for k, a in _instructions() if k in {"COPY", "RUN"}]
    deps = next(i for i, s in enumerate(steps) if "-c lock/constraints.txt" in s)
    source = next(i for i, s in enumerate(steps) if s.startswith("COPY src"))
    assert deps < source
    assert all("src" not in s.split() for s in steps[:deps])


def test_dockerignore_keeps_environment_and_data_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "runs", "data"} <= ignored


LOCK_LINES = ["# the lock", "numpy==2.4.6", "torch==2.14.1", "torchvision==0.29.1",
              "nvidia-cublas==13.1.1.3", "nvidia-nvjitlink==13.5.37", "triton==3.8.0"]  # fmt: skip


def test_a_base_without_torch_installs_the_lock_unchanged() -> None:
    installed = {"numpy": "2.0.0", "pip": "25.0"}
    assert lock_for_base.base_constraints(LOCK_LINES, installed) == LOCK_LINES


def test_a_base_with_torch_keeps_its_torch_stack_and_the_lock_for_the_rest() -> None:
    installed = {"torch": "2.14.1+cu130", "torchvision": "0.29.0", "nvidia-nvjitlink": "13.4.92",
                 "nvidia-cudnn-cu13": "9.24.0.43", "numpy": "2.0.0"}  # fmt: skip
    lines = lock_for_base.base_constraints(LOCK_LINES, installed)
    pins = dict(line.split("==") for line in lines if "==" in line)
    assert pins == {
        "numpy": "2.4.6",  # not the torch stack: the lock's
        "nvidia-cublas": "13.1.1.3",  # not in the base: the lock's line stays
        "triton": "3.8.0",
        "torch": "2.14.1+cu130",
        "torchvision": "0.29.0",
        "nvidia-nvjitlink": "13.4.92",
        "nvidia-cudnn-cu13": "9.24.0.43",
    }
    assert len([line for line in lines if line.startswith("torch==")]) == 1


def test_package_names_are_compared_normalised() -> None:
    lines = lock_for_base.base_constraints(["Nvidia_NVJitLink==13.5.37"], {
        "torch": "2.14.1", "nvidia-nvjitlink": "13.4.92"})  # fmt: skip
    assert [line for line in lines if "==" in line] == [
        "nvidia-nvjitlink==13.4.92",
        "torch==2.14.1",
    ]


def test_requirements_are_the_runtime_and_build_dependencies_of_pyproject(tmp_path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    written = lock_for_base.requirements(pyproject)
    assert written == pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    assert not any(dev in " ".join(written) for dev in ("pytest", "ruff"))


@pytest.mark.parametrize("with_torch", [False, True])
def test_main_writes_both_files(tmp_path: Path, monkeypatch, with_torch: bool) -> None:
    installed = {"torch": "2.14.1", "triton": "3.7.0"} if with_torch else {}
    monkeypatch.setattr(lock_for_base, "installed_versions", lambda: installed)
    status = lock_for_base.main([str(REPO / "pyproject.toml"), str(REPO / "constraints.txt"),
                                 str(tmp_path)])  # fmt: skip
    assert status == 0
    constraints = (tmp_path / "constraints.txt").read_text().splitlines()
    assert ("triton==3.7.0" in constraints) is with_torch
    assert ("triton==" + _lock()["triton"] in constraints) is not with_torch
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    written = (tmp_path / "requirements.txt").read_text().splitlines()
    assert written == lock_for_base.requirements(pyproject)
