"""Random streams per rank: 2 CPU processes (DDP, gloo) train MAE on device-path views.

Every step records its MAE masks, which samples drop-path dropped in the last block, and the
device-built views. The two ranks must differ in all three (one global batch of 2 ranks has
2 x B distinct masks, not B), a repeat of the run must reproduce them exactly, and a run
resumed from a checkpoint must continue with exactly the draws of the uninterrupted run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from scratchpath.data import PatchDataModule
from scratchpath.objectives import MAE
from scratchpath.store import StoreWriter
from scratchpath.views import MAEView

N_TILES, BATCH, STEPS = 32, 4, 4


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory, tiles_dir: Path) -> Path:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::20][:N_TILES]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    path = tmp_path_factory.mktemp("streams") / "lung.zarr"
    with StoreWriter(path, tile_size=64, shard_size=8) as writer:  # JPEG: the encoded path
        slide = writer.begin_slide({"source": "x", "slide_id": "s", "sha256": "0" * 64})
        slide.add(
            tiles, x=np.arange(N_TILES) * 64, y=np.zeros(N_TILES), mpp=np.full(N_TILES, 0.5),
            tissue_fraction=np.ones(N_TILES),
        )  # fmt: skip
        slide.commit()
    return path


class RecordingMAE(MAE):
    """MAE that writes what each step drew to ``out/rank{r}.npz`` at the end of training."""

    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.records: list[dict[str, np.ndarray]] = []
        self.backbone.blocks[-1].drop_path1.register_forward_hook(self._record_drop_path)

    def _record_drop_path(self, module, inputs, output) -> None:
        dropped = (output == 0).flatten(1).all(1)  # (B,) samples whose branch was dropped
        self.records[-1]["dropped"] = dropped.numpy().copy()

    def encode(self, images, mask_ratio):
        tokens, mask, ids_restore = super().encode(images, mask_ratio)
        self.records[-1]["mask"] = mask.numpy().copy()
        return tokens, mask, ids_restore

    def training_step(self, batch, batch_idx):
        view = batch["views"][0].numpy()
        self.records.append({"views": np.array([hashlib.sha1(v.tobytes()).digest() for v in view])})
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        super().on_train_end()
        keys = ("views", "mask", "dropped")
        steps = {k: np.stack([r[k] for r in self.records]) for k in keys}
        np.savez(Path(self.out) / f"rank{self.global_rank}.npz", **steps)


def _fit(store_path: Path, out: Path, ckpt_path: Path | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(11)
    module = RecordingMAE(
        str(out), backbone="vit_tiny_patch16_224", warmup_epochs=0,
        backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.5},
        decoder_dim=16, decoder_depth=1, decoder_heads=2,
    )  # fmt: skip
    data = PatchDataModule(
        stores=[str(store_path)], views=MAEView(output_size=32, device_augment=True),
        batch_size=BATCH, num_workers=0, pin_memory=False, seed=3,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=STEPS, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=2,
                                   save_top_k=-1)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(store_path: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runs")
    first = _fit(store_path, root / "first")
    again = _fit(store_path, root / "again")
    resumed = _fit(store_path, root / "resumed", ckpt_path=root / "first" / "step=2.ckpt")
    return first, again, resumed


@pytest.mark.slow
@pytest.mark.parametrize("draw", ["views", "mask", "dropped"])
def test_ranks_draw_differently(runs, draw):
    rank0, rank1 = runs[0]
    assert rank0[draw].shape == rank1[draw].shape and len(rank0[draw]) == STEPS
    assert not np.array_equal(rank0[draw], rank1[draw])
    if draw == "mask":  # every step: the two ranks' masks differ for every sample
        assert (rank0["mask"] != rank1["mask"]).any(axis=2).all()


@pytest.mark.slow
@pytest.mark.parametrize("draw", ["views", "mask", "dropped"])
def test_a_repeated_run_draws_the_same(runs, draw):
    first, again, _ = runs
    for rank in (0, 1):
        np.testing.assert_array_equal(first[rank][draw], again[rank][draw])


@pytest.mark.slow
@pytest.mark.parametrize("draw", ["views", "mask", "dropped"])
def test_a_resumed_run_continues_with_the_same_draws(runs, draw):
    first, _, resumed = runs
    for rank in (0, 1):
        np.testing.assert_array_equal(resumed[rank][draw], first[rank][draw][2:])
