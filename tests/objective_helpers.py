"""Helpers shared by the objective tests: real H&E views, a short fit, one-thread torch.

Not a test module (no ``test_`` prefix); imported by ``tests/test_<objective>.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

TILES = "deeptexture_examples_unlabeled_256/unlabeled"
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with one_thread():
        yield


def real_views(
    tiles_dir: Path,
    n_images: int,
    n_views: int,
    size: int,
    seed: int,
    sizes: list[int] | None = None,
) -> list[torch.Tensor]:
    """Random resized crops + flips of real H&E tiles, normalised per channel.

    ``n_views`` crops of ``size`` px, or one crop per entry of ``sizes`` (multi-crop).
    """
    paths = sorted((tiles_dir / TILES).glob("*.jpg"))[:n_images]
    images = [v2.functional.to_image(np.array(Image.open(p).convert("RGB"))) for p in paths]
    torch.manual_seed(seed)
    views = []
    for crop_size in sizes or [size] * n_views:
        augment = v2.Compose(
            [
                v2.RandomResizedCrop(crop_size, scale=(0.3, 1.0)),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
        views.append(torch.stack([augment(image) for image in images]))
    mean = views[0].mean(dim=(0, 2, 3), keepdim=True)
    std = views[0].std(dim=(0, 2, 3), keepdim=True)
    return [(view - mean) / std for view in views]


def fit_same_batch(module: L.LightningModule, views: list[torch.Tensor], steps: int) -> L.Trainer:
    """``steps`` optimiser steps of a Lightning fit on the same batch."""
    batch = {"views": views, "index": torch.arange(len(views[0]))}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    return trainer


def loss_before_and_after(module, views: list[torch.Tensor], steps: int) -> tuple[float, float]:
    """The loss on ``views`` (same random seed) before and after ``steps`` training steps."""
    torch.manual_seed(0)
    with torch.no_grad():
        before = module.compute_loss(views).item()
    fit_same_batch(module, views, steps)
    torch.manual_seed(0)
    with torch.no_grad():
        after = module.compute_loss(views).item()
    return before, after
