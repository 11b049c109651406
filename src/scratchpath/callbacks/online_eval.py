"""Online evaluation during pretraining: kNN, linear probe and RankMe on a labelled store."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from scratchpath.errors import ScratchpathError
from scratchpath.finetune import (
    extract_features,
    grouped_split,
    knn_eval,
    linear_probe_eval,
    rankme,
)


class OnlineEvaluation(L.Callback):
    """Every ``every_n_steps`` optimizer steps, probe the backbone on a labelled store.

    Logs ``online/knn_acc`` (cosine kNN, Caron et al. 2021), ``online/linear_acc`` (a quick linear
    probe on frozen, standardised features) and ``online/rankme`` (effective rank of the test
    embeddings, Garrido et al. 2023; near 1 means collapse). The probe math is
    :mod:`scratchpath.finetune`'s, so the numbers agree with ``scratchpath eval``.

    Every rank computes the same numbers on the same tiles (no collective, so no hang if ranks
    drift); the cost is a forward pass over ``max_tiles`` tiles every ``every_n_steps`` steps.

    Args:
        train_store: labelled patch store for the probe's training side.
        test_store: labelled store to score on; if None, ``test_fraction`` of ``train_store`` is
            held out by :func:`~scratchpath.finetune.grouped_split` (whole groups at a time, e.g.
            a slide or a source image, stratified by class; the split ``scratchpath eval``
            makes with the same seed), so near-duplicate tiles never straddle the split.
        test_fraction: held-out fraction when ``test_store`` is None.
        every_n_steps: evaluate when ``global_step`` is a multiple of this (and at the last step).
        k: neighbours of the kNN vote.
        temperature: kNN vote temperature.
        linear_epochs: epochs of the linear probe on cached features.
        max_tiles: cap on the tiles used per side (a seeded, class-stratified-by-chance sample).
        input_size: resize tiles to this side before the backbone (None: the ``img_size`` of a
            ViT backbone when it has a fixed one, else the side of the training views, else
            the tiles as stored).
        which: ``"teacher"`` probes the EMA teacher when the objective has one, else the
            online backbone; ``"student"`` always the online backbone.
        batch_size: tiles per forward pass.
        seed: seeds the split, the subsample and the linear probe.
    """

    def __init__(
        self,
        train_store: str,
        test_store: str | None = None,
        *,
        test_fraction: float = 0.3,
        every_n_steps: int = 500,
        k: int = 20,
        temperature: float = 0.07,
        linear_epochs: int = 50,
        max_tiles: int | None = 1000,
        input_size: int | None = None,
        which: Literal["teacher", "student"] = "teacher",
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ScratchpathError(f"every_n_steps: must be >= 1, got {every_n_steps}")
        if not 0.0 < test_fraction < 1.0:
            raise ScratchpathError(f"test_fraction: must be in (0, 1), got {test_fraction}")
        self.train_store = train_store
        self.test_store = test_store
        self.test_fraction = test_fraction
        self.every_n_steps = every_n_steps
        self.k = k
        self.temperature = temperature
        self.linear_epochs = linear_epochs
        self.max_tiles = max_tiles
        self.input_size = input_size
        self.which = which
        self.batch_size = batch_size
        self.seed = seed
        self._last_step = -1
        self._sides: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sides:
            return
        from scratchpath.store import PatchStore  # stores open lazily: no zarr at import time

        rng = np.random.default_rng(self.seed)
        train = _labelled_store(PatchStore(self.train_store), "train_store")
        if self.test_store is None:
            # the split of `scratchpath eval --data` (grouped, class-stratified, same seed), so
            # online and offline figures come from the same tiles
            has_groups = "group" in train.tiles
            groups = train.tile_column("group") if has_groups else np.full(len(train), "")
            train_idx, test_idx = grouped_split(
                np.asarray(train.labels), groups, test_fraction=self.test_fraction, seed=self.seed
            )
            test = train
        else:
            test = _labelled_store(PatchStore(self.test_store), "test_store")
            train_idx, test_idx = np.arange(len(train)), np.arange(len(test))
        for name, store, idx in (("train", train, train_idx), ("test", test, test_idx)):
            if self.max_tiles is not None and len(idx) > self.max_tiles:
                idx = np.sort(rng.choice(idx, self.max_tiles, replace=False))
            self._sides[name] = (store, idx, np.asarray(store.labels)[idx])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and step == trainer.max_steps
        if step == self._last_step or step == 0 or (step % self.every_n_steps and not last):
            return
        self._last_step = step
        # Logged on every rank (the values are identical): ModelCheckpoint may monitor them.
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(f"online/{name}", value, on_step=True, on_epoch=False)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Embed both sides with the current weights; return kNN / linear accuracy and RankMe."""
        if not self._sides:
            self.setup(trainer, pl_module, "fit")
        backbone = _probe_backbone(pl_module, self.which)
        mean, std = _normalisation(trainer)
        input_size = self.input_size or _fixed_input_size(backbone) or _training_input_size(trainer)
        features = {}
        with trainer.precision_plugin.forward_context():
            for name, (store, idx, _) in self._sides.items():
                features[name] = extract_features(
                    backbone,
                    store,
                    mean=mean,
                    std=std,
                    indices=idx,
                    batch_size=self.batch_size,
                    device=pl_module.device,
                    input_size=input_size,
                )
        train = (features["train"], self._sides["train"][2])  # (features, labels)
        test = (features["test"], self._sides["test"][2])
        knn = knn_eval(*train, *test, k=self.k, temperature=self.temperature)
        linear = linear_probe_eval(*train, *test, epochs=self.linear_epochs, seed=self.seed)
        return {
            "knn_acc": knn["accuracy"],
            "knn_balanced_acc": knn["balanced_accuracy"],
            "linear_acc": linear["accuracy"],
            "rankme": rankme(features["test"]),
        }


def _labelled_store(store: Any, field: str) -> Any:
    if store.labels is None or len(store.class_names) < 2:
        raise ScratchpathError(f"{field}: {store.paths[0]} has no labels (need >= 2 classes)")
    return store


def _probe_backbone(pl_module: L.LightningModule, which: str) -> nn.Module:
    teacher = getattr(pl_module, "teacher_backbone", None)
    if which == "teacher" and isinstance(teacher, nn.Module):
        return teacher
    return pl_module.backbone


def _normalisation(trainer: L.Trainer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "describe"):
        description = datamodule.describe()
        return tuple(description["mean"]), tuple(description["std"])
    from scratchpath.augment import HE_MEAN, HE_STD

    return tuple(HE_MEAN), tuple(HE_STD)


def _training_input_size(trainer: L.Trainer) -> int | None:
    """The side of this epoch's training views (what a CNN trains at now; with progressive
    resizing the low-res side until the full one), as ``scratchpath eval`` uses at the end."""
    views = getattr(trainer.datamodule, "views", None)
    if hasattr(views, "view_size"):
        return views.view_size(0, epoch=trainer.current_epoch)
    return getattr(views, "input_size", None)


def _fixed_input_size(backbone: nn.Module) -> int | None:
    """The side a ViT with a fixed patch grid expects; None when any size works."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    img_size = getattr(patch_embed, "img_size", None)
    return int(img_size[0]) if img_size else None
