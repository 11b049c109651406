"""Importing ready-made tiles (class folders or a labels CSV) into a patch store.

Tiles of another size than ``tile_size`` are **resized** (after a centre crop to a square if
needed), not cropped: a tile dataset's label describes the whole field of view, and small tiles
such as Kather 2016's 150×150 could not be cropped to 224 anyway. The stored µm/px is scaled
accordingly (``mpp * source_size / tile_size``). Imported tiles get tissue_fraction 1.0 (they
were curated) and x = y = level = 0.

Tiles are committed in batches of ``shard_size``; each batch is one "slide" record whose sha256
covers its files' bytes, labels and groups, so re-running an interrupted import skips the
batches already committed. Each unreadable image is reported by ``on_error`` in one line and
recorded as a failed slide record; the rest still import.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store.codecs import TileCodec
from scratchpath.store.writer import StoreWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class ImportReport:
    """What :func:`import_tiles` did."""

    imported: int = 0
    skipped: int = 0  # already in the store (resumed import)
    failed: list[str] = field(default_factory=list)  # one "path: reason" line per bad image
    class_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    path: Path
    label: int
    group: str


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _items_from_folders(source: Path, use_labels: bool) -> tuple[list[_Item], list[str]]:
    class_dirs = sorted(p for p in source.iterdir() if p.is_dir() and _list_images(p))
    loose = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not use_labels or not class_dirs:
        images = _list_images(source)
        if not images:
            raise ScratchpathError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [_Item(p, -1, "") for p in images], []
    if loose:
        raise ScratchpathError(
            f"{source}: has both class folders and loose images ({loose[0].name}); "
            "use --labels CSV or --no-labels"
        )
    names = [d.name for d in class_dirs]
    items = [_Item(p, k, "") for k, d in enumerate(class_dirs) for p in _list_images(d)]
    return items, names


def _items_from_csv(
    source: Path, labels_csv: Path, group_column: str | None
) -> tuple[list[_Item], list[str]]:
    try:
        with open(labels_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ScratchpathError(f"{labels_csv}: cannot read ({err})") from None
    header = list(rows[0]) if rows else []
    for needed in ("path", "label"):
        if needed not in header:
            raise ScratchpathError(f"{labels_csv}: no {needed!r} column (found {header})")
    if group_column is None and "group" in header:
        group_column = "group"
    if group_column is not None and group_column not in header:
        raise ScratchpathError(f"{labels_csv}: no group column {group_column!r} (found {header})")
    names = sorted({r["label"] for r in rows})
    index = {name: k for k, name in enumerate(names)}
    items = []
    for r in rows:
        path = source / r["path"]
        if not path.exists() and (labels_csv.parent / r["path"]).exists():
            path = labels_csv.parent / r["path"]
        group = str(r[group_column]) if group_column else ""
        items.append(_Item(path, index[r["label"]], group))
    return items, names


def _load_tile(data: bytes, tile_size: int) -> tuple[np.ndarray, int]:
    """Decode to RGB, centre-crop to a square, resize to tile_size; also the source edge."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        edge = min(w, h)
        if w != h:
            left, top = (w - edge) // 2, (h - edge) // 2
            img = img.crop((left, top, left + edge, top + edge))
        if edge != tile_size:
            img = img.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8), edge


def _encode_image(data: bytes | None, codec: TileCodec) -> tuple[bytes, int] | str:
    """(encoded tile, source edge in px), or the one-line reason the image is unusable."""
    if data is None:
        return "cannot read file"
    try:
        tile, edge = _load_tile(data, codec.tile_size)
    except Exception as err:  # any decoder failure on user files: report it, import the rest
        text = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return codec.encode(tile), edge


