"""The requirements and constraints that install scratchpath's dependencies on a base image.

Run by ``docker/Dockerfile`` before the package's source is copied in (so that a change to
``src/`` alone does not reinstall the dependencies)::

    python lock_for_base.py pyproject.toml constraints.txt OUT_DIR

writes ``OUT_DIR/requirements.txt``: pyproject's runtime dependencies and its build requirements
(the package itself then installs with ``--no-deps --no-build-isolation``, downloading nothing),
and ``OUT_DIR/constraints.txt``: the lock (the exact tested versions), except that when the base
already holds torch, every package of its torch stack that the base holds (torch, torchvision,
torchaudio, triton, ``nvidia-*``, ``cuda-*``) is pinned to the base's version instead of the
lock's. A CUDA PyTorch base's torch was built for its CUDA; installing the lock's wheels over it
would download gigabytes and could swap its CUDA runtime. If the base's torch is outside
pyproject's range, pip stops with a resolution error naming torch: nothing is replaced silently.

Standard library only: it runs in the bare base before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.+|cuda-.+)$")


def normalise(name: str) -> str:
    """PEP 503 name: ``Nvidia_CUBLAS`` and ``nvidia-cublas`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Normalised name -> version of every distribution in this environment."""
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}


def base_constraints(lock_lines: Iterable[str], installed: dict[str, str]) -> list[str]:
    """The lock's lines, with the torch stack the base holds pinned to the base's versions
    (when the base holds torch; otherwise the lock unchanged)."""
    lines = list(lock_lines)
    if "torch" not in installed:
        return lines
    kept = {name: version for name, version in installed.items() if TORCH_STACK.match(name)}
    out = []
    for line in lines:
        name = normalise(line.split("==", 1)[0].strip()) if "==" in line else ""
        if name not in kept:
            out.append(line)
    out.append("# the base image's torch stack, kept (see docker/lock_for_base.py)")
    out += [f"{name}=={version}" for name, version in sorted(kept.items())]
    return out


def requirements(pyproject: dict) -> list[str]:
    """Runtime dependencies, then what building the package needs."""
    return list(pyproject["project"]["dependencies"]) + list(pyproject["build-system"]["requires"])


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    pyproject_path, lock_path, out = (Path(a) for a in argv)
    pyproject = tomllib.loads(pyproject_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "requirements.txt").write_text("\n".join(requirements(pyproject)) + "\n")
    installed = installed_versions()
    lines = base_constraints(lock_path.read_text().splitlines(), installed)
    (out / "constraints.txt").write_text("\n".join(lines) + "\n")
    torch = installed.get("torch")
    print(f"torch: {'kept from the base, ' + torch if torch else 'installed from the lock'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
