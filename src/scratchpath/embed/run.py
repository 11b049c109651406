"""``embed``: slides (or stores) + an export -> one HDF5 file of tile embeddings per slide.

Per rank (one process per GPU; ``torchrun`` or SLURM ``srun`` start them, Lightning's cluster
environments read their variables), the slides are split as ``ingest --shard`` splits them
(sorted, every world_size-th from the rank on), so ranks never share a slide and a rerun gives
each rank the same ones. For each slide, in a pipeline:

1. a worker thread plans it with ``ingest``'s own code (:func:`scratchpath.ingest.plan_slide`:
   tissue mask, the level at or just finer than the target µm/px, the tile grid), two slides
   ahead of the one being embedded;
2. worker threads read batches of its tiles (:mod:`scratchpath.embed.tiles`): stored JPEG tiles
   undecoded for the device decoder when the level has them, else ``ingest``'s region reads;
   ``2 × workers`` batches are in flight, across slide boundaries;
3. the main thread turns each batch into device tiles, runs the encoder (features stay on the
   device) and, at the slide's end, copies its ``(N, D)`` features to the host once and writes
   the slide's file atomically.

A slide whose file exists with the same encoder, tiling and source identity is skipped without
being opened; a bad slide gets one line (and ``<out>/failed/<slide>.json``) and the others
continue. Before the JPEG tiles of the first slide of each kind (reader, vendor, colour coding)
go to the device decoder, that slide's first tile is cut both ways and compared (mean absolute
difference ≤ :data:`scratchpath.embed.pipeline.DECODE_TOLERANCE` grey levels), so a decoder that
reads a kind of stream's colours otherwise (e.g. RGB-coded Aperio tiles) never silently changes
the features: slides of that kind are read on the CPU instead.

Cost: per tile, one window read (device path: the bytes of ~1.3 stored tiles) and one forward
pass; per slide, one plan (thumbnail + mask), one device→host copy, one file. Nothing grows
with the number of slides but the final manifest, which reads each file's attributes (O(slides)).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from scratchpath.embed import h5
from scratchpath.embed.encoder import Encoder, Precision, resolve_device
from scratchpath.embed.pipeline import Pipeline, Unit
from scratchpath.errors import ScratchpathError
from scratchpath.ingest import SlideOutcomes, TilingOptions, find_slides, select_shard

Decode = Literal["auto", "device", "cpu"]


@dataclass
class EmbedReport(SlideOutcomes):
    """Outcome of one process's :func:`embed` call: one entry per slide it was given."""

    out: str
    slides: list[dict]
    n_tiles: int
    seconds: float
    rank: int = 0
    world_size: int = 1

    def summary(self) -> str:
        done, skipped = self.count("ok"), self.count("skipped")
        rate = self.n_tiles / self.seconds if self.seconds > 0 else 0.0
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        return (
            f"{who}{self.out}: {done} slide(s) embedded ({self.n_tiles} tiles, {rate:.0f} "
            f"tiles/s), {skipped} already done, {len(self.failed)} failed [{self.seconds:.1f} s]"
        )


