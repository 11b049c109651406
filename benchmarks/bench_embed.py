"""How fast does ``scratchpath embed`` turn slides into tile embeddings, against the way the
common tools read?

Baseline, measured in the same run on the same tiles with the same model (the feature-extraction
step of CLAM / TRIDENT-style tools, given the tile coordinates): a torch ``DataLoader`` with
``--workers`` worker processes, each tile read by ``openslide.OpenSlide.read_region`` (RGBA ->
RGB), resized with PIL (area filter, when the level is not the target µm/px), turned into a
tensor, resized to the model's input and normalised by torchvision, batched, then the model.
``embed`` does more (it also plans every slide: thumbnail, tissue mask, grid; and writes the
HDF5 files), with ``--workers`` reader threads and, where a level is stored as JPEG tiles and
the device is a GPU, the encoded tiles decoded by nvJPEG.

Figures (per configuration):
- tiles/s (wall) and CPU core-ms per tile (user + system time of the process and its workers,
  ``getrusage``), each as a ratio against the baseline: ``speed = embed / baseline``,
  ``cpu = baseline / embed`` (above 1: embed is faster / cheaper);
- ``read`` lines: the same without the model (tiles delivered as the model's normalised input;
  embed's side still plans each slide).

Data: the real slides of ``$SCRATCHPATH_TEST_DATA/slides`` that OpenSlide reads (Aperio JPEG,
Aperio JPEG 2000 with 0.5 µm/px assumed, OME and plain pyramidal TIFF) and one synthetic
4096 x 4096 JPEG-tiled slide, at 0.5 µm/px, 224 px tiles; model: a small ResNet (timm resnet10t,
channels 32-256) fed 224 px. On a CUDA machine the embed side runs on the GPU (bf16, device
decode) and the baseline's model too.

    SCRATCHPATH_TEST_DATA=../shared/data python benchmarks/bench_embed.py [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scratchpath.backbones import create_backbone, prepare_input
from scratchpath.embed import embed, read_slide
from scratchpath.embed.encoder import resolve_device
from scratchpath.embed.tiles import SlideTiles, device_tiles
from scratchpath.export import export_checkpoint, load_backbone, load_config
from scratchpath.ingest import TilingOptions, plan_slide
from scratchpath.slides import open_slide

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHPATH_TEST_DATA", ROOT.parent / "shared" / "data"))
SLIDES = [
    "CMU-1-Small-Region.svs",
    "TCGA-CR-7395-01A-01-TS1.svs",
    "CMU-1-Small-Region_derived_pyramid.ome.tif",
    "CMU-1-Small-Region_derived_pyramid_pages.tif",
]
MPP, TILE, ASSUME_MPP = 0.5, 224, 0.5
MEAN, STD = (0.70, 0.55, 0.72), (0.17, 0.20, 0.15)


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (DataLoader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_export(folder: Path) -> Path:
    torch.manual_seed(0)
    kwargs = {"channels": [32, 64, 128, 256]}
    model = create_backbone("resnet10t", **kwargs)
    data = {"mpp": MPP, "tile_size": TILE, "mean": MEAN, "std": STD, "stores": []}
    meta = {"objective": "simclr", "backbone": "resnet10t", "backbone_kwargs": kwargs,
            "data": data}  # fmt: skip
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "scratchpath": meta}, folder / "bench.ckpt")
    return export_checkpoint(folder / "bench.ckpt", folder / "export")


class OpenSlideTiles(torch.utils.data.Dataset):
    """The baseline reader: one OpenSlide ``read_region`` + PIL per tile, as CLAM's
    ``Whole_Slide_Bag_FP`` does."""

    def __init__(self, items: list[tuple[str, int, int, int, int]], size: int) -> None:
        from torchvision.transforms import v2

        self.items, self.size, self._slides = items, size, {}
        self.transform = v2.Compose([
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Resize(size, antialias=True), v2.Normalize(MEAN, STD),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        import openslide
        from PIL import Image

        path, level, x, y, read = self.items[i]
        if path not in self._slides:
            self._slides[path] = openslide.OpenSlide(path)
        region = self._slides[path].read_region((x, y), level, (read, read)).convert("RGB")
        if read != TILE:
            region = region.resize((TILE, TILE), Image.Resampling.BOX)
        return self.transform(region)


def baseline(items, model, device, input_size: int, workers: int, batch: int) -> tuple:
    loader = torch.utils.data.DataLoader(
        OpenSlideTiles(items, input_size), batch_size=batch, num_workers=workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    start, cpu, n = time.perf_counter(), cpu_seconds(), 0
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, non_blocking=True)
            if model is not None:
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    model(x)
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    del loader  # workers joined: their CPU time is in RUSAGE_CHILDREN
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def embed_read(slides, device, input_size: int, workers: int, batch: int) -> tuple:
    """embed's reader alone: plan (tissue, grid), reader threads, device tiles, preprocessing."""
    from concurrent.futures import ThreadPoolExecutor

    options = TilingOptions(MPP, TILE, 0.5, ASSUME_MPP)
    start, cpu, n = time.perf_counter(), cpu_seconds(), 0
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for path in slides:
            plan = plan_slide(str(path), options, frozenset())
            grid = plan.grids[0]
            with open_slide(path, assume_mpp=ASSUME_MPP) as slide:
                jpeg = slide.jpeg_tiles(grid.level) if device.type == "cuda" else None
            source = SlideTiles(str(path), ASSUME_MPP, grid.level, grid.read_size, TILE, grid.xy,
                                jpeg=jpeg, pin=device.type == "cuda")  # fmt: skip
            n_tiles = len(grid.xy)
            firsts = list(range(0, n_tiles, batch))
            sizes = [min(batch, n_tiles - f) for f in firsts]
            for host in pool.map(source.read, firsts, sizes):
                tiles = device_tiles(host, device, grid.read_size, TILE)
                prepare_input(tiles, mean=MEAN, std=STD, input_size=input_size)
                n += host.n
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def line(name: str, ours: tuple, theirs: tuple) -> str:
    (n, wall, cpu), (m, wall_b, cpu_b) = ours, theirs
    speed, speed_b = n / wall, m / wall_b
    ms, ms_b = 1000 * cpu / n, 1000 * cpu_b / m
    return (f"{name:<10} embed {speed:8.1f} tiles/s {ms:7.2f} core-ms/tile | baseline "
            f"{speed_b:8.1f} tiles/s {ms_b:7.2f} core-ms/tile | speed {speed / speed_b:5.2f}x, "
            f"cpu {ms_b / ms:5.2f}x  ({n} tiles)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="readers (threads / processes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (warm file cache)")
    args = parser.parse_args()
    device = resolve_device(None)
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        from scratchpath.synthetic import write_slide

        slides = [DATA / "slides" / name for name in SLIDES]
        slides.append(write_slide(tmp / "synthetic_4096.tif", 4096, 4096, mpp=MPP, seed=3))
        export = make_export(tmp)
        input_size = load_config(export)["pretrained_cfg"]["input_size"][-1]
        model = load_backbone(export, device=device)
        # The baseline reads exactly the tiles embed kept (coordinates from embed's files).
        embed(slides, export, tmp / "warm", mpp=MPP, tile_size=TILE, assume_mpp=ASSUME_MPP,
              workers=args.workers, progress=False, log=lambda s: None)  # fmt: skip
        items = []
        for path in slides:
            got = read_slide(tmp / "warm" / f"{path.name.split('.')[0]}.h5")
            level, size0 = got.coords_attrs["patch_level"], got.coords_attrs["patch_size_level0"]
            with open_slide(path, assume_mpp=ASSUME_MPP) as slide:
                down = slide.levels[level].downsample
            read = round(size0 / down)
            items += [(str(path), level, int(x), int(y), read) for x, y in got.coords]
        print(f"device {device}, {len(items)} tiles of {len(slides)} slides at {MPP} µm/px, "
              f"{TILE} px -> model input {input_size} px, {args.workers} readers")  # fmt: skip
        results = {"read": [], "end2end": []}
        for r in range(args.repeats):
            ours = embed_read(slides, device, input_size, args.workers, args.batch_size)
            theirs = baseline(items, None, device, input_size, args.workers, args.batch_size)
            results["read"].append((ours, theirs))
            out = tmp / f"run{r}"
            start, cpu = time.perf_counter(), cpu_seconds()
            report = embed(slides, export, out, mpp=MPP, tile_size=TILE, assume_mpp=ASSUME_MPP,
                           workers=args.workers, batch_size=args.batch_size, progress=False,
                           log=lambda s: None)  # fmt: skip
            ours = (report.n_tiles, time.perf_counter() - start, cpu_seconds() - cpu)
            theirs = baseline(items, model, device, input_size, args.workers, args.batch_size)
            results["end2end"].append((ours, theirs))
        for name, runs in results.items():
            best = max(runs, key=lambda pair: pair[0][0] / pair[0][1])  # fastest embed run
            print(line(name, *best))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
