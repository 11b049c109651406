"""How many SSL views per second does PatchDataModule deliver per core, against torchvision?

Writes real H&E tiles (LC25000 lung, 224 px) as JPEG q90 files into a temporary ImageFolder,
imports the same folder into a temporary patch store (JPEG q90), then times one core (torch and
OpenCV threads 1, ``num_workers=0``, the main process) producing uint8 view batches end to end:

  ours         PatchDataModule.train_dataloader(): planned batch, one store.read per batch,
               the scratchpath view generator per tile (albumentations + HED jitter)
  torchvision  ImageFolder + PIL decode + torchvision.transforms.v2 doing the same work per view
               as closely as torchvision allows: RandomResizedCrop, D4 (flips + rot90),
               ColorJitter for brightness/contrast, a gamma jitter, PIL Gaussian blur (as in
               DINO's reference pipeline), RandomGrayscale. torchvision has no HED stain
               jitter: a saturation/hue ColorJitter stands in for it (same probability).

for each generator (TwoViews, MultiCrop 2x224 + 6x96, MAEView) and prints views/s and the ratio
ours / torchvision. A last line compares one ``store.read`` per batch with per-tile reads.
Rates are per core-second of CPU time (the machine is shared); best of ``ROUNDS`` rounds.

    SCRATCHPATH_TEST_DATA=../shared/data python benchmarks/bench_loader.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.v2 as T  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from scratchpath.data import PatchDataModule  # noqa: E402
from scratchpath.store import PatchStore, import_tiles  # noqa: E402
from scratchpath.views import MAEView, MultiCrop, TwoViews, ViewGenerator  # noqa: E402

DATA = Path(
    os.environ.get("SCRATCHPATH_TEST_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)
N_TILES = 160
BATCH = 32
ROUNDS = 3


def write_image_folder(root: Path) -> None:
    files = sorted((DATA / "tiles" / "lc25000_lung_224").glob("*/*.jpeg"))
    for f in files[:: max(1, len(files) // N_TILES)][:N_TILES]:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(root / f.parent.name / f"{f.stem}.jpg", quality=90)


# -- torchvision twins of the scratchpath view generators -------------------------------------
class RandomGamma(torch.nn.Module):
    """Gamma in [1 - g, 1 + g] with probability p (albumentations' RandomGamma)."""

    def __init__(self, g: float, p: float) -> None:
        super().__init__()
        self.g, self.p = g, p

    def forward(self, image):
        if random.random() >= self.p:
            return image
        return TF.adjust_gamma(image, random.uniform(1 - self.g, 1 + self.g))


class RandomPILBlur(torch.nn.Module):
    """Gaussian blur of random sigma with PIL's ImageFilter, as DINO's and MoCo v3's pipelines
    do (faster on PIL images than torchvision's tensor GaussianBlur)."""

    def __init__(self, sigma: tuple[float, float], p: float) -> None:
        super().__init__()
        self.sigma, self.p = sigma, p

    def forward(self, image):
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class RandomRot90(torch.nn.Module):
    def forward(self, image):
        return TF.rotate(image, 90 * random.randrange(4))


def torchvision_view(size: int, scale: tuple[float, float], colour: bool) -> T.Compose:
    ops: list[torch.nn.Module] = [
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        RandomRot90(),
    ]
    if colour:  # TwoViews / MultiCrop defaults: stain p .8, colour p .8, blur p .5, gray p .1
        ops += [
            T.RandomApply([T.ColorJitter(saturation=0.1, hue=0.05)], p=0.8),  # stands for HED
            T.RandomApply([T.ColorJitter(brightness=0.2, contrast=0.2)], p=0.8),
            RandomGamma(0.1, p=0.8),
            RandomPILBlur((0.1, 2.0), p=0.5),
            T.RandomGrayscale(p=0.1),
        ]
    return T.Compose([*ops, T.PILToTensor()])


class TorchvisionViews:
    def __init__(self, families: list[tuple[T.Compose, int]]) -> None:
        self.families = families

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [t(image) for t, count in self.families for _ in range(count)]


GENERATORS: dict[str, tuple[Callable[[], ViewGenerator], TorchvisionViews]] = {
    "TwoViews": (
        lambda: TwoViews(output_size=224),
        TorchvisionViews([(torchvision_view(224, (0.2, 1.0), colour=True), 2)]),
    ),
    "MultiCrop": (
        lambda: MultiCrop(global_size=224, local_size=96, n_global_crops=2, n_local_crops=6),
        TorchvisionViews(
            [
                (torchvision_view(224, (0.32, 1.0), colour=True), 2),
                (torchvision_view(96, (0.05, 0.32), colour=True), 6),
            ]
        ),
    ),
    "MAEView": (
        lambda: MAEView(output_size=224),
        TorchvisionViews([(torchvision_view(224, (0.4, 1.0), colour=False), 1)]),
    ),
}


# -- timing -----------------------------------------------------------------------------------
def views_per_second(loader: DataLoader, n_views: int) -> float:
    # CPU time of this process (one thread): views per core-second, whatever else the shared
    # machine is running.
    start = time.process_time()
    count = 0
    for batch in loader:
        views = batch["views"] if isinstance(batch, dict) else batch[0]
        assert len(views) == n_views and views[0].dtype == torch.uint8
        count += len(views[0]) * n_views
    return count / (time.process_time() - start)


def ours_loader(store_path: Path, views: ViewGenerator) -> DataLoader:
    dm = PatchDataModule(
        stores=[str(store_path)], views=views, batch_size=BATCH, num_workers=0, pin_memory=False
    )
    dm.setup("fit")
    return dm.train_dataloader()


def torchvision_loader(folder: Path, views: TorchvisionViews) -> DataLoader:
    dataset = ImageFolder(str(folder), transform=views)
    generator = torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, generator=generator)


def read_rates(store: PatchStore) -> tuple[float, float]:
    order = np.random.default_rng(0).permutation(len(store))
    batches = [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    start = time.process_time()
    for b in batches:
        store.read(b)
    batched = len(batches) * BATCH / (time.process_time() - start)
    start = time.process_time()
    for b in batches:
        np.stack([store[int(i)] for i in b])
    per_tile = len(batches) * BATCH / (time.process_time() - start)
    return batched, per_tile


def main() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, store_path = Path(tmp) / "imagefolder", Path(tmp) / "tiles.zarr"
        write_image_folder(folder)
        import_tiles(folder, store_path, use_folder_labels=False, codec="jpeg:90")
        n = len(PatchStore(store_path))
        print(f"{n} real H&E tiles (224 px, JPEG q90), batch {BATCH}, one core, best of {ROUNDS}")
        print(f"{'views':<10} {'ours views/s':>13} {'torchvision':>12} {'ratio':>7}")
        for name, (make_views, tv_views) in GENERATORS.items():
            ours_views = make_views()
            n_views = ours_views.n_views
            ours = tv = 0.0
            for _ in range(ROUNDS):
                ours = max(ours, views_per_second(ours_loader(store_path, ours_views), n_views))
                tv = max(tv, views_per_second(torchvision_loader(folder, tv_views), n_views))
            print(f"{name:<10} {ours:>13.0f} {tv:>12.0f} {ours / tv:>6.2f}x")
        store = PatchStore(store_path)
        batched, per_tile = max(read_rates(store) for _ in range(ROUNDS))
        print(
            f"reads: store.read per batch {batched:.0f} tiles/s vs per tile {per_tile:.0f} "
            f"tiles/s ({batched / per_tile:.2f}x)"
        )


if __name__ == "__main__":
    main()
