"""Question: what does a CPU training step of ``recipes/cpu_pretrain.yaml`` cost, and how much do
the recipe's two speed settings win back: keeping big buffers in the heap
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64 GiB``, set by ``make pretrain-cpu``) and
channels-last weights (``model.init_args.channels_last: true``)?

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap``; at batch 128 most activations of a CNN step are larger, so each step
page-faults (and zeroes) them in again: kernel time, not compute. The two settings make glibc keep
freed memory in the heap for the next step (resident memory stays at its peak, as with jemalloc or
tcmalloc).

Channels-last (NHWC) weights let oneDNN run its blocked NHWC convolution kernels instead of
reordering NCHW tensors around each convolution (``SSLObjective(channels_last=True)``, set up as
``fit`` sets it up).

The same training step — SimCLR on ``recipes/cpu_pretrain.yaml``'s slim ResNet-10, two 64 px
views of real H&E tiles per image, batch 128, AdamW — runs in child processes with the default
allocator (baseline), with the heap settings, and with the heap settings and channels-last
weights, alternating, ``--rounds`` times each. It prints seconds per step of each (median over
rounds) and their ratios to the baseline and to the previous arm.

    python benchmarks/bench_cpu_step.py             # ~3 minutes on 2 cores

Data: ``SCRATCHPATH_TEST_DATA`` (default ``../shared/data``), LC25000 lung tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEAP_SETTINGS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def child(args: argparse.Namespace) -> None:
    """Time ``--steps`` training steps after ``--warmup``; print seconds per step as JSON."""
    import torch
    from PIL import Image

    from scratchpath.objectives.simclr import SimCLR

    folder = Path(os.environ.get("SCRATCHPATH_TEST_DATA", "../shared/data")) / "tiles"
    paths = sorted((folder / "lc25000_lung_224").glob("*/*.jpeg"))[: args.batch_size]
    if len(paths) < args.batch_size:
        raise SystemExit(f"need {args.batch_size} tiles in {folder}; set SCRATCHPATH_TEST_DATA")
    tiles = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in paths])
    # NCHW-contiguous, as the loader stacks views (a permuted NHWC array would already be
    # channels-last in memory and hide the difference)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0).contiguous()
    views = [x, x.flip(-1)]
    torch.manual_seed(0)
    model = SimCLR(backbone="resnet10t", backbone_kwargs={"channels": [32, 64, 128, 256]},
                   proj_hidden_dim=512, proj_out_dim=128, temperature=0.2,
                   channels_last=args.channels_last)  # fmt: skip
    model.setup("fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        loss = model.compute_loss(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / args.steps}))


def timed_child(
    args: argparse.Namespace, extra_env: dict[str, str], channels_last: bool = False
) -> float:
    env = {**os.environ, **extra_env}
    for key in HEAP_SETTINGS:
        if key not in extra_env:
            env.pop(key, None)  # the baseline is glibc's default, whatever the caller set
    command = [sys.executable, __file__, "--child", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]  # fmt: skip
    if channels_last:
        command.append("--channels-last")
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    baseline, heap, nhwc = [], [], []
    for _ in range(args.rounds):  # alternate, so drifting machine speed hits all arms alike
        baseline.append(timed_child(args, {}))
        heap.append(timed_child(args, HEAP_SETTINGS))
        nhwc.append(timed_child(args, HEAP_SETTINGS, channels_last=True))
    b, h, c = statistics.median(baseline), statistics.median(heap), statistics.median(nhwc)

    def rounds(times: list[float]) -> str:
        return ", ".join(f"{t:.3f}" for t in times)

    print(f"default glibc allocator:         {b:.3f} s/step  (rounds: {rounds(baseline)})")
    print(f"buffers kept in heap:            {h:.3f} s/step  (rounds: {rounds(heap)})")
    print(f"heap + channels-last weights:    {c:.3f} s/step  (rounds: {rounds(nhwc)})")
    print(f"heap settings: {b / h:.2f}x faster than the default allocator (same run)")
    print(f"channels-last: {h / c:.2f}x faster than heap settings alone (same run)")
    print(f"both: {b / c:.2f}x faster than the baseline (ratio of s/step, same run)")


if __name__ == "__main__":
    main()
