"""File helpers that every layer may use: all-or-nothing replacement, content hashes and the
permissions a plain ``open`` / ``mkdir`` would have given."""

from __future__ import annotations

import hashlib
import os
import threading
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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it: set and restore)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def readable_as_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``mkdir`` (0777) or ``open`` (0666) would have under the
    current umask. ``tempfile.mkdtemp`` / ``mkstemp``, the usual way to stage an atomic write,
    create 0700 folders and 0600 files that nobody else can read, whatever the umask says."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())
