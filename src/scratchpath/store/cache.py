"""A node-local cache of tables derived from stores, memory-mapped by every process of a machine.

Entries are folders named by a key that hashes what they were built from (the stores' committed
states): merged tile tables (:mod:`scratchpath.store.merge`), the tables of remote stores and
the µm-field index (:mod:`scratchpath.data.fields`). The first process that needs an entry
builds it; the ranks and DataLoader workers of the machine then map the same files (one copy
in the page cache, nothing private).

Where: ``$SCRATCHPATH_CACHE`` when set, else ``$TMPDIR/scratchpath-<uid>`` (``/tmp`` when
``TMPDIR`` is unset; SLURM and most schedulers point ``TMPDIR`` at node-local disk). Node-local
by default because a home directory is usually small (quotas) and network-mounted, a 10^8-tile
merged table is 3.2 GB, and ``flock`` is node-local or unsupported on some Lustre and NFS
mounts. The folder is created private (0700) and refused when another user owns it.

Failure is never fatal: any ``OSError`` while building or mapping an entry (quota, full disk,
read-only file system, no ``flock``) falls back to building the table in process memory, with
one warning. Entries are built with ordinary writes into a temporary folder and renamed into
place, never through a writable memory map, so a full disk is an ``ENOSPC`` error, not a
SIGBUS; entries are evicted by renaming and unlinking, never truncating, so a process that
still maps an evicted entry keeps reading it safely. The lock only avoids duplicate work: two
processes that build the same entry without it (no ``flock``) both succeed and one rename wins.

Size: after each build, entries are evicted least recently used first (each use touches its
``done`` file) until the cache holds at most ``$SCRATCHPATH_CACHE_GB`` (default: a quarter of
its file system); the entry in use is never evicted. Temporary folders of builds that died
(their process is gone, or they are older than a day) are removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CACHE_ENV = "SCRATCHPATH_CACHE"
SIZE_ENV = "SCRATCHPATH_CACHE_GB"
STALE_SECONDS = 24 * 3600  # a temporary folder older than this belongs to a dead build
_TEMP_SUFFIXES = (".building", ".evicting")

T = TypeVar("T")


def cache_root() -> Path:
    """Where derived tables are cached (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"scratchpath-{os.getuid()}"


def size_limit(root: Path) -> int:
    """Bytes the cache may hold: ``$SCRATCHPATH_CACHE_GB`` or a quarter of its file system."""
    env = os.environ.get(SIZE_ENV)
    if env:
        return int(float(env) * 2**30)
    stat = os.statvfs(root)
    return stat.f_blocks * stat.f_frsize // 4


def cached_or_none(
    key: str, build: Callable[[Path], None], what: str, load: Callable[[Path], T] = lambda p: p
) -> T | None:
    """``load(folder)`` of the cache entry ``key`` (built by ``build(tmp_folder)`` if missing),
    or None, with one warning naming ``what``, when the cache cannot be used (any ``OSError``):
    the caller then builds its table in memory."""
    try:
        return load(cached(key, build))
    except OSError as err:
        warnings.warn(
            f"{cache_root()}: cannot cache the {what} ({err}); building it in memory instead "
            f"(set {CACHE_ENV} to a writable node-local folder)",
            stacklevel=3,
        )
        return None


def cached(key: str, build: Callable[[Path], None]) -> Path:
    """The folder of entry ``key``, built once by ``build(tmp_folder)`` (raises OSError when the
    cache cannot be used)."""
    root = cache_root()
    folder = root / key
    if (folder / "done").exists():
        _touch(folder)
        return folder
    _make_root(root)
    _remove_stale(root)
    lock = _lock(root / f".{key}.lock")
    try:
        if not (folder / "done").exists():
            tmp = root / f".{key}.{_owner_tag()}.building"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / "done").write_bytes(b"")
                _publish(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            evict(root, keep=key)
    finally:
        if lock is not None:
            lock.close()
    _touch(folder)
    return folder


def evict(root: Path, keep: str = "", limit: int | None = None) -> list[str]:
    """Remove the least recently used entries until the cache holds at most ``limit`` bytes
    (default :func:`size_limit`); ``keep`` is never removed. Returns the removed keys."""
    limit = size_limit(root) if limit is None else limit
    entries = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not (folder / "done").exists():
            continue
        try:
            size = sum(f.stat().st_blocks * 512 for f in folder.iterdir())
            entries.append(((folder / "done").stat().st_mtime, folder, size))
        except OSError:  # removed by another process meanwhile
            continue
    total = sum(size for _, _, size in entries)
    removed = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if folder.name == keep:
            continue
        # Rename first (atomic), then unlink: a process mapping these files keeps reading them.
        doomed = root / f".{folder.name}.{_owner_tag()}.evicting"
        try:
            os.rename(folder, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        (root / f".{folder.name}.lock").unlink(missing_ok=True)
        total -= size
        removed.append(folder.name)
    return removed


def _make_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = root.stat().st_uid
    if owner != os.getuid():
        raise OSError(errno.EPERM, f"owned by another user (uid {owner})")


def _lock(path: Path):
    """An exclusive ``flock`` on ``path``, or None where the file system has none (some Lustre
    and NFS mounts): building then proceeds unlocked (see the module docstring)."""
    handle = open(path, "a")  # noqa: SIM115
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except OSError:
        handle.close()
        return None
    return handle


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` to ``folder``; a complete entry already there (built by a
    process that held no lock) is kept, an incomplete one replaced."""
    if folder.exists() and not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (folder / "done").exists():
            raise


def _owner_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _remove_stale(root: Path) -> None:
    """Remove temporary folders whose build or eviction died (see the module docstring)."""
    host, now = socket.gethostname(), time.time()
    for path in root.iterdir():
        if not (path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIXES)):
            continue
        stem = path.name.rsplit(".", 1)[0]  # .KEY.PID@HOST (a host name may hold dots)
        left, _, owner_host = stem.partition("@")
        pid_text = left.rpartition(".")[2]
        try:
            dead = owner_host == host and not _alive(int(pid_text))
            dead = dead or now - path.stat().st_mtime > STALE_SECONDS
        except (ValueError, OSError):
            continue
        if dead:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _touch(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache is still usable
        os.utime(folder / "done")  # the least-recently-used clock of eviction