def embed(
    inputs: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mpp: float | None = None,
    tile_size: int | None = None,
    min_tissue: float = 0.5,
    assume_mpp: float | None = None,
    batch_size: int = 128,
    workers: int = 4,
    device: str | torch.device | None = None,
    precision: Precision | None = None,
    features_dtype: Literal["float32", "float16"] = "float32",
    decode: Decode = "auto",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EmbedReport:
    """Embed every tissue tile of every slide with an exported backbone.

    Args:
        inputs: slide files / folders (any format ``ingest`` reads), or patch stores (their
            tiles, one file per slide of the store); not both in one call.
        model_dir: the export (``scratchpath export``).
        out: folder of ``<slide_id>.h5`` files and ``manifest.json`` (created or resumed).
        mpp, tile_size: tiling of slides (default: the export's training µm/px and tile size),
            exactly as ``ingest --mpp --tile-size`` cuts them; tiles are then resized to the
            export's input size. Stores keep their tiles (a store cut at several µm/px gives
            those within 5 % of ``mpp``).
        min_tissue, assume_mpp: as for ``ingest``.
        batch_size: tiles per forward pass.
        workers: reader threads (0: read in the main thread).
        device: default ``cuda:LOCAL_RANK`` when there is a GPU, else the CPU.
        precision: ``fp32`` / ``bf16`` / ``fp16`` autocast (default bf16 on CUDA, else fp32).
        features_dtype: ``float16`` halves the files.
        decode: ``auto`` (stored JPEG tiles decoded on the device on CUDA, read on the CPU
            elsewhere), ``device`` or ``cpu``.
        overwrite: re-embed files made with another encoder or tiling (else that is an error).
        progress: a tqdm bar on stderr (when it is a terminal).
        log: receives one line per slide (default: stderr).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if batch_size < 1 or workers < 0:
        raise ScratchpathError(f"batch_size >= 1 and workers >= 0, got {batch_size}, {workers}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ScratchpathError(f"min_tissue: must be within 0..1, got {min_tissue}")
    if decode not in ("auto", "device", "cpu"):
        raise ScratchpathError(f"--decode: auto, device or cpu, got {decode!r}")
    rank, world, local_rank = _cluster()
    encoder = Encoder(
        model_dir,
        resolve_device(device, local_rank),
        precision=precision,
        features_dtype=features_dtype,
    )
    stores = [str(p) for p in inputs if _is_store(p)]
    if stores and len(stores) != len(inputs):
        raise ScratchpathError("inputs: give slides or patch stores, not both in one run")
    target = mpp if mpp is not None else encoder.export_mpp
    if not stores and target is None:
        raise ScratchpathError(f"--mpp: {model_dir} records no training µm/px; give --mpp")
    size = int(tile_size or encoder.export_tile_size or encoder.input_size)
    options = TilingOptions(float(target) if target else 0.5, size, min_tissue, assume_mpp)
    tiling = (
        {"source": "stores", "mpp": target}
        if stores
        else {
            "source": "slides",
            "mpp": options.mpp,
            "tile_size": size,
            "min_tissue": min_tissue,
            "assume_mpp": assume_mpp,
        }
    )
    run_info = {"encoder": encoder.provenance, "tiling": tiling}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = h5.read_manifest(out)
    if previous and not overwrite and (why := h5.same_encoder(previous, run_info)):
        raise ScratchpathError(
            f"{out / h5.MANIFEST}: made with another encoder or tiling ({why}); use --overwrite "
            "to re-embed, or another --out"
        )
    units = _store_units(stores) if stores else _slide_units(inputs)
    mine = _my_units(units, rank, world)
    use_device = decode == "device" or (decode == "auto" and encoder.device.type == "cuda")
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    bar = tqdm(total=len(mine), unit="slide", disable=not (progress and sys.stderr.isatty()))
    runner = Pipeline(
        encoder,
        options,
        run_info,
        out,
        batch_size,
        workers,
        use_device,
        overwrite,
        store_mpp=target if stores else None,
    )
    outcomes: list[dict] = []
    try:
        for outcome in runner.run(mine):
            outcomes.append(outcome)
            bar.update(1)
            bar.set_postfix(tiles=runner.n_tiles)
            line = prefix + _line(outcome)
            bar.write(line, file=sys.stderr) if log is None and not bar.disable else say(line)
    finally:
        bar.close()
        runner.close()
    _finish(out, run_info, world, rank)
    return EmbedReport(str(out), outcomes, runner.n_tiles, time.perf_counter() - start, rank, world)


def _line(outcome: dict) -> str:
    if outcome["status"] == "failed":
        return f"failed: {outcome['reason']}"
    if outcome["status"] == "skipped":
        return f"{outcome['slide_id']}: skipped ({outcome['reason']})"
    rate = f"{outcome['tiles_per_s']:.0f} tiles/s, {outcome['mode']}"
    done = f"{outcome['n_tiles']} tiles in {outcome['seconds']:.1f} s ({rate})"
    return f"{outcome['slide_id']}: {done} -> {outcome['file']}"


def _cluster() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's variables (as ``fit`` reads
    them, through Lightning's cluster environments); (0, 1, 0) otherwise."""
    for env in _environments():
        cluster = env()
        return cluster.global_rank(), cluster.world_size(), cluster.local_rank()
    return 0, 1, 0


def _environments() -> list:
    """The cluster environment this process runs in (none, torchrun's, or SLURM's)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return [TorchElasticEnvironment]
    # SLURM only under srun (SLURM_NTASKS set): outside, Lightning's detect() warns
    if "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect():
        return [SLURMEnvironment]
    return []


def _finish(out: Path, run_info: dict, world: int, rank: int) -> None:
    """Rank 0 writes the manifest once every rank is done (gloo barrier when several)."""
    import torch.distributed as dist

    if world > 1:
        created = not dist.is_initialized()
        if created:
            env = _environments()[0]()
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{env.main_address}:{env.main_port}",
                rank=rank,
                world_size=world,
            )
        try:
            dist.barrier()
            if rank == 0:
                h5.write_manifest(out, run_info)
            dist.barrier()
        finally:
            if created:
                dist.destroy_process_group()
    else:
        h5.write_manifest(out, run_info)


def _is_store(path: str | os.PathLike) -> bool:
    return "://" in str(path) or (Path(path) / "zarr.json").is_file()


def _slide_units(inputs: Sequence[str | os.PathLike]) -> list[Unit]:
    paths = find_slides(inputs)
    if not paths:
        raise ScratchpathError(f"{', '.join(map(str, inputs)) or 'inputs'}: no slide files found")
    from scratchpath.slides import slide_stem

    stems = Counter(slide_stem(p) for p in paths)
    units = []
    for p in paths:
        stem = slide_stem(p)
        if stems[stem] > 1:  # same name in two folders: keep both, told apart by their path
            stem = f"{stem}-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}"
        units.append(Unit(key=str(p), slide_id=stem, path=str(p)))
    return units


def _store_units(stores: list[str]) -> list[Unit]:
    from scratchpath.store import PatchStore

    units = []
    for path in stores:
        store = PatchStore(path)
        for index, record in enumerate(store.slides):
            if record.get("status", "ok") == "ok":
                sid = str(record["slide_id"])
                units.append(
                    Unit(key=f"{path}#{index:09d}", slide_id=sid, store=path, store_slide=index)
                )
    ids = Counter(u.slide_id for u in units)
    for u in units:
        if ids[u.slide_id] > 1:
            u.slide_id = f"{u.slide_id}-{hashlib.sha256(u.key.encode()).hexdigest()[:8]}"
    return units


def _my_units(units: list[Unit], rank: int, world: int) -> list[Unit]:
    by_key = {str(Path(u.key)): u for u in units}
    return [by_key[str(p)] for p in select_shard([Path(u.key) for u in units], (rank, world))]
