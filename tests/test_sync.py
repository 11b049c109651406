"""No device-to-host synchronisation in the view path or in a training step.

A ``TorchDispatchMode`` sees every ATen op; the ones that make the host wait for the device
(``_local_scalar_dense`` behind ``.item()`` / ``float(t)`` / ``if t:``, ``nonzero``, boolean
masks, ops whose output shape depends on the data) are counted while the device views of every
view kind, the data module's batch transfer (JPEG decode included) and whole training steps of
every objective run on the CPU, where a sync is free but the op is the same one that would stall
a GPU. Each count must be 0. (Blocking host-to-device copies of Python numbers cannot be seen on
a CPU; the code avoids them by caching constants per device and logging numbers on logging
steps only.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from objective_helpers import one_torch_thread  # noqa: F401
from scratchpath.data.module import EncodedTiles, PatchDataModule
from scratchpath.objectives import DINO, MAE, MoCoV3, SimCLR
from scratchpath.views import MAEView, MultiCrop, TwoViews

aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.masked_scatter.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
}
BOOLEAN_INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that synchronise a GPU with its host (by name).

    ``host_tensors`` returns tensors that stay in host memory on a GPU too (AdamW's per-parameter
    ``step`` counters, kept on the CPU unless ``capturable``): reading them is no device sync.
    """

    def __init__(self, host_tensors=lambda: ()) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.host_tensors = host_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            if not any(args[0] is t for t in self.host_tensors()):
                self.syncs[str(func)] += 1
        elif func in BOOLEAN_INDEXING_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.syncs[f"{func} with a boolean mask"] += 1
        return func(*args, **kwargs)


def _tiles(tiles_dir: Path, n: int = 4) -> torch.Tensor:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::500][:n]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def test_the_counter_sees_the_syncs_it_is_meant_to_catch():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item()
        (x > 2).nonzero()
        x[x > 2]
    assert counter.syncs[str(aten._local_scalar_dense.default)] == 1
    assert sum(counter.syncs.values()) >= 3


VIEW_KINDS = {
    "two": lambda: TwoViews(output_size=32, device_augment=True),
    "two-asymmetric": lambda: TwoViews(
        output_size=32, device_augment=True, view_blur_p=[1.0, 0.1], view_solarize_p=[0.0, 0.2]
    ),
    "multicrop": lambda: MultiCrop(
        global_size=32,
        local_size=16,
        n_local_crops=4,
        device_augment=True,
        global_blur_p=[1.0, 0.1],
        global_solarize_p=[0.0, 0.2],
    ),
    "multicrop-microns": lambda: MultiCrop(
        global_size=32,
        local_size=16,
        n_local_crops=2,
        crop_microns=(16.0, 32.0),
        mpp=0.5,
        d4=False,
        device_augment=True,
    ),
    "mae": lambda: MAEView(output_size=32, device_augment=True),
    "mae-hed": lambda: MAEView(output_size=32, hed_strength=0.05, device_augment=True),
}


@pytest.mark.parametrize("kind", sorted(VIEW_KINDS))
def test_device_views_do_not_sync(kind, tiles_dir):
    views = VIEW_KINDS[kind]()
    tiles = _tiles(tiles_dir)
    rngs = [np.random.default_rng(i) for i in range(len(tiles))]  # the worker's draw
    params = torch.from_numpy(views.draw_params(rngs, tuple(tiles.shape[2:])))
    with SyncCounter() as counter:
        out = views.device_views(tiles, params)
        views.on_device([torch.zeros(4, 3, 8, 8, dtype=torch.uint8)] * views.n_views)
    assert len(out) == views.n_views
    assert dict(counter.syncs) == {}


def test_batch_transfer_with_jpeg_decode_does_not_sync(tiles_dir, tmp_path):
    import imagecodecs

    tiles = _tiles(tiles_dir).permute(0, 2, 3, 1).numpy()
    blobs = [bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(t), level=90)) for t in tiles]
    dm = PatchDataModule(stores=["unused"], views=MultiCrop(32, 16, device_augment=True))
    rngs = [np.random.default_rng(i) for i in range(len(blobs))]  # the worker's draw
    params = torch.from_numpy(dm.views.draw_params(rngs, tiles.shape[1:3]))
    batch = {"encoded": EncodedTiles.from_blobs(blobs), "index": torch.arange(len(blobs)),
             "view_params": params}  # fmt: skip
    with SyncCounter() as counter:
        out = dm.on_after_batch_transfer(batch, 0)
    assert len(out["views"]) == 8 and dict(counter.syncs) == {}


TINY_VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {
        "img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.2,
        "dynamic_img_size": True,
    },
}  # fmt: skip


def _objective(name: str) -> tuple[L.LightningModule, list[tuple[int, ...]]]:
    common = {**TINY_VIT, "warmup_epochs": 0.5, "nonfinite_check_every": 2}
    if name == "simclr":
        return SimCLR(**common, proj_hidden_dim=32, proj_out_dim=16), [(32, 32)] * 2
    if name == "mocov3":
        return MoCoV3(**common, proj_hidden_dim=32, proj_out_dim=16), [(32, 32)] * 2
    if name == "dino":
        module = DINO(**common, out_dim=64, hidden_dim=32, bottleneck_dim=16, koleo_weight=0.1)
        return module, [(32, 32)] * 2 + [(16, 16)] * 2
    return MAE(**common, decoder_dim=32, decoder_depth=1, decoder_heads=2), [(32, 32)]


class _CountSteps(L.Callback):
    """Counts syncs from the start of one training batch to the start of the next: forward,
    loss, backward, gradient clipping, optimiser step, teacher update, Lightning's logging and
    progress bookkeeping of the step."""

    def __init__(self) -> None:
        self.per_step: list[dict[str, int]] = []
        self._counter: SyncCounter | None = None

    def _stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.per_step.append(dict(self._counter.syncs))
            self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()

        def optimizer_steps():
            return [
                state["step"]
                for optimizer in trainer.optimizers
                for state in optimizer.state.values()
                if "step" in state
            ]

        self._counter = SyncCounter(optimizer_steps)
        self._counter.__enter__()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._counter is not None:  # the last step's window ends at the epoch's end work
            self._counter.__exit__(None, None, None)
            self._counter = None


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino", "mae"])
def test_a_training_step_with_optimiser_step_does_not_sync(name):
    torch.manual_seed(0)
    module, sizes = _objective(name)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "views": [torch.randn(4, 3, *size, generator=generator) for size in sizes],
        "index": torch.arange(4),
    }
    counter = _CountSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, precision="bf16-mixed", gradient_clip_val=1.0,
        log_every_n_steps=50, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter],
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch] * 5, batch_size=None))
    assert len(counter.per_step) == 4  # steps 2 and 4 include the non-finite check's copy
    assert counter.per_step == [{}] * 4
