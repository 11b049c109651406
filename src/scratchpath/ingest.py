"""Slides -> tissue tiles at a target µm/px -> a patch store (``scratchpath ingest``).

Per slide: take its fast identity (size, mtime and the sha256 of its first and last MiB: a
rerun skips a committed slide on that alone, without reading it), open it, build a thumbnail
and its tissue mask, lay a grid of non-overlapping tiles over the pyramid level at or just
finer than the target µm/px, keep tiles whose tissue fraction reaches ``min_tissue``, read
them, downsample with area averaging (skipped when the level is within 5 % of the target) and
encode them with the store's codec. The full sha256 of the file is computed once, by a pool
job that runs beside the slide's tile reads (not in a separate pass before them), and recorded
with the slide. Planning and tile reading/encoding run in worker processes (``workers``); the
main process alone writes, one slide at a time, and commits each slide atomically, so a killed
run resumes where it stopped and never duplicates tiles.

Several target µm/px (``mpp=(0.25, 0.5, 1, 2)``) are cut in the same pass over each slide: one
open, one thumbnail and tissue mask, then one grid per µm/px (each read from its own nearest
finer level, tissue-filtered on its own tile boxes), all committed with the slide. Every tile
records its level-0 corner, so tiles of different µm/px are linked by slide and position. A
µm/px finer than a slide's level 0 is left out for that slide (noted in its record).

Cost per slide is independent of how many slides came before: a commit writes only its own
tiles' table bytes, and each slide's outcome is one line appended to ``<out>/run.log.jsonl``
(``<out>/run.json`` is written at the start and the end of a run).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write, file_sha256
from scratchpath.slides import (
    Slide,
    is_slide_file,
    level_for_mpp,
    native_within,
    open_slide,
    slide_stem,
)
from scratchpath.tissue import pen_mask, tissue_fractions, tissue_mask

CHUNK_TILES = 64  # tiles per worker job: large enough to amortise opening the slide
THUMB_MIN, THUMB_MAX = 1024, 4096  # long side of the tissue-mask thumbnail
MASK_PX_PER_TILE = 8  # aim for at least 8×8 mask pixels under every tile
FAST_ID_BYTES = 2**20  # the fast identity hashes this much of each end of the file

# Fast identities of the slides committed before this run, set once per worker process (by the
# pool initializer) rather than pickled with every job.
_COMPLETE: frozenset[str] = frozenset()


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


def _set_complete(complete: frozenset[str]) -> None:
    global _COMPLETE
    _COMPLETE = complete


@dataclass(frozen=True)
class TilingOptions:
    """How tiles are cut: target µm/px (one, or several cut in one pass), tile edge (px),
    minimum tissue fraction, fallback µm/px."""

    mpp: float | tuple[float, ...] = 0.5
    tile_size: int = 224
    min_tissue: float = 0.5
    assume_mpp: float | None = None

    @property
    def mpps(self) -> tuple[float, ...]:
        """The target µm/px as a tuple, in the order given."""
        return tuple(self.mpp) if isinstance(self.mpp, (tuple, list)) else (float(self.mpp),)


@dataclass
class Grid:
    """The tiles of one target µm/px of a slide: where they are read and which are kept."""

    target_mpp: float
    level: int
    read_size: int  # square window read per tile, in level px
    stored_mpp: float
    xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # level-0 px
    fractions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class SlidePlan:
    """What a worker found out about one slide before any tile is read."""

    path: str
    record: dict
    status: str = "planned"  # planned | skipped | failed
    reason: str = ""
    grids: list[Grid] = field(default_factory=list)  # one per target µm/px the slide provides
    thumbnail_png: bytes = b""
    thumbnail: np.ndarray | None = None  # plain RGB thumbnail, when asked for (keep_thumbnail)
    thumbnail_scale: float = 0.0  # level-0 px per pixel of ``thumbnail``

    @property
    def n_tiles(self) -> int:
        return sum(len(g.xy) for g in self.grids)


@dataclass
class IngestReport:
    """Outcome of :func:`ingest`: one entry per slide in ``slides`` and totals."""

    store: str
    slides: list[dict]
    n_tiles: int
    seconds: float

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.slides if s["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        ok = sum(s["status"] == "ok" for s in self.slides)
        skipped = sum(s["status"] == "skipped" for s in self.slides)
        return (
            f"{self.store}: {ok} slide(s) ingested ({self.n_tiles} tiles), {skipped} already in "
            f"the store, {len(self.failed)} failed [{self.seconds:.1f} s]"
        )


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


def tile_grid(slide: Slide, options: TilingOptions) -> tuple[int, int, float, np.ndarray]:
    """``(level, read_size, stored_mpp, xy)``: the level to read, the square window read per tile
    (level px), the µm/px of the stored tiles, and the level-0 corners of all whole tiles."""
    level = level_for_mpp(slide, options.mpp)
    if native_within(level, options.mpp):
        read_size, stored_mpp = options.tile_size, level.mpp
    else:
        read_size = max(1, round(options.tile_size * options.mpp / level.mpp))
        stored_mpp = level.mpp * read_size / options.tile_size
    xs = np.arange(0, level.width - read_size + 1, read_size)
    ys = np.arange(0, level.height - read_size + 1, read_size)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)  # row-major (y, then x)
    xy = np.rint(grid * level.downsample).astype(np.int64)
    return level.index, read_size, float(stored_mpp), xy


def tile_grids(slide: Slide, options: TilingOptions) -> tuple[list[Grid], list[str]]:
    """All-tile :class:`Grid` s of every target µm/px the slide can provide (not yet filtered
    for tissue), and one reason per target it cannot (finer than its level 0)."""
    grids, missing = [], []
    for target in options.mpps:
        try:
            level, read_size, stored_mpp, xy = tile_grid(slide, replace(options, mpp=target))
        except ScratchpathError as err:
            if len(options.mpps) == 1:
                raise
            missing.append(str(err))
            continue
        grids.append(Grid(target, level, read_size, stored_mpp, xy))
    if not grids:
        raise ScratchpathError(missing[0])
    return grids, missing


def plan_slide(
    path: str,
    options: TilingOptions,
    complete: frozenset[str] | None = None,
    keep_thumbnail: int = 0,
) -> SlidePlan:
    """Identify, open and tile one slide at every target µm/px (runs in a worker). Never
    raises for a bad slide.

    ``complete`` holds the fast identities of committed slides (default: the set the pool's
    initializer gave this worker); such a slide is skipped without being opened.
    ``keep_thumbnail`` > 0 also keeps the plain thumbnail, at most that many px on its long
    side, in ``plan.thumbnail`` (``embed`` stores it for attention heatmaps).
    """
    complete = _COMPLETE if complete is None else complete
    p = Path(path)
    record = {"source": str(p.resolve()) if p.exists() else str(p), "slide_id": slide_stem(p)}
    plan = SlidePlan(path=path, record=record)
    try:
        if p.is_file() or p.is_dir():
            size = sum(f.stat().st_size for f in slide_files(p))
            record.update(bytes=size, fast_id=fast_id(p), sha256="")
            if record["fast_id"] in complete:
                plan.status = "skipped"
                return plan
        with open_slide(p, assume_mpp=options.assume_mpp) as slide:
            record.update(slide_id=slide.slide_id, vendor=slide.vendor, mpp=slide.mpp)
            record.update(width=slide.levels[0].width, height=slide.levels[0].height)
            grids, missing = tile_grids(slide, options)
            if missing:
                record["mpp_not_cut"] = missing
            steps = [g.read_size * slide.levels[g.level].downsample for g in grids]
            # One mask for all µm/px, fine enough for the smallest tiles.
            size = int(np.clip(MASK_PX_PER_TILE * max(record["width"], record["height"])
                               / min(steps), THUMB_MIN, THUMB_MAX))  # fmt: skip
            thumb, scale = slide.thumbnail(size)
            if keep_thumbnail > 0:
                plan.thumbnail, plan.thumbnail_scale = _shrink(thumb, scale, keep_thumbnail)
            pen = pen_mask(thumb)
            mask = tissue_mask(thumb, pen)
            n_grid, shown = 0, None
            for grid, step in zip(grids, steps, strict=True):
                n_grid += len(grid.xy)
                boxes = np.concatenate([grid.xy, grid.xy + step], axis=1) / scale
                fractions = tissue_fractions(mask, boxes)
                keep = fractions >= options.min_tissue
                grid.xy, grid.fractions = grid.xy[keep], fractions[keep]
                shown = boxes[keep] if shown is None else shown  # outline the first µm/px
            plan.grids = grids
            plan.thumbnail_png = render_thumbnail(thumb, mask, pen, shown)
        if n_grid == 0:
            g = grids[0]
            plan.status = "failed"
            plan.reason = f"{path}: smaller than one tile ({g.read_size} px at level {g.level})"
        elif plan.n_tiles == 0:
            plan.status = "failed"
            plan.reason = (
                f"{path}: no tissue tiles (none of {n_grid} tiles reaches "
                f"min_tissue {options.min_tissue:g})"
            )
    except ScratchpathError as err:
        plan.status, plan.reason = "failed", str(err)
    except Exception as err:  # a damaged file can upset the TIFF parser in many ways
        plan.status, plan.reason = "failed", f"{path}: {type(err).__name__}: {err}".split("\n")[0]
    return plan


def level_corners(xy: np.ndarray, downsample: float) -> np.ndarray:
    """``(N, 2)`` corners, in pixels of the level read, of the tiles whose level-0 corners are
    ``xy`` (the inverse of :func:`tile_grid`'s placement: exact for every tile it made)."""
    return np.rint(np.asarray(xy, np.float64).reshape(-1, 2) / downsample).astype(np.int64)


def iter_tiles(
    slide: Slide, level: int, read_size: int, tile_size: int, xy: np.ndarray
) -> Iterator[np.ndarray]:
    """The ``(tile_size, tile_size, 3)`` uint8 tiles with level-0 corners ``xy``: a
    ``read_size`` window of ``level``, area-downsampled to ``tile_size`` when they differ.
    What ``ingest`` stores (before encoding) and ``embed`` embeds on its CPU path."""
    import cv2

    for x, y in level_corners(xy, slide.levels[level].downsample).tolist():
        region = slide.read_region(level, x, y, read_size, read_size)
        if read_size != tile_size:
            region = cv2.resize(region, (tile_size, tile_size), interpolation=cv2.INTER_AREA)
        yield region


def _shrink(image: np.ndarray, scale: float, max_size: int) -> tuple[np.ndarray, float]:
    """``image`` area-reduced to at most ``max_size`` px on its long side, and its new scale."""
    import cv2

    factor = max(image.shape[:2]) / max_size
    if factor <= 1:
        return image, scale
    size = (max(1, round(image.shape[1] / factor)), max(1, round(image.shape[0] / factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return small, scale * image.shape[1] / size[0]


def read_tiles(
    path: str, options: TilingOptions, level: int, read_size: int, xy: np.ndarray, codec
) -> list[bytes]:
    """Read, resample and encode the tiles with level-0 corners ``xy`` (runs in a worker)."""
    with open_slide(path, assume_mpp=options.assume_mpp) as slide:
        tiles = iter_tiles(slide, level, read_size, options.tile_size, xy)
        return [codec.encode(tile) for tile in tiles]


def render_thumbnail(
    thumb: np.ndarray, mask: np.ndarray, pen: np.ndarray, boxes: np.ndarray
) -> bytes:
    """PNG of the thumbnail: background dimmed, pen ink tinted blue, kept tiles outlined."""
    from PIL import Image, ImageDraw

    shown = thumb.astype(np.float32)
    shown[~mask] = shown[~mask] * 0.45 + 40
    shown[pen] = shown[pen] * 0.4 + np.array([0, 60, 150])
    image = Image.fromarray(shown.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 200, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 6 costs 5× the time
    return buffer.getvalue()


class InlineExecutor:
    """Executor stand-in running each job at submit time, in this process and thread (one worker
    of ``ingest``, ``workers=0`` of ``embed``): the same ``submit``/``shutdown`` as a pool, so the
    caller has one code path."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def ingest(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    mpp: float | Sequence[float] = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    assume_mpp: float | None = None,
    codec: str = "jpeg",
    quality: int = 90,
    progress: bool = True,
    on_failure: Callable[[str], None] | None = None,
) -> IngestReport:
    """Tile slides (files or folders of them) into the patch store ``out``.

    Args:
        paths: slide files and/or directories (searched recursively for slide suffixes).
        out: store folder, created or appended to (tile_size and codec must match).
        mpp: target µm per pixel of the stored tiles, or several (e.g. ``(0.25, 0.5, 1, 2)``),
            all cut in one pass over each slide.
        tile_size: tile edge in pixels.
        min_tissue: keep tiles whose tissue fraction (from the thumbnail mask) is at least this.
        workers: processes that plan slides and read/encode tiles (1 = all in this process).
        shard: ``(i, n)`` ingests only every n-th slide from the i-th on (SLURM arrays: one store
            per shard, opened together with ``PatchStore(a, b, ...)``).
        assume_mpp: µm/px for slides that record none.
        codec, quality: tile codec of a new store (see ``StoreWriter``).
        progress: show a tqdm bar on stderr (only when it is a terminal).
        on_failure: called with the one-line reason of each failed slide as it happens.

    Slides already in the store (same sha256) are skipped; failed slides are recorded in the
    store's slide table and in ``<out>/run.json`` and the others still ingest.
    """
    from tqdm import tqdm

    from scratchpath.store import StoreWriter

    mpps = tuple(dict.fromkeys(float(m) for m in np.atleast_1d(np.asarray(mpp, float))))
    if not mpps or not all(m > 0 for m in mpps):
        raise ScratchpathError(f"mpp: must be positive, got {mpp}")
    if tile_size < 8:
        raise ScratchpathError(f"tile_size: must be at least 8, got {tile_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ScratchpathError(f"min_tissue: must be within 0..1, got {min_tissue}")
    if workers < 1:
        raise ScratchpathError(f"workers: must be at least 1, got {workers}")
    slides = select_shard(find_slides(paths), shard)
    if not slides:
        raise ScratchpathError(f"{', '.join(map(str, paths)) or 'paths'}: no slide files found")
    options = TilingOptions(mpps[0] if len(mpps) == 1 else mpps, tile_size, min_tissue, assume_mpp)
    start = time.perf_counter()
    outcomes: list[dict] = []
    run_info = {
        "arguments": {"paths": [str(p) for p in paths], "out": str(out), "shard": shard,
                      "workers": workers, "codec": codec, "quality": quality, **asdict(options)},
        "status": "running",
    }  # fmt: skip
    bar = tqdm(total=len(slides), unit="slide", disable=not (progress and sys.stderr.isatty()))
    with StoreWriter(out, tile_size=tile_size, codec=codec, quality=quality) as writer:
        root = Path(writer.path)
        (root / "thumbnails").mkdir(exist_ok=True)
        complete, seen_ids = _committed(writer)
        pool = InlineExecutor() if workers == 1 else _spawn_pool(workers, complete)
        if workers == 1:
            _set_complete(complete)
        _write_atomic(root / "run.json", json.dumps(run_info, indent=1).encode())
        log = open(root / "run.log.jsonl", "a")  # noqa: SIM115
        log.write(json.dumps({"run_started": time.time(), **run_info}) + "\n")
        plans: deque[Future] = deque()
        todo = iter(slides)
        n_tiles = 0
        try:
            for _ in range(workers + 1):
                _submit_next_plan(pool, todo, options, plans)
            while plans:
                plan: SlidePlan = plans.popleft().result()
                _submit_next_plan(pool, todo, options, plans)
                outcome = _ingest_one(pool, writer, plan, options, seen_ids, workers)
                outcomes.append(outcome)
                n_tiles += outcome["n_tiles"]
                if outcome["status"] == "failed" and on_failure is not None:
                    on_failure(outcome["reason"])
                bar.update(1)
                bar.set_postfix(tiles=n_tiles)
                log.write(json.dumps(outcome) + "\n")  # O(1) per slide; the commit is durable
                log.flush()
        finally:
            pool.shutdown(cancel_futures=True)
            bar.close()
            log.close()
            _set_complete(frozenset())
        report = IngestReport(str(out), outcomes, n_tiles, time.perf_counter() - start)
        run_info.update(status="finished", summary=report.summary(), seconds=report.seconds,
                        slides=outcomes)  # fmt: skip
        _write_atomic(root / "run.json", json.dumps(run_info, indent=1).encode())
    return report


def _spawn_pool(workers: int, complete: frozenset[str]) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_complete,
        initargs=(complete,),
    )


def _committed(writer) -> tuple[frozenset[str], set[str]]:
    """Fast identities and slide ids of the slides already committed to the store."""
    # Workers skip the tiling work of committed slides; the writer's is_complete is checked
    # again before writing (which also catches the same file listed twice in one run).
    ok = [s for s in writer.slides if s.get("status") == "ok"]
    return frozenset(s["fast_id"] for s in ok if s.get("fast_id")), {s["slide_id"] for s in ok}


def _submit_next_plan(pool, todo, options, plans: deque) -> None:
    path = next(todo, None)
    if path is not None:
        plans.append(pool.submit(plan_slide, str(path), options, None))


def _ingest_one(pool, writer, plan: SlidePlan, options, seen_ids: set, workers: int) -> dict:
    """Write one planned slide (its tiles read by the pool), or record why it failed."""
    record = dict(plan.record)
    outcome = {"source": plan.path, "slide_id": record["slide_id"], "n_tiles": 0}
    if plan.status == "skipped" or (
        plan.status == "planned" and writer.is_complete(record.get("fast_id", "-"))
    ):
        return {**outcome, "status": "skipped", "reason": "already in the store"}
    if record["slide_id"] in seen_ids:  # same file name in two folders, or a changed file
        digest = record.get("fast_id", "").rsplit(":", 1)[-1]
        record["slide_id"] = f"{record['slide_id']}-{digest[:8]}"
    seen_ids.add(record["slide_id"])
    outcome["slide_id"] = record["slide_id"]
    if plan.thumbnail_png:
        _write_atomic(writer.path / "thumbnails" / f"{record['slide_id']}.png", plan.thumbnail_png)
    if plan.status == "failed":
        writer.record_failure({"sha256": "", **record}, plan.reason)
        return {**outcome, "status": "failed", "reason": plan.reason}
    levels = _per_grid(plan.grids, lambda g: g.level)
    tile_mpps = _per_grid(plan.grids, lambda g: g.stored_mpp)
    record.update(level=levels, tile_mpp=tile_mpps, target_mpp=options.mpp)
    if len(plan.grids) > 1:
        record["tiles_per_mpp"] = {f"{g.target_mpp:g}": len(g.xy) for g in plan.grids}
    # (grid, first tile) of every chunk: all µm/px of the slide, one after the other.
    chunks = [(g, first) for g in plan.grids for first in range(0, len(g.xy), CHUNK_TILES)]
    pending: deque[tuple[Future, Grid, int]] = deque()
    submitted = 0
    # The one full read for the sha256, in the pool beside the tile reads.
    sha256 = pool.submit(slide_sha256, plan.path)
    slide_writer = writer.begin_slide(record)
    try:
        while submitted < len(chunks) or pending:
            while submitted < len(chunks) and len(pending) < 2 * workers:
                grid, first = chunks[submitted]
                xy = grid.xy[first : first + CHUNK_TILES]
                job = (read_tiles, plan.path, options, grid.level, grid.read_size, xy, writer.codec)
                pending.append((pool.submit(*job), grid, first))
                submitted += 1
            future, grid, first = pending.popleft()
            _add_chunk(slide_writer, future.result(), first, grid)
        record["sha256"] = sha256.result()
        if writer.is_complete(record["sha256"]):  # the same bytes under another name or time
            slide_writer.abort()
            return {**outcome, "status": "skipped", "reason": "same content already in the store"}
        slide_writer.update_record(sha256=record["sha256"])
        slide_writer.commit()
    except Exception as err:
        slide_writer.abort()
        for future, _, _ in pending:
            future.cancel()
        reason = str(err) if isinstance(err, ScratchpathError) else f"{plan.path}: {err!r}"
        writer.record_failure(record, reason)
        return {**outcome, "status": "failed", "reason": reason}
    extra = {"tiles_per_mpp": record["tiles_per_mpp"]} if "tiles_per_mpp" in record else {}
    return {**outcome, "status": "ok", "reason": "", "n_tiles": plan.n_tiles,
            "level": levels, "tile_mpp": tile_mpps, **extra}  # fmt: skip


def _per_grid(grids: list[Grid], value: Callable[[Grid], float]):
    """One grid's value as is, several grids' as a list (the single-µm/px records unchanged)."""
    return value(grids[0]) if len(grids) == 1 else [value(g) for g in grids]


def _add_chunk(slide_writer, blobs: list[bytes], first: int, grid: Grid) -> None:
    n = len(blobs)
    xy = grid.xy[first : first + n]
    slide_writer.add_encoded(
        blobs,
        x=xy[:, 0],
        y=xy[:, 1],
        level=np.full(n, grid.level),
        mpp=np.full(n, grid.stored_mpp),
        tissue_fraction=grid.fractions[first : first + n],
    )
