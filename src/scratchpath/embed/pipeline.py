"""The per-rank pipeline of ``embed``: plan, read, encode and write slides, overlapped.

Reader threads plan slides and read batches ahead (``2 × workers`` batches in flight, across
slide boundaries) while the main thread feeds the device: see :mod:`scratchpath.embed.run`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchpath.embed import h5
from scratchpath.embed.encoder import Encoder
from scratchpath.embed.tiles import HostBatch, SlideTiles, StoreTiles, device_tiles
from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.ingest import InlineExecutor, TilingOptions, fast_id, plan_slide
from scratchpath.slides import native_within, open_slide

DECODE_TOLERANCE = 2.0  # grey levels: mean |device - CPU| over a slide's first tile
THUMBNAIL_SIZE = 1024  # long side of the thumbnail kept in each file (attention heatmaps)
SAME_MPP = 0.05  # a store's tiles within 5 % of the target µm/px are taken (ingest's rule)


@dataclass
class Unit:
    """One slide to embed: a slide file or folder, or the tiles of one slide of a store."""

    key: str  # sort key of the split across ranks
    slide_id: str
    path: str | None = None
    store: str | None = None
    store_slide: int = -1


@dataclass
class Job:
    """A planned slide on its way through the pipeline."""

    unit: Unit
    identity: dict[str, Any]
    status: str = "planned"  # planned | skipped | failed
    reason: str = ""
    source: SlideTiles | StoreTiles | None = None
    coords: np.ndarray | None = None  # (N, 2) int64 level-0
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    fractions: np.ndarray | None = None
    thumbnail: np.ndarray | None = None
    thumbnail_scale: float = 0.0
    thumbnail_png: bytes = b""
    read_size: int = 0
    tile_size: int = 0
    mode: str = "CPU reads"
    features: list[torch.Tensor] = field(default_factory=list)
    started: float = 0.0

    @property
    def n(self) -> int:
        return 0 if self.coords is None else len(self.coords)

    def fail(self, reason: str) -> Job:
        self.status, self.reason, self.features = "failed", reason, []
        return self


class Pipeline:
    """Embeds a rank's slides; :meth:`run` yields one outcome dict per slide, in order."""

    def __init__(
        self,
        encoder: Encoder,
        options: TilingOptions,
        run_info: dict,
        out: Path,
        batch_size: int,
        workers: int,
        use_device: bool,
        overwrite: bool,
        store_mpp: float | None = None,
    ) -> None:
        self.encoder, self.options, self.run_info, self.out = encoder, options, run_info, out
        self.batch_size, self.workers = batch_size, workers
        self.use_device, self.overwrite, self.store_mpp = use_device, overwrite, store_mpp
        self.pin = encoder.device.type == "cuda"
        self.pool = ThreadPoolExecutor(workers, "embed-read") if workers > 0 else InlineExecutor()
        self.n_tiles = 0
        self._decoder_agrees: dict[tuple[str, str, str], float] = {}  # kind -> mean |diff|

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- the main loop --------------------------------------------------------------------
    def run(self, units: list[Unit]) -> Iterator[dict]:
        events: deque[tuple[str, Job, Future | None]] = deque()
        feed = self._events(units)
        in_flight = 0
        while True:
            while in_flight < max(2 * self.workers, 1):
                event = next(feed, None)
                if event is None:
                    break
                events.append(event)
                in_flight += event[0] == "batch"
            if not events:
                return
            kind, job, future = events.popleft()
            in_flight -= kind == "batch"
            if kind == "batch":
                self._encode(job, future)
            elif kind == "end":
                yield self._finish(job)

    def _events(self, units: list[Unit]) -> Iterator[tuple[str, Job, Future | None]]:
        """("batch", job, future) per batch and ("end", job, None) per slide, planning two
        slides ahead in the pool."""
        plans: deque[Future] = deque()
        todo = iter(units)

        def plan_next() -> None:
            unit = next(todo, None)
            if unit is not None:
                plans.append(self.pool.submit(self._plan, unit))

        for _ in range(2):
            plan_next()
        while plans:
            job: Job = plans.popleft().result()
            plan_next()
            if job.status == "planned":
                try:
                    self._choose_decode(job)
                except ScratchpathError as err:  # e.g. a damaged first tile
                    job.fail(str(err))
            if job.status == "planned":
                for first in range(0, job.n, self.batch_size):
                    n = min(self.batch_size, job.n - first)
                    yield "batch", job, self.pool.submit(job.source.read, first, n)
            yield "end", job, None

    def _encode(self, job: Job, future: Future) -> None:
        try:
            batch: HostBatch = future.result()
        except Exception as err:  # a damaged tile: the slide fails, the run goes on
            if job.status == "planned":
                reason = str(err) if isinstance(err, ScratchpathError) else repr(err)
                job.fail(f"{job.unit.path or job.unit.key}: {reason}".split("\n")[0])
            return
        if job.status != "planned":
            return
        if not job.started:  # the slide's time: from its first batch on the device
            job.started = time.perf_counter()
        tiles = device_tiles(batch, self.encoder.device, job.read_size, job.tile_size)
        job.features.append(self.encoder(tiles))  # (B, D) on the device

    def _finish(self, job: Job) -> dict:
        unit = job.unit
        outcome = {"slide_id": unit.slide_id, "source": unit.path or unit.key, "n_tiles": 0}
        if job.status == "skipped":
            return {**outcome, "status": "skipped", "reason": job.reason}
        if job.status == "failed":
            h5.record_failure(
                self.out, unit.slide_id, {"source": outcome["source"], "reason": job.reason}
            )
            return {**outcome, "status": "failed", "reason": job.reason}
        features = torch.cat(job.features).cpu().numpy()  # the one device->host copy per slide
        job.features = []
        path = self.out / f"{unit.slide_id}{h5.SUFFIX}"
        h5.write_slide(
            path,
            features=features.astype(self.encoder.features_dtype, copy=False),
            coords=job.coords,
            coords_attrs=job.coords_attrs,
            provenance={**self.run_info, "source": {**job.identity, "read": job.mode}},
            tissue_fraction=job.fractions,
            thumbnail=job.thumbnail,
            thumbnail_scale=job.thumbnail_scale,
        )
        if job.thumbnail_png:
            thumbs = self.out / "thumbnails"
            thumbs.mkdir(exist_ok=True)
            with atomic_write(thumbs / f"{unit.slide_id}.png") as tmp:
                tmp.write_bytes(job.thumbnail_png)
        h5.clear_failure(self.out, unit.slide_id)
        self.n_tiles += job.n
        seconds = time.perf_counter() - job.started
        return {
            **outcome,
            "status": "ok",
            "reason": "",
            "n_tiles": job.n,
            "file": path.name,
            "seconds": seconds,
            "tiles_per_s": job.n / max(seconds, 1e-9),
            "mode": job.mode,
        }

    # -- planning (worker threads) ----------------------------------------------------------
    def _plan(self, unit: Unit) -> Job:
        try:
            return self._plan_store(unit) if unit.store else self._plan_slide(unit)
        except ScratchpathError as err:
            return Job(unit, {}).fail(str(err))
        except Exception as err:  # a damaged file can upset a parser in many ways
            return Job(unit, {}).fail(f"{unit.path}: {type(err).__name__}: {err}".split("\n")[0])

    def _skip(self, job: Job) -> bool:
        """Whether the slide's file is done with this encoder, tiling and source identity."""
        path = self.out / f"{job.unit.slide_id}{h5.SUFFIX}"
        # A killed run's partial write of this slide (only this rank writes it): remove it.
        for partial in self.out.glob(f".{path.name}.*.tmp"):
            partial.unlink(missing_ok=True)
        if not path.is_file():
            return False
        done = h5.read_provenance(path)
        if done is None:
            return False  # not ours / damaged: embedded again
        if (why := h5.same_encoder(done, self.run_info)) is not None:
            if self.overwrite:
                return False
            raise ScratchpathError(
                f"{path}: made with another encoder or tiling ({why}); use "
                "--overwrite to re-embed, or another --out"
            )
        if done.get("source", {}).get("identity") != job.identity.get("identity"):
            return False  # the slide changed since
        job.status, job.reason = "skipped", "already embedded"
        return True

    def _plan_slide(self, unit: Unit) -> Job:
        path = Path(unit.path)
        ident = fast_id(path) if path.exists() else ""
        job = Job(unit, {"path": str(path.resolve()), "identity": ident})
        if self._skip(job):
            return job
        plan = plan_slide(str(path), self.options, frozenset(), keep_thumbnail=THUMBNAIL_SIZE)
        if plan.status == "failed":
            return job.fail(plan.reason)
        grid, record = plan.grids[0], plan.record
        with open_slide(path, assume_mpp=self.options.assume_mpp) as slide:
            level = slide.levels[grid.level]
        job.coords, job.fractions = grid.xy.astype(np.int64), grid.fractions
        job.read_size, job.tile_size = grid.read_size, self.options.tile_size
        job.thumbnail, job.thumbnail_scale = plan.thumbnail, plan.thumbnail_scale
        job.thumbnail_png = plan.thumbnail_png
        job.source = SlideTiles(
            str(path),
            self.options.assume_mpp,
            grid.level,
            grid.read_size,
            job.tile_size,
            job.coords,
            pin=self.pin,
        )
        job.coords_attrs = _coords_attrs(
            unit.slide_id,
            job.tile_size,
            round(grid.read_size * level.downsample),
            grid.level,
            record["mpp"],
            self.options.mpp,
            grid.stored_mpp,
            record["width"],
            record["height"],
        )
        job.coords_attrs["native_level"] = bool(native_within(level, self.options.mpp))
        return job

    def _plan_store(self, unit: Unit) -> Job:
        from scratchpath.store import PatchStore

        store = PatchStore(unit.store)
        record = store.slides[unit.store_slide]
        rows = np.flatnonzero(store.tiles["slide_index"] == unit.store_slide)
        mpps = store.tiles["mpp"][rows]
        if self.store_mpp is not None and len(np.unique(mpps)) > 1:
            rows = rows[np.abs(mpps / self.store_mpp - 1.0) <= SAME_MPP]
            mpps = store.tiles["mpp"][rows]
        if len(np.unique(mpps)) > 1:
            return Job(unit, {}).fail(
                f"{unit.store}: slide {record['slide_id']} has tiles at several µm/px "
                f"({sorted(set(mpps.tolist()))}); choose one with --mpp"
            )
        ident = record.get("sha256") or record.get("fast_id") or ""
        job = Job(
            unit,
            {
                "store": str(unit.store),
                "slide_id": record["slide_id"],
                "identity": f"{ident}:{len(rows)}",
            },
        )
        if self._skip(job):
            return job
        if len(rows) == 0:
            return job.fail(f"{unit.store}: slide {record['slide_id']} has no tiles to embed")
        mpp = float(mpps[0]) if len(mpps) and np.isfinite(mpps[0]) else None
        slide_mpp = record.get("mpp")
        size = store.tile_size
        level0 = round(size * mpp / slide_mpp) if mpp and slide_mpp else size
        job.coords = np.stack([store.tiles["x"][rows], store.tiles["y"][rows]], 1).astype(np.int64)
        job.fractions = store.tiles["tissue_fraction"][rows].astype(np.float32)
        job.read_size = job.tile_size = size
        jpeg = str(store.codec).startswith("jpeg") and self.use_device
        job.source = StoreTiles(str(unit.store), rows, encoded=jpeg, pin=self.pin)
        job.mode = "stored JPEG decoded on the device" if jpeg else "store reads"
        job.coords_attrs = _coords_attrs(
            unit.slide_id,
            size,
            level0,
            int(store.tiles["level"][rows[0]]),
            slide_mpp,
            mpp,
            mpp,
            record.get("width"),
            record.get("height"),
        )
        thumb = Path(unit.store) / "thumbnails" / f"{record['slide_id']}.png"
        if "://" not in str(unit.store) and thumb.is_file():
            job.thumbnail, job.thumbnail_scale = _png_thumbnail(thumb, record.get("width"))
        return job

    # -- the device decoder's self-check ---------------------------------------------------
    def _choose_decode(self, job: Job) -> None:
        """Give a slide's tiles to the device decoder when its level is stored as JPEG tiles
        and, for the first slide of each kind of JPEG stream (reader, vendor, colour coding),
        the device cuts its first tile as ``ingest`` reads it (later slides of that kind are
        trusted: no pixel of theirs is decoded on the CPU)."""
        source = job.source
        if not isinstance(source, SlideTiles) or not self.use_device:
            return
        with open_slide(source.path, assume_mpp=source.assume_mpp) as slide:
            grid = slide.jpeg_tiles(source.level)
            kind = (slide.backend, slide.vendor, grid.colour if grid else "")
        if grid is None:
            job.mode = "CPU reads (level not stored as JPEG tiles)"
            return
        if kind not in self._decoder_agrees:
            candidate = replace(source, jpeg=grid, pin=False)
            device = self.encoder.device
            on_device = device_tiles(candidate.read(0, 1), device, job.read_size, job.tile_size)
            reference = replace(source, pin=False).read(0, 1).tiles.permute(0, 3, 1, 2)
            diff = float((on_device.float().cpu() - reference.float()).abs().mean())
            self._decoder_agrees[kind] = diff
        diff = self._decoder_agrees[kind]
        if diff <= DECODE_TOLERANCE:
            job.source = replace(source, jpeg=grid)
            job.mode = "stored JPEG decoded on the device" + (
                "" if job.read_size == job.tile_size else ", resampled there"
            )
        else:
            job.mode = (
                f"CPU reads (the device decoder differs from the slide reader by {diff:.1f} "
                f"grey levels on {'/'.join(kind)} JPEG tiles)"
            )


def _coords_attrs(
    name: str,
    patch_size: int,
    patch_size_level0: int,
    level: int,
    level0_mpp: float | None,
    target_mpp: float | None,
    mpp: float | None,
    width: int | None,
    height: int | None,
) -> dict[str, Any]:
    """The ``coords`` attributes TRIDENT and CLAM read (see :mod:`scratchpath.embed.h5`)."""
    return {
        "patch_size": int(patch_size),
        "patch_size_level0": int(patch_size_level0),
        "patch_level": int(level),
        "level0_magnification": h5.magnification(level0_mpp),
        "target_magnification": h5.magnification(target_mpp),
        "level0_mpp": level0_mpp,
        "target_mpp": target_mpp,
        "mpp": mpp,
        "overlap": 0,
        "name": name,
        "level0_width": width,
        "level0_height": height,
    }


def _png_thumbnail(path: Path, width: int | None) -> tuple[np.ndarray | None, float]:
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return rgb, (float(width) / rgb.shape[1]) if width else 0.0
