"""Labelled tiles for probing and fine-tuning: a Dataset and a LightningDataModule.

A single labelled store is split by a group column (:mod:`scratchpath.finetune.splits`), so
augmented copies of one tile or tiles of one patient never straddle train and test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scratchpath.augment import D4, HE_MEAN, HE_STD, HEDJitter
from scratchpath.errors import ScratchpathError
from scratchpath.finetune.probes import tiles_to_tensor
from scratchpath.finetune.splits import require_labels, split_store
from scratchpath.store import PatchStore


class LabelledTiles(Dataset):
    """``(image, label)`` pairs from a labelled store: ``image`` is a normalised float tensor.

    Args:
        store: a labelled :class:`~scratchpath.store.PatchStore`.
        indices: tiles to use (default: all).
        mean, std: RGB normalisation on the 0..1 scale (the backbone's).
        input_size: resize tiles to this side (bilinear) when it differs from the tile size.
        transform: albumentations-style callable ``transform(image=array)["image"]`` applied to
            the uint8 tile first (training augmentation); None for evaluation.
    """

    def __init__(
        self,
        store: PatchStore,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        mean: Sequence[float] = HE_MEAN,
        std: Sequence[float] = HE_STD,
        input_size: int | None = None,
        transform: Callable | None = None,
    ) -> None:
        self.store = store
        self.labels = require_labels(store, "store")
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, np.int64)
        self.mean, self.std, self.input_size = tuple(mean), tuple(std), input_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        tile = self.store[index]
        if self.transform is not None:
            tile = self.transform(image=tile)["image"]
        x = tiles_to_tensor(tile[None], mean=self.mean, std=self.std, input_size=self.input_size)
        return x[0], int(self.labels[index])


def default_train_transform(seed: int = 0) -> A.Compose:
    """D4 symmetries and light HED stain jitter: label-preserving for H&E tiles."""
    return A.Compose([D4(), HEDJitter(strength=0.05)], seed=seed)


@dataclass
class _Sides:
    train: tuple[PatchStore, np.ndarray]
    test: tuple[PatchStore, np.ndarray]


class LabelledTileDataModule(L.LightningDataModule):
    """Train/test loaders over labelled stores for :class:`LinearProbe` and :class:`FineTune`.

    Give either ``train`` and ``test`` stores, or one ``data`` store with ``test_fraction``
    (grouped by ``group_column`` so augmented copies or patients never straddle the split).
    The test side doubles as the validation set.
    """

    def __init__(
        self,
        train: str | None = None,
        test: str | None = None,
        *,
        data: str | None = None,
        test_fraction: float = 0.3,
        group_column: str = "group",
        mean: Sequence[float] = HE_MEAN,
        std: Sequence[float] = HE_STD,
        input_size: int | None = None,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (data is None) == (train is None or test is None):
            raise ScratchpathError("data: give either train and test stores, or one data store")
        self.paths = {"train": train, "test": test, "data": data}
        self.test_fraction, self.group_column = test_fraction, group_column
        self.mean, self.std, self.input_size = tuple(mean), tuple(std), input_size
        self.augment, self.batch_size, self.num_workers = augment, batch_size, num_workers
        self.seed = seed
        self.sides: _Sides | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.sides is not None:
            return
        if self.paths["data"] is not None:
            store = PatchStore(self.paths["data"])
            train, test = split_store(
                store,
                test_fraction=self.test_fraction,
                group_column=self.group_column,
                seed=self.seed,
            )
            self.sides = _Sides((store, train), (store, test))
        else:
            train_store, test_store = (
                PatchStore(self.paths["train"]),
                PatchStore(self.paths["test"]),
            )
            if train_store.class_names != test_store.class_names:
                raise ScratchpathError(
                    f"--test: class names {test_store.class_names} differ from the training "
                    f"store's {train_store.class_names}"
                )
            self.sides = _Sides(
                (train_store, np.arange(len(train_store))), (test_store, np.arange(len(test_store)))
            )

    @property
    def class_names(self) -> list[str]:
        """Class names of the labelled stores (after :meth:`setup`)."""
        self.setup()
        return list(self.sides.train[0].class_names)

    def _dataset(self, side: str, transform: Callable | None) -> LabelledTiles:
        self.setup()
        store, indices = getattr(self.sides, side)
        return LabelledTiles(
            store,
            indices,
            mean=self.mean,
            std=self.std,
            input_size=self.input_size,
            transform=transform,
        )

    def train_dataloader(self) -> DataLoader:
        transform = default_train_transform(self.seed) if self.augment else None
        return DataLoader(
            self._dataset("train", transform),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset("test", None), batch_size=self.batch_size, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
