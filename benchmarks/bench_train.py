"""Question: how much does the framework (Lightning Trainer + SSLObjective) cost per step?

For each objective, the same model (a tiny ViT), the same pre-made batches of real H&E views and
the same precision are trained two ways in this run:

- framework: ``lightning.Trainer.fit`` on the objective (schedules, logging, the non-finite
  loss check, EMA teacher update, everything ``scratchpath fit`` runs per step);
- baseline: a plain PyTorch loop calling the same ``objective.compute_loss(views)``, AdamW,
  ``backward``, ``step`` (and the same EMA update for objectives with a teacher).

On a GPU it then trains the full-size DINOv2 ViT-S/14 and ViT-B/14 (``full_size_dinov2``) and
prints their images/s and MFU in bf16.

It prints images/s (all views counted) of both, their ratio (target: framework >= 0.95 of the
baseline, i.e. <= 5 % overhead), the model FLOPs per image of one training step
(``torch.utils.flop_counter.FlopCounterMode``: forward + backward of every view) and the
achieved FLOP/s — as MFU against ``--peak-tflops`` on a GPU (default: H200 bf16 dense, 989).

Data loading is excluded on purpose (batches are made once, up front): this isolates the
training-step overhead; ``benchmarks/bench_data*.py`` measure the input pipeline.

    python benchmarks/bench_train.py                         # CPU, tiny ViT, ~1-2 minutes
    python benchmarks/bench_train.py --objectives dino mae --image-size 224 \\
        --backbone vit_small_patch16_224 --depth 12 --embed-dim 384 --batch-size 128   # a GPU

Data: ``SCRATCHPATH_TEST_DATA`` (default ``../shared/data``), DeepTexture unlabelled tiles.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from scratchpath.objectives import OBJECTIVES

HE_MEAN, HE_STD = (0.70, 0.55, 0.75), (0.15, 0.20, 0.15)  # only to scale inputs sensibly


def load_tiles(data_root: Path, n: int, size: int) -> torch.Tensor:
    """``n`` real H&E tiles resized to ``size``, normalised, ``(n, 3, size, size)`` float32."""
    folder = data_root / "tiles" / "deeptexture_examples_unlabeled_256" / "unlabeled"
    paths = sorted(folder.glob("*.jp*g"))[:n]
    if not paths:
        raise SystemExit(f"no tiles in {folder}; set SCRATCHPATH_TEST_DATA")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(HE_MEAN).view(1, 3, 1, 1), torch.tensor(HE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_batches(tiles: torch.Tensor, objective: str, n_batches: int, batch: int, seed: int):
    """Pre-made batches in the data module's format: ``{"views": [...], "index": ...}``."""
    g = torch.Generator().manual_seed(seed)
    size = tiles.shape[-1]
    out = []
    for _ in range(n_batches):
        idx = torch.randint(len(tiles), (batch,), generator=g)
        x = tiles[idx]
        flip = x.flip(-1)
        if objective == "mae":
            views = [x]
        elif objective in ("dino", "dinov2"):  # 2 global crops + 4 local crops at half the size
            local = F.interpolate(x[..., : size // 2, : size // 2], size=size // 2)
            views = [x, flip, local, local.flip(-2), local.flip(-1), local.transpose(-1, -2)]
        else:
            views = [x, flip]
        out.append({"views": [v.contiguous() for v in views], "index": idx})
    return out


def build(objective: str, args: argparse.Namespace) -> L.LightningModule:
    torch.manual_seed(0)
    kwargs = dict(
        img_size=args.image_size,
        patch_size=args.patch_size,
        depth=args.depth,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
    )
    if objective in ("dino", "dinov2"):
        kwargs["dynamic_img_size"] = True
    extra = {
        "simclr": dict(proj_hidden_dim=512, proj_out_dim=128),
        "mocov3": dict(proj_hidden_dim=512, proj_out_dim=128),
        "dino": dict(out_dim=4096, hidden_dim=512, bottleneck_dim=128, freeze_last_layer_epochs=0),
        "dinov2": dict(
            out_dim=4096,
            hidden_dim=512,
            bottleneck_dim=128,
            freeze_last_layer_epochs=0,
            centering="sinkhorn_knopp",
            koleo_weight=0.0,
            kde_weight=0.05,
        ),
        "mae": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
    }[objective]
    # DINOv2 runs its own ViT family (4 registers, LayerScale), shrunk by the same kwargs.
    backbone = "vit_small_patch14_reg4_dinov2" if objective == "dinov2" else args.backbone
    return OBJECTIVES[objective](
        backbone=backbone, backbone_kwargs=kwargs, lr=1e-4, warmup_epochs=0.0, **extra
    )


class _StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_framework(model, batches, args, device: str) -> float:
    """Seconds for the timed steps through Lightning's Trainer."""
    timer = _StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    return timer.end - timer.start


def run_baseline(model, batches, args, device: str) -> float:
    """Seconds for the timed steps of a plain loop with the same loss call and AdamW."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    teacher = bool(model.teacher_pairs())
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    start = 0.0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            _sync()
            start = time.perf_counter()
        views = [v.to(device, non_blocking=True) for v in batch["views"]]
        with autocast:
            loss = model.compute_loss(views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher:
            model.update_teacher(0.996)
    _sync()
    return time.perf_counter() - start


def flops_per_sample(model, batch, device: str) -> float:
    """Training FLOPs (forward + backward, all views) per source tile."""
    model = model.to(device).train()
    views = [v.to(device) for v in batch["views"]]
    with FlopCounterMode(display=False) as counter:
        model.compute_loss(views).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(views[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in (image size, precision, peak)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=sorted(OBJECTIVES))
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=None, help="default 64 CPU / 224 GPU")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--dinov2-batch-size", type=int, default=64, help="per-GPU batch of the full-size DINOv2"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats, best kept")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: 989 = H200 bf16 dense on CUDA)",
    )
    parsed = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parsed.image_size = parsed.image_size or (224 if device == "cuda" else 64)
    parsed.precision = "bf16-mixed" if device == "cuda" else "32-true"
    parsed.peak_tflops = parsed.peak_tflops or (989.0 if device == "cuda" else None)
    return parsed


def main() -> None:
    parsed = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = parsed.peak_tflops
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data_root = Path(os.environ.get("SCRATCHPATH_TEST_DATA", "../shared/data"))
    tiles = load_tiles(data_root, 64, parsed.image_size)
    n_batches = parsed.warmup + parsed.steps

    print(
        f"device {device}, precision {parsed.precision}, {parsed.backbone} depth {parsed.depth} "
        f"dim {parsed.embed_dim} at {parsed.image_size} px, batch {parsed.batch_size}, "
        f"{parsed.steps} timed steps after {parsed.warmup}, best of {parsed.rounds} rounds"
    )
    print(
        f"{'objective':<9} {'views':>5} {'framework img/s':>16} {'plain img/s':>12} "
        f"{'ratio':>6} {'GFLOP/img':>10} {'achieved':>14}"
    )
    for name in parsed.objectives:
        batches = make_batches(tiles, name, n_batches, parsed.batch_size, seed=0)
        images = parsed.steps * sum(len(v) for v in batches[0]["views"])
        flops = flops_per_sample(build(name, parsed), batches[0], device)
        # Interleaved rounds, best of each side: other load on the machine only slows a run down.
        plain_s = framework_s = float("inf")
        for _ in range(parsed.rounds):
            plain_s = min(plain_s, run_baseline(build(name, parsed), batches, parsed, device))
            framework_s = min(
                framework_s, run_framework(build(name, parsed), batches, parsed, device)
            )
        tiles_per_s = parsed.steps * parsed.batch_size / framework_s
        achieved = flops * tiles_per_s
        rate = (
            f"MFU {100 * achieved / (peak * 1e12):.1f}%"
            if peak
            else f"{achieved / 1e9:.1f} GFLOP/s"
        )
        print(
            f"{name:<9} {len(batches[0]['views']):>5} {images / framework_s:>16.1f} "
            f"{images / plain_s:>12.1f} {plain_s / framework_s:>6.3f} "
            f"{flops / len(batches[0]['views']) / 1e9:>10.3f} {rate:>14}"
        )
    print("ratio = framework / plain-PyTorch throughput (1.0 = no overhead; target >= 0.95)")
    if device == "cuda" and "dinov2" in parsed.objectives:
        full_size_dinov2(tiles, parsed, peak)


DINOV2_FULL = {
    "ViT-S/14": "vit_small_patch14_reg4_dinov2",
    "ViT-B/14": "vit_base_patch14_reg4_dinov2",
}


def full_size_dinov2(
    tiles: torch.Tensor,
    args: argparse.Namespace,
    peak: float,
    models: dict[str, str] = DINOV2_FULL,
) -> dict[str, dict[str, float]]:
    """On a GPU: the real DINOv2 ViT-S/14 and ViT-B/14 (2 x 224 + 8 x 98 px crops, 65,536
    prototypes, Sinkhorn-Knopp, bf16) through the framework: images/s (all crops) and MFU,
    printed and returned per model (``benchmarks/gpu_check.py`` runs ViT-S/14 alone)."""
    batch = args.dinov2_batch_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        x = F.interpolate(tiles[torch.randint(len(tiles), (batch,), generator=g)], size=224)
        local = F.interpolate(x[..., :112, :112], size=98)
        views = [x, x.flip(-1)] + [local.roll(i, dims=-1) for i in range(8)]
        batches.append({"views": [v.contiguous() for v in views], "index": torch.arange(batch)})
    images = args.steps * batch * 10
    print(f"DINOv2 full size, bf16, batch {batch} x (2 x 224 + 8 x 98 px), 65,536 prototypes")
    print(f"{'model':<9} {'framework img/s':>16} {'plain img/s':>12} {'ratio':>6} {'MFU':>7}")
    results = {}
    for label, backbone in models.items():

        def model(backbone: str = backbone) -> L.LightningModule:
            torch.manual_seed(0)
            return OBJECTIVES["dinov2"](
                backbone=backbone,
                backbone_kwargs={"img_size": 224, "dynamic_img_size": True, "drop_path_rate": 0.1},
                centering="sinkhorn_knopp", koleo_weight=0.0, kde_weight=0.05,
                freeze_last_layer_epochs=0, lr=1e-4, warmup_epochs=0.0,
            )  # fmt: skip

        with torch.autocast("cuda", dtype=torch.bfloat16):
            flops = flops_per_sample(model(), batches[0], "cuda")
        plain_s = run_baseline(model(), batches, args, "cuda")
        framework_s = run_framework(model(), batches, args, "cuda")
        mfu = flops * args.steps * batch / framework_s / (peak * 1e12)
        print(
            f"{label:<9} {images / framework_s:>16.1f} {images / plain_s:>12.1f} "
            f"{plain_s / framework_s:>6.3f} {100 * mfu:>6.1f}%"
        )
        results[label] = {
            "framework_img_s": images / framework_s, "plain_img_s": images / plain_s,
            "framework_over_plain": plain_s / framework_s, "mfu": mfu, "batch": batch,
        }  # fmt: skip
    return results


if __name__ == "__main__":
    main()