def import_tiles(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    group_column: str | None = None,
    use_folder_labels: bool = True,
    mpp: float | None = None,
    tile_size: int = 224,
    codec: str = "jpeg:90",
    shard_size: int = 1024,
    workers: int = 1,
    on_error: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import a folder of tiles into the store ``out`` (created, or appended to and resumed).

    Args:
        source: folder with one sub-folder per class, or with images (searched recursively) for
            an unlabelled import, or the folder that ``labels_csv`` paths are relative to.
        labels_csv: CSV with columns ``path,label[,group]`` (extra columns allowed).
        group_column: CSV column holding the group (e.g. patient/case id) used for grouped
            splits; defaults to a column named ``group`` if present.
        use_folder_labels: False imports class folders as unlabelled tiles.
        mpp: µm/px of the source images; None stores unknown µm/px.
        tile_size, codec, shard_size: store settings (see :class:`StoreWriter`).
        workers: processes decoding, resizing and encoding images (1: in this process).
        on_error: called with one line per unreadable image (default: ignore; see the report).
    """
    source = Path(source)
    if not source.is_dir():
        raise ScratchpathError(f"{source}: not a folder")
    if labels_csv is not None:
        items, class_names = _items_from_csv(source, Path(labels_csv), group_column)
    else:
        if group_column is not None:
            raise ScratchpathError("--group-column: needs --labels CSV")
        items, class_names = _items_from_folders(source, use_folder_labels)
    report = ImportReport(class_names=class_names)
    pool = _spawn_pool(workers) if workers > 1 else None
    with StoreWriter(
        out, tile_size=tile_size, codec=codec, class_names=class_names, shard_size=shard_size
    ) as writer:
        encode = partial(_encode_image, codec=writer.codec)
        mapper = partial(pool.map, chunksize=16) if pool is not None else map
        try:
            for start in range(0, len(items), shard_size):
                batch = _Batch(source, items[start : start + shard_size], start // shard_size)
                _import_batch(writer, batch, mpp, report, on_error, lambda d: mapper(encode, d))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return report


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    # spawn, not fork: the parent runs zarr's event-loop thread, which fork would not copy.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@dataclass(frozen=True)
class _Batch:
    source: Path
    items: list[_Item]
    number: int


def _import_batch(
    writer: StoreWriter,
    batch: _Batch,
    mpp: float | None,
    report: ImportReport,
    on_error: Callable[[str], None] | None,
    encode_all: Callable[[list[bytes | None]], Iterable[tuple[bytes, int] | str]],
) -> None:
    """Commit one batch of images as one "slide" record, unless an earlier run already did."""
    datas: list[bytes | None] = []
    key = hashlib.sha256(f"{writer.tile_size}|{writer.codec.name}|{mpp}".encode())
    for item in batch.items:
        try:
            data = item.path.read_bytes()
        except OSError as err:
            data = None
            key.update(f"{item.path}|missing|{err.strerror}".encode())
        else:
            key.update(hashlib.sha256(data).digest())
        key.update(f"|{item.label}|{item.group}\n".encode())
        datas.append(data)
    batch_key = key.hexdigest()
    if writer.is_complete(batch_key):
        report.skipped += len(batch.items)
        return
    blobs, labels, groups, mpps, total_bytes = [], [], [], [], 0
    for item, data, result in zip(batch.items, datas, encode_all(datas), strict=True):
        if isinstance(result, str):
            _report_bad_image(writer, item, result, report, on_error)
            continue
        blob, edge = result
        blobs.append(blob)
        labels.append(item.label)
        groups.append(item.group)
        mpps.append(np.nan if mpp is None else mpp * edge / writer.tile_size)
        total_bytes += len(data)
    record = {
        "source": str(batch.source),
        "slide_id": f"{batch.source.name}#{batch.number}",
        "bytes": total_bytes,
        "sha256": batch_key,
        "vendor": "tiles",
        "width": writer.tile_size,
        "height": writer.tile_size,
        "mpp": float(np.median(mpps)) if mpp is not None and mpps else mpp,
    }
    with writer.begin_slide(record) as slide:
        slide.add_encoded(
            blobs, label=np.array(labels, np.int64), group=np.array(groups, dtype=str), mpp=mpps
        )
    report.imported += len(blobs)


def _report_bad_image(
    writer: StoreWriter,
    item: _Item,
    reason: str,
    report: ImportReport,
    on_error: Callable[[str], None] | None,
) -> None:
    line = f"{item.path}: unreadable image ({reason})"
    report.failed.append(line)
    if on_error is not None:
        on_error(line)
    record = {
        "source": str(item.path),
        "slide_id": item.path.name,
        "vendor": "tile",
        "sha256": hashlib.sha256(line.encode()).hexdigest(),
    }
    writer.record_failure(record, reason)
