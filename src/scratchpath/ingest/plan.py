"""Planning one slide (in a worker): open it, mask its tissue, lay a tile grid per target µm/px."""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.ingest.identity import fast_id, slide_files
from scratchpath.slides import (
    Slide,
    level_for_mpp,
    native_within,
    open_slide,
    slide_stem,
)
from scratchpath.tissue import pen_mask, tissue_fractions, tissue_mask

THUMB_MIN, THUMB_MAX = 1024, 4096  # long side of the tissue-mask thumbnail
MASK_PX_PER_TILE = 8  # aim for at least 8×8 mask pixels under every tile

# Fast identities of the slides committed before this run, set once per worker process (by the
# pool initializer) rather than pickled with every job.
_COMPLETE: frozenset[str] = frozenset()


def set_complete(complete: frozenset[str]) -> None:
    """Set this process's committed fast identities (the pool's initializer; ``ingest`` itself
    when it runs with one worker, and clears them at the end)."""
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


def _shrink(image: np.ndarray, scale: float, max_size: int) -> tuple[np.ndarray, float]:
    """``image`` area-reduced to at most ``max_size`` px on its long side, and its new scale."""
    import cv2

    factor = max(image.shape[:2]) / max_size
    if factor <= 1:
        return image, scale
    size = (max(1, round(image.shape[1] / factor)), max(1, round(image.shape[0] / factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return small, scale * image.shape[1] / size[0]


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
