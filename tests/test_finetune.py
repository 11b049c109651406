"""Probe math, grouped splits, labelled datasets and the LinearProbe / FineTune modules."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from objective_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.finetune import (
    FineTune,
    LabelledTileDataModule,
    LabelledTiles,
    LinearProbe,
    extract_features,
    grouped_split,
    knn_eval,
    linear_probe_eval,
    rankme,
    split_store,
)
from scratchpath.store import PatchStore, import_tiles

TINY = {"img_size": 32, "patch_size": 8, "depth": 2}
MEAN, STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.2)


def _blobs(n: int, n_classes: int, seed: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian clusters, one per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 4
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def _of_class(rows: list[dict], label: str) -> list[dict]:
    return [r for r in rows if r["label"] == label]


@pytest.fixture(scope="module")
def lung_store(tmp_path_factory, tiles_dir: Path) -> PatchStore:
    """60 real LC25000 lung tiles (20 per class) at 32 px, in groups of 3 tiles."""
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    picked = [r for c in ("lung_aca", "lung_n", "lung_scc") for r in _of_class(rows, c)[:20]]
    tmp = tmp_path_factory.mktemp("lung")
    with open(tmp / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "group"])
        for i, r in enumerate(picked):
            writer.writerow([r["path"], r["label"], f"{r['label']}-{i // 3}"])
    import_tiles(source, tmp / "store", labels_csv=tmp / "labels.csv", tile_size=32)
    return PatchStore(tmp / "store")


def test_knn_eval_scores_separable_features_perfectly():
    x, y = _blobs(400, 4, seed=0)
    result = knn_eval(x[:300], y[:300], x[300:], y[300:])
    assert result == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}


def test_knn_eval_on_shuffled_labels_is_near_chance():
    x, y = _blobs(1000, 4, seed=1)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert abs(knn_eval(x[:700], y[:700], x[700:], y[700:])["balanced_accuracy"] - 0.25) < 0.1


def test_knn_votes_are_weighted_by_similarity():
    # 1 very close neighbour of class 1 outweighs 3 barely similar neighbours of class 0
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    test = torch.tensor([[0.95, 0.31]])
    votes = knn_eval(train, [1, 0, 0, 0], test, [1], k=4, temperature=0.07)
    assert votes["accuracy"] == 1.0
    plain_majority = knn_eval(train, [1, 0, 0, 0], test, [1], k=4, temperature=1e6)
    assert plain_majority["accuracy"] == 0.0


def test_linear_probe_scores_separable_features_perfectly():
    x, y = _blobs(400, 4, seed=2)
    assert linear_probe_eval(x[:300], y[:300], x[300:], y[300:])["accuracy"] == 1.0


def test_linear_probe_on_shuffled_labels_is_near_chance():
    x, y = _blobs(1000, 4, seed=3)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    result = linear_probe_eval(x[:700], y[:700], x[700:], y[700:])
    assert abs(result["balanced_accuracy"] - 0.25) < 0.1


def test_linear_probe_is_reproducible_for_a_seed():
    x, y = _blobs(300, 3, seed=4, dim=8)
    x = x + 6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # overlap
    runs = [linear_probe_eval(x[:200], y[:200], x[200:], y[200:], seed=7) for _ in range(2)]
    assert runs[0] == runs[1]


def test_rankme_is_high_for_isotropic_and_one_for_collapsed_features():
    g = torch.Generator().manual_seed(0)
    assert rankme(torch.randn(2000, 64, generator=g)) > 55
    collapsed = torch.randn(500, 1, generator=g) @ torch.randn(1, 64, generator=g)
    assert rankme(collapsed) == pytest.approx(1.0, abs=0.01)
    low_rank = torch.randn(500, 5, generator=g) @ torch.randn(5, 64, generator=g)
    assert 2 < rankme(low_rank) <= 5.01


def test_extract_features_matches_a_manual_forward_and_restores_train_mode(lung_store):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", **TINY).train()
    features = extract_features(model, lung_store, mean=MEAN, std=STD, indices=[5, 0, 9])
    assert model.training
    x = torch.from_numpy(lung_store.read([5, 0, 9])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_extract_features_resizes_tiles_to_the_model_input(lung_store):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1)
    features = extract_features(model, lung_store, mean=MEAN, std=STD, input_size=16)
    assert features.shape == (len(lung_store), 192)


def _assert_groups_apart(groups: np.ndarray, train: np.ndarray, test: np.ndarray) -> None:
    assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(groups)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_puts_a_group_on_both_sides(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 60, size=600).astype(str)
    labels = rng.integers(0, 3, size=600)
    train, test = grouped_split(labels, groups, test_fraction=0.3, seed=seed)
    _assert_groups_apart(groups, train, test)
    assert 0.2 < len(test) / len(labels) < 0.4


def test_grouped_split_is_stratified_by_class():
    groups = np.repeat(np.arange(100), 5).astype(str)  # 100 groups of 5 tiles, one class each
    labels = np.repeat(np.arange(100) % 4, 5)
    _, test = grouped_split(labels, groups, test_fraction=0.3, seed=0)
    per_class = np.bincount(labels[test], minlength=4)  # target: 0.3 * 125 = 37.5 each
    assert all(abs(c - 37.5) <= 5 for c in per_class), per_class


def test_grouped_split_depends_only_on_the_seed():
    groups, labels = np.arange(200).astype(str), np.arange(200) % 2
    a = grouped_split(labels, groups, test_fraction=0.3, seed=5)
    b = grouped_split(labels, groups, test_fraction=0.3, seed=5)
    c = grouped_split(labels, groups, test_fraction=0.3, seed=6)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_grouped_split_refuses_a_bad_fraction():
    with pytest.raises(ScratchpathError, match="--split"):
        grouped_split(np.zeros(4, int), np.arange(4).astype(str), test_fraction=1.5)


def test_split_of_a_real_store_keeps_its_groups_apart(lung_store):
    train, test = split_store(lung_store, test_fraction=0.3, group_column="group", seed=0)
    _assert_groups_apart(lung_store.tiles["group"], train, test)
    assert set(lung_store.labels[test]) == {0, 1, 2}


def test_split_by_a_missing_column_is_a_clear_error(lung_store):
    with pytest.raises(ScratchpathError, match="no tile column 'patient'"):
        split_store(lung_store, test_fraction=0.3, group_column="patient")


def test_labelled_tiles_gives_normalised_resized_images_and_labels(lung_store):
    dataset = LabelledTiles(lung_store, [0, 59], mean=MEAN, std=STD, input_size=16)
    image, label = dataset[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == int(lung_store.labels[59]) == 2


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        num_sanity_val_steps=0,
    )  # fmt: skip


def _datamodule(store: PatchStore) -> LabelledTileDataModule:
    return LabelledTileDataModule(
        data=store.paths[0], test_fraction=0.3, mean=MEAN, std=STD, batch_size=16
    )


def test_linear_probe_trains_the_head_only(lung_store):
    torch.manual_seed(0)
    probe = LinearProbe(create_backbone("vit_tiny_patch16_224", **TINY), num_classes=3, lr=0.1)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    trainer = _trainer(3)
    trainer.fit(probe, datamodule=_datamodule(lung_store))
    after = probe.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not probe.backbone.training
    assert 0.0 <= trainer.callback_metrics["val/accuracy"] <= 1.0


def test_finetune_updates_the_backbone(lung_store):
    torch.manual_seed(0)
    model = FineTune(create_backbone("vit_tiny_patch16_224", **TINY), num_classes=3, lr=1e-3)
    before = model.backbone.patch_embed.proj.weight.clone()
    _trainer(2).fit(model, datamodule=_datamodule(lung_store))
    assert not torch.equal(before, model.backbone.patch_embed.proj.weight)


def test_finetune_decays_the_learning_rate_layer_by_layer():
    backbone = create_backbone("vit_tiny_patch16_224", **TINY)  # layers: embed, block 0, 1
    model = FineTune(backbone, num_classes=3, lr=1e-3, layer_decay=0.5)
    groups = model.param_groups()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(backbone.patch_embed.proj.weight)] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of[id(backbone.blocks[0].attn.qkv.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(backbone.blocks[1].attn.qkv.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3)
    no_decay = [g for g in groups if g.get("weight_decay") == 0.0]
    assert any(any(p is backbone.pos_embed for p in g["params"]) for g in no_decay)


def test_datamodule_refuses_an_unlabelled_store(tmp_path, tiles_dir):
    import_tiles(tiles_dir / "kather2016_texture_samples", tmp_path / "u", use_folder_labels=False)
    module = LabelledTileDataModule(data=str(tmp_path / "u"))
    with pytest.raises(ScratchpathError, match="no class labels"):
        module.setup()
