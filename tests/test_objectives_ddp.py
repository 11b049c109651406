"""Distributed correctness: 2 CPU processes under DDP (gloo) equal 1 process on the global batch.

SimCLR gathers embeddings with gradients, MoCo v3 gathers momentum keys, DINO all-reduces its
center and DINOv2 its centers and Sinkhorn-Knopp sums, so loss, gradients, centers and teacher
assignments must match a single process that sees the whole batch.

BatchNorm runs in train mode, as in training. MoCo v3's heads have BatchNorm layers: their batch
statistics are global only with ``sync_batchnorm: true`` (the cluster recipes' setting). Torch's
SyncBatchNorm needs CUDA, so on gloo the layers become :class:`GatheredBatchNorm`, the same
arithmetic (statistics of the all-gathered batch); the plain per-rank BatchNorm of
``sync_batchnorm: false`` is shown to differ from one process.
KoLeo / KDE are off for DINOv2: like the DINOv2 reference they are computed per rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from objective_helpers import one_thread, one_torch_thread, real_views  # noqa: F401
from scratchpath.objectives import DINO, DINOv2, MoCoV3, SimCLR
from scratchpath.objectives.base import SSLObjective
from scratchpath.objectives.collectives import gather_with_grad
from scratchpath.objectives.masking import PatchMasks, sample_masks

WORLD_SIZE = 2
GLOBAL_BATCH = 8
VIT = {"backbone": "vit_tiny_patch16_224"}
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "dynamic_img_size": True}


NAMES = ["simclr", "mocov3", "mocov3_bn_per_rank", "dino", "dinov2", "dinov2_sinkhorn"]
EQUAL = [name for name in NAMES if name != "mocov3_bn_per_rank"]
N_GLOBAL, GRID = 2, (4, 4)  # DINOv2: two 32 px global crops of 8 px patches


class GatheredBatchNorm(nn.BatchNorm1d):
    """SyncBatchNorm's arithmetic on any backend: normalise by the statistics of the batch
    gathered from every rank (with gradients), then the layer's affine transform."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        everything = gather_with_grad(x)  # (world × B, C)
        mean, var = everything.mean(dim=0), everything.var(dim=0, unbiased=False)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """What ``sync_batchnorm: true`` does (``SyncBatchNorm.convert_sync_batchnorm``), for gloo."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            synced = GatheredBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            synchronise_batchnorm(child)
    return module


class FixedMasksDINOv2(DINOv2):
    """DINOv2 whose masks are this rank's slice of fixed global-batch masks, and which keeps
    its teacher targets (scattered to dense ``(crop, image, patch, K)``) for comparison."""

    rows = slice(None)

    def draw_masks(self, n_images: int, grid: tuple[int, int]) -> PatchMasks:
        masks = GLOBAL_MASKS[:, self.rows].reshape(n_images, -1)
        return PatchMasks.from_numpy(masks, int(GLOBAL_MASKS.sum()), self.mask_token.device)

    def teacher_probs(self, cls_logits, patch_logits, valid, teacher_temp):
        cls_probs, patch_probs = super().teacher_probs(
            cls_logits, patch_logits, valid, teacher_temp
        )
        masks = self.draw_masks(len(cls_logits), GRID)
        dense = torch.zeros(masks.mask.numel(), patch_probs.shape[-1])
        dense[masks.index[valid]] = patch_probs[valid]
        batch = len(cls_logits) // N_GLOBAL
        self.targets = (cls_probs.view(N_GLOBAL, batch, -1), dense.view(N_GLOBAL, batch, -1))
        return cls_probs, patch_probs


GLOBAL_MASKS = sample_masks(
    N_GLOBAL * GLOBAL_BATCH, GRID, 0.5, (0.1, 0.5), np.random.default_rng(0)
).reshape(N_GLOBAL, GLOBAL_BATCH, -1)


def build(name: str, rows: slice = slice(None)) -> SSLObjective:
    torch.manual_seed(0)
    head = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "center_momentum": 0.5}
    if name == "simclr":
        module = SimCLR(**VIT, backbone_kwargs=VIT_KWARGS, proj_hidden_dim=32, proj_out_dim=16)
    elif name.startswith("mocov3"):
        module = MoCoV3(**VIT, backbone_kwargs=VIT_KWARGS, proj_hidden_dim=32, proj_out_dim=16)
    elif name == "dino":
        module = DINO(**VIT, backbone_kwargs=VIT_KWARGS, **head)
    else:
        centering = "sinkhorn_knopp" if name.endswith("sinkhorn") else "ema"
        module = FixedMasksDINOv2(
            **VIT, backbone_kwargs=VIT_KWARGS, **head, centering=centering, koleo_weight=0.0,
            warmup_teacher_temp_epochs=0,
        )  # fmt: skip
        module.rows = rows
    return module.train()


class LossOnly(nn.Module):
    """Routes DDP's forward to ``compute_loss`` so DDP's gradient hooks fire as in training."""

    def __init__(self, objective: SSLObjective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.objective.compute_loss(views)


def global_views(tiles_dir: Path, name: str) -> list[torch.Tensor]:
    sizes = [32, 32, 16, 16] if name.startswith("dino") else [32, 32]
    return real_views(tiles_dir, GLOBAL_BATCH, 0, 0, seed=0, sizes=sizes)


def run_step(name: str, views: list[torch.Tensor], distributed: bool, rows=slice(None)) -> dict:
    module = build(name, rows)
    if distributed and name in ("simclr", "mocov3"):  # the objectives with BatchNorm heads
        # sync_batchnorm: true. DDP's gradient average is done by hand here: on gloo its
        # overlapped bucket all-reduce and the gathered layers' backward all-to-alls gave wrong
        # gradients (torch's SyncBatchNorm on NCCL orders both on one stream).
        synchronise_batchnorm(module)
        loss = module.compute_loss(views)
        loss.backward()
        for param in module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= WORLD_SIZE
    else:
        model = DistributedDataParallel(LossOnly(module)) if distributed else LossOnly(module)
        loss = model(views)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    result = {"loss": loss.detach(), "grads": grads}
    if name.startswith("dino"):
        result["center"] = module.center.clone()
    if name.startswith("dinov2"):
        result["ibot_center"] = module.ibot_center.clone()
        result["cls_targets"], result["patch_targets"] = module.targets
    return result


def worker(rank: int, tiles_dir: Path, init_file: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        results = {}
        for name in NAMES:
            views = [view[local] for view in global_views(tiles_dir, name)]
            results[name] = run_step(name, views, distributed=True, rows=local)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_and_single(tiles_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(tiles_dir, out_dir / "init", out_dir), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    with one_thread():
        single = {
            name: run_step(name, global_views(tiles_dir, name), distributed=False) for name in NAMES
        }
    return ranks, single


def _rows(rank: int) -> slice:
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    return slice(rank * per_rank, (rank + 1) * per_rank)


@pytest.mark.parametrize("name", EQUAL)
def test_mean_rank_loss_equals_single_process_loss(ddp_and_single, name):
    ranks, single = ddp_and_single
    mean_loss = torch.stack([rank[name]["loss"] for rank in ranks]).mean()
    torch.testing.assert_close(mean_loss, single[name]["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", EQUAL)
def test_ddp_gradients_equal_single_process_gradients(ddp_and_single, name):
    ranks, single = ddp_and_single
    assert set(ranks[0][name]["grads"]) == set(single[name]["grads"])
    for param, expected in single[name]["grads"].items():
        for rank in ranks:
            torch.testing.assert_close(
                rank[name]["grads"][param], expected, rtol=1e-4, atol=1e-5, msg=param
            )


def test_per_rank_batchnorm_differs_from_one_process(ddp_and_single):
    """Why MoCo v3's recipes need sync_batchnorm: true: per-GPU statistics change the loss."""
    ranks, single = ddp_and_single
    mean_loss = torch.stack([rank["mocov3_bn_per_rank"]["loss"] for rank in ranks]).mean()
    assert not torch.allclose(mean_loss, single["mocov3_bn_per_rank"]["loss"], rtol=1e-3)


@pytest.mark.parametrize("name", ["dino", "dinov2", "dinov2_sinkhorn"])
def test_centers_equal_single_process_centers(ddp_and_single, name):
    ranks, single = ddp_and_single
    keys = ["center", "ibot_center"] if name.startswith("dinov2") else ["center"]
    for key in keys:
        for rank in ranks:
            torch.testing.assert_close(rank[name][key], single[name][key])
        moved = bool(single[name][key].abs().sum() > 0)
        assert moved is (name != "dinov2_sinkhorn")  # Sinkhorn-Knopp keeps no running center


@pytest.mark.parametrize("name", ["dinov2", "dinov2_sinkhorn"])
def test_teacher_assignments_equal_single_process(ddp_and_single, name):
    """Softmax-centred or Sinkhorn-Knopp targets of the class tokens and masked patches."""
    ranks, single = ddp_and_single
    for r, rank in enumerate(ranks):
        for key in ("cls_targets", "patch_targets"):
            expected = single[name][key][:, _rows(r)]
            torch.testing.assert_close(rank[name][key], expected, rtol=1e-4, atol=1e-6)
    assert single[name]["patch_targets"].sum() > 0
