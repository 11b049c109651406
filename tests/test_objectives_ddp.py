"""Distributed correctness: 2 CPU processes under DDP (gloo) equal 1 process on the global batch.

SimCLR gathers embeddings with gradients, MoCo v3 gathers momentum keys and DINO all-reduces its
center, so loss, gradients and center must match a single process that sees the whole batch.
BatchNorm layers are put in eval mode: without SyncBatchNorm (CUDA only) their batch statistics
are per rank by design, which is not what this test is about.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from objective_helpers import one_thread, one_torch_thread, real_views  # noqa: F401
from scratchpath.objectives import DINO, MoCoV3, SimCLR
from scratchpath.objectives.base import SSLObjective

WORLD_SIZE = 2
GLOBAL_BATCH = 8
VIT = {"backbone": "vit_tiny_patch16_224"}
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "dynamic_img_size": True}


def build(name: str) -> SSLObjective:
    torch.manual_seed(0)
    if name == "simclr":
        module = SimCLR(**VIT, backbone_kwargs=VIT_KWARGS, proj_hidden_dim=32, proj_out_dim=16)
    elif name == "mocov3":
        module = MoCoV3(**VIT, backbone_kwargs=VIT_KWARGS, proj_hidden_dim=32, proj_out_dim=16)
    else:
        module = DINO(
            **VIT, backbone_kwargs=VIT_KWARGS, out_dim=64, hidden_dim=32, bottleneck_dim=16,
            center_momentum=0.5,
        )  # fmt: skip
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
    return module


class LossOnly(nn.Module):
    """Routes DDP's forward to ``compute_loss`` so DDP's gradient hooks fire as in training."""

    def __init__(self, objective: SSLObjective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.objective.compute_loss(views)


def global_views(tiles_dir: Path, name: str) -> list[torch.Tensor]:
    sizes = [32, 32, 16, 16] if name == "dino" else [32, 32]
    return real_views(tiles_dir, GLOBAL_BATCH, 0, 0, seed=0, sizes=sizes)


def run_step(name: str, views: list[torch.Tensor], distributed: bool) -> dict:
    module = build(name)
    model = DistributedDataParallel(LossOnly(module)) if distributed else LossOnly(module)
    loss = model(views)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    center = module.center.clone() if name == "dino" else None
    return {"loss": loss.detach(), "grads": grads, "center": center}


def worker(rank: int, tiles_dir: Path, init_file: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        results = {}
        for name in ("simclr", "mocov3", "dino"):
            views = [view[local] for view in global_views(tiles_dir, name)]
            results[name] = run_step(name, views, distributed=True)
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
            name: run_step(name, global_views(tiles_dir, name), distributed=False)
            for name in ("simclr", "mocov3", "dino")
        }
    return ranks, single


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_mean_rank_loss_equals_single_process_loss(ddp_and_single, name):
    ranks, single = ddp_and_single
    mean_loss = torch.stack([rank[name]["loss"] for rank in ranks]).mean()
    torch.testing.assert_close(mean_loss, single[name]["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_ddp_gradients_equal_single_process_gradients(ddp_and_single, name):
    ranks, single = ddp_and_single
    assert set(ranks[0][name]["grads"]) == set(single[name]["grads"])
    for param, expected in single[name]["grads"].items():
        for rank in ranks:
            torch.testing.assert_close(rank[name]["grads"][param], expected, rtol=1e-4, atol=1e-6)


def test_dino_center_equals_single_process_center(ddp_and_single):
    ranks, single = ddp_and_single
    for rank in ranks:
        torch.testing.assert_close(rank["dino"]["center"], single["dino"]["center"])
    assert single["dino"]["center"].abs().sum() > 0
