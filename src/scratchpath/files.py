"""File helpers that every layer may use: all-or-nothing replacement and content hashes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed over
    ``path``, so readers (and a run killed at any moment) see the old file or the whole new one,
    never a part. On an exception the temporary file is removed and ``path`` is untouched.

    The temporary file is ``.<name>.<pid>.tmp`` (the store's writer sweeps up leftovers of that
    pattern), so writers that infer a format from the suffix must be told it::

        with atomic_write(out / "grid.png") as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (slides can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()
