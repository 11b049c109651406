"""How fast are scratchpath's stain jitter and view generators on one core?

Prints images/s of the fused HED jitter (``scratchpath.augment.HEDJitter``) as a ratio against
albumentations' ``HEStain`` (random_preset, and macenko) measured in the same run, on real
224x224 LC25000 H&E tiles; the batched torch twin on CPU; and each view generator's samples/s
(CPU path, as a data-loader worker runs it) as a ratio against a crop + D4 baseline, and the
batched torch device path run on the CPU against the CPU path.

    SCRATCHPATH_TEST_DATA=../shared/data .venv/bin/python benchmarks/bench_augment.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

from scratchpath import augment
from scratchpath.views import MAEView, MultiCrop, TwoViews

SECONDS = 1.5  # per measurement


def _data_root() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("SCRATCHPATH_TEST_DATA", default))


def _rate(fn: Callable[[np.ndarray], object], tiles: list[np.ndarray], per_call: int = 1) -> float:
    """Calls per second of ``fn`` cycling over ``tiles`` for about SECONDS."""
    fn(tiles[0])  # warm-up (lazy buffers, first-call overhead)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        for tile in tiles:
            fn(tile)
        n += len(tiles)
    return n * per_call / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    files = sorted((_data_root() / "tiles" / "lc25000_lung_224").glob("*/*.jpeg"))[::12]
    if not files:
        raise SystemExit(f"no LC25000 tiles under {_data_root()}; set SCRATCHPATH_TEST_DATA")
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    print(f"{len(tiles)} real {tiles[0].shape[0]}x{tiles[0].shape[1]} H&E tiles, 1 thread")

    def compose(t: A.BasicTransform) -> Callable[[np.ndarray], np.ndarray]:
        pipeline = A.Compose([t], seed=0)
        return lambda x: pipeline(image=x)["image"]

    hed = _rate(compose(augment.HEDJitter(strength=0.1)), tiles)
    hestain = _rate(compose(A.HEStain(method="random_preset", p=1.0)), tiles[:16])
    macenko = _rate(compose(A.HEStain(method="macenko", p=1.0)), tiles[:8])
    normalize = _rate(compose(augment.MacenkoNormalize(tiles[0])), tiles[:8])
    batch = torch.from_numpy(np.stack(tiles[:32])).permute(0, 3, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(0)

    def torch_hed(_: np.ndarray) -> None:
        u = torch.rand(2, len(batch), 3, generator=generator)
        alpha, beta = 1 + 0.1 * (2 * u[0] - 1), 0.1 * (2 * u[1] - 1)
        augment.hed_jitter_float(batch, alpha, beta).round_().to(torch.uint8)

    torch_rate = _rate(torch_hed, tiles[:1], per_call=len(batch))
    rows = [
        ("scratchpath HEDJitter (fused OD affine, cv2)", hed, ""),
        ("albumentations HEStain(random_preset)", hestain, f"x{hed / hestain:.1f}"),
        ("albumentations HEStain(macenko)", macenko, f"x{hed / macenko:.1f}"),
        (f"hed_jitter_float on CPU, batch {len(batch)}", torch_rate, f"x{torch_rate / hed:.2f}"),
        ("(preprocessing) MacenkoNormalize to a reference", normalize, f"x{hed / normalize:.1f}"),
    ]
    print("\nstain jitter, img/s per core (ratio: HEDJitter / other; torch: torch / HEDJitter)")
    for name, rate, ratio in rows:
        print(f"  {name:<49} {rate:8.0f}   {ratio}")

    ours, library = _rate(compose(augment.D4(p=1.0)), tiles), _rate(compose(A.D4(p=1.0)), tiles)
    print("\nD4, img/s per core (ratio: scratchpath D4 / albumentations D4)")
    print(f"  {'scratchpath D4 (OpenCV permutations)':<49} {ours:8.0f}   x{ours / library:.1f}")
    print(f"  {'albumentations D4':<49} {library:8.0f}")

    def sampler(views) -> Callable[[np.ndarray], list]:
        seed = iter(range(10**9))

        def one(tile: np.ndarray) -> list:
            views.set_seed(next(seed))
            return views(tile)

        return one

    crop_d4 = A.Compose(
        [A.RandomResizedCrop((224, 224), scale=(0.2, 1.0)), augment.D4(p=1.0)], seed=0
    )
    baseline = _rate(lambda x: crop_d4(image=x), tiles)
    print("\nview generators, samples/s per core, CPU path (ratio = vs crop+D4 baseline)")
    print(f"  baseline RandomResizedCrop + D4 (1 view)           {baseline:8.0f}")
    for name, views in [
        ("TwoViews (224, HED)", TwoViews()),
        ("TwoViews (224, HEStain)", TwoViews(stain="hestain")),
        ("MultiCrop (2x224 + 6x96, HED)", MultiCrop()),
        ("MAEView (224)", MAEView()),
    ]:
        rate = _rate(sampler(views), tiles[:16] if "HEStain" in name else tiles)
        ratio, per_view = rate / baseline, rate * views.n_views
        print(f"  {name:<49} {rate:8.0f}   x{ratio:.2f}  ({per_view:.0f} views/s)")

    # Could the batched torch device path be the one implementation on the CPU too? Only where it
    # is within 2x of albumentations per core (it is not: see README "Performance").
    print("\ndevice path (batched torch, batch 32) on this CPU vs the CPU path, samples/s per core")
    batch = torch.from_numpy(np.stack(tiles[:32])).permute(0, 3, 1, 2).contiguous()
    for name, make in [("TwoViews", TwoViews), ("MultiCrop", MultiCrop), ("MAEView", MAEView)]:
        cpu_rate = _rate(sampler(make()), tiles)
        views = make(device_augment=True)
        rngs = [np.random.default_rng(i) for i in range(len(batch))]
        params = torch.from_numpy(views.draw_params(rngs, tuple(batch.shape[2:])))

        def run(_: np.ndarray, views=views, params=params) -> None:
            views.device_views(batch, params)

        torch_rate = _rate(run, tiles[:1], len(batch))
        print(f"  {name:<10} torch {torch_rate:7.0f}  albumentations {cpu_rate:7.0f}  "
              f"ratio x{torch_rate / cpu_rate:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
