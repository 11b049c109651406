"""Which slides a run takes and how a slide is known again: file lists, shards, identities."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from scratchpath.errors import ScratchpathError
from scratchpath.files import file_sha256
from scratchpath.slides import is_slide_file

FAST_ID_BYTES = 2**20  # the fast identity hashes this much of each end of the file


def fast_id(path: str | os.PathLike) -> str:
    """A slide file's fast identity: ``"<size>:<mtime_ns>:<sha256 of first + last MiB>"``
    (for a DICOM folder, the sha256 of its files' names and fast identities).

    Reads at most 2 MiB per file whatever the file size, so a rerun over 10^4 committed slides
    skips them in seconds; a file rewritten in place gets a new mtime and is ingested again.
    """
    if Path(path).is_dir():
        parts = [f"{f.name}={fast_id(f)}" for f in slide_files(path)]
        return "dir:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FAST_ID_BYTES))
        if stat.st_size > FAST_ID_BYTES:
            f.seek(max(FAST_ID_BYTES, stat.st_size - FAST_ID_BYTES))
            digest.update(f.read(FAST_ID_BYTES))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def slide_files(path: str | os.PathLike) -> list[Path]:
    """The files one slide is made of: the file itself, or a DICOM folder's files (sorted)."""
    path = Path(path)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def slide_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a slide file, or of a DICOM folder's file names and their SHA-256s."""
    if not Path(path).is_dir():
        return file_sha256(path)
    parts = [f"{f.name}={file_sha256(f)}" for f in slide_files(path)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def find_slides(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given, plus the whole-slide files (SVS, TIFF, OME-TIFF, NDPI, ...; not PNG/JPEG)
    found recursively in the directories given, each directory's files sorted.

    A folder holding two or more ``.dcm`` files is one DICOM slide (scanners and PACS export a
    slide as one instance per pyramid level, plus label and overview images), so the folder,
    not each instance, is returned; a lone ``.dcm`` file is a slide of its own.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_slide_file(p))
            instances = Counter(p.parent for p in files if _is_dicom_file(p))
            for file in files:
                one_of_many = _is_dicom_file(file) and instances[file.parent] >= 2
                found.append(file.parent if one_of_many else file)
        else:
            found.append(path)  # a missing or odd file fails later, with its own message
    return list(dict.fromkeys(found))


def _is_dicom_file(path: Path) -> bool:
    return path.suffix.lower() == ".dcm"


def select_shard(paths: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Slides of shard ``(i, n)``: every slide whose position in the sorted list is i mod n."""
    if shard is None:
        return list(paths)
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ScratchpathError(f"shard: expected I/N with 0 <= I < N, got {index}/{count}")
    ordered = sorted(paths, key=lambda p: str(p))
    return [p for k, p in enumerate(ordered) if k % count == index]
