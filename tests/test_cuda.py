"""The CUDA tier: what only a GPU can show. Run it on one with ``make gpu-check``.

Every test (or parameter) marked ``cuda`` runs wherever CUDA is present and is reported as
skipped, with the reason, elsewhere (``tests/conftest.py``): never counted as passed. The parts
that also run on a CPU do so here through their ``cpu`` parameter, so that the test code itself
is exercised before it meets a GPU.

- the race of pytorch/vision#9606: a long kernel queued, buffers freed while reductions of them
  are still queued, then a decode; the reductions must read what was there (and an unordered
  writer, the control, must be caught by the same harness);
- nvJPEG's pixels against the CPU decoder's, and damaged tiles named on the CUDA path;
- full device-path steps (batch transfer with decode, views, forward, backward, optimiser, EMA
  update) of every objective under ``torch.cuda.set_sync_debug_mode("error")``;
- a bf16 ``scratchpath fit`` of every smoke recipe on the GPU;
- a 2-GPU NCCL ``fit`` where two GPUs exist.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from scratchpath.cli.fit import run_fit
from scratchpath.data import PatchDataModule
from scratchpath.data.decode import EncodedTiles, decode_on_device, decode_or_name
from scratchpath.objectives import DINO, MAE, DINOv2, MoCoV3, SimCLR
from scratchpath.store import PatchStore, import_tiles
from scratchpath.views import MAEView, MultiCrop, TwoViews

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _lc25000(tiles_dir: Path, n: int) -> list[Path]:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))
    assert files, f"no LC25000 tiles under {tiles_dir}"
    return files[:: max(1, len(files) // n)][:n]


def _import(files: list[Path], store: Path, tile_size: int, codec: str = "jpeg") -> Path:
    folder = store.with_name(store.name + "_tiles")
    folder.mkdir(parents=True)
    for k, f in enumerate(files):
        shutil.copy(f, folder / f"{k:05d}_{f.name}")
    import_tiles(folder, store, tile_size=tile_size, codec=codec, use_folder_labels=False)
    return store


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# -- pytorch/vision#9606: the decode must not write memory that queued work still reads -------

TILE = 224
# nvJPEG and libjpeg-turbo differ in IDCT rounding and 4:2:0 chroma upsampling, not in content:
# a wrong decode (garbage, swapped channels, another tile) scores far below this
MATCHING_PSNR = 30.0
SPIN_CYCLES = 50_000_000  # ~25 ms at 2 GHz: the decode runs while the reductions still wait
ITERATIONS = 40
VICTIMS = 8


def queued_reductions_corrupted(decode: Callable[[], object]) -> int:
    """Iterations whose queued reductions read memory that ``decode`` overwrote.

    Each iteration: victims the size of one decoded tile, filled and synchronised; a long
    kernel queued on the current stream, then one reduction per victim behind it; the victims
    freed while those reductions wait (the caching allocator may hand their blocks out again at
    once); ``decode``; then the sums are checked against their exact values (integers below
    2^24: float32 adds them exactly).
    """
    elements = 3 * TILE * TILE // 4  # float32 victims of one tile's bytes
    expected = torch.tensor([float(k + 1) * elements for k in range(VICTIMS)])
    corrupted = 0
    for _ in range(ITERATIONS):
        victims = [torch.full((elements,), float(k + 1), device="cuda") for k in range(VICTIMS)]
        torch.cuda.synchronize()
        torch.cuda._sleep(SPIN_CYCLES)
        sums = torch.stack([v.sum() for v in victims])
        del victims
        out = decode()
        torch.cuda.synchronize()
        corrupted += int(not torch.equal(sums.cpu(), expected))
        del out
    return corrupted


def _unordered_writer() -> torch.Tensor:
    """The hazard itself, in software: outputs allocated on the current stream, written on
    another stream that does not wait for it (what torchvision's nvJPEG path did)."""
    out = [torch.empty(3 * TILE * TILE, dtype=torch.uint8, device="cuda") for _ in range(VICTIMS)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for tile in out:
            tile.fill_(7)
    return torch.stack(out)  # (the stack waits on the current stream: only the fills race)


@pytest.fixture(scope="module")
def race_blobs(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Real tiles as stored by the default codec (4:4:4) and by format-1 stores (4:2:0, the
    layout nvJPEG's hardware engine always takes)."""
    root = tmp_path_factory.mktemp("race")
    out = {}
    for codec in ("jpeg:90:444", "jpeg:90:420"):
        store = _import(_lc25000(tiles_dir, VICTIMS), root / codec.replace(":", "_"), TILE, codec)
        out[codec] = PatchStore(store).read_encoded_batch(range(VICTIMS))
    return out


@CUDA
@pytest.mark.parametrize("codec", ["jpeg:90:444", "jpeg:90:420"])
def test_decode_never_overwrites_memory_that_queued_kernels_still_read(
    race_blobs: dict[str, list], codec: str
) -> None:
    encoded = EncodedTiles.from_blobs(race_blobs[codec]).pin_memory()
    decoded = []

    def decode() -> torch.Tensor:
        tiles = encoded.decode("cuda")
        decoded.append(tiles)
        return tiles

    assert queued_reductions_corrupted(decode) == 0
    reference = encoded.decode("cpu")
    for tiles in decoded:  # and the decode itself wrote the right pixels every time
        assert _psnr(tiles.cpu(), reference) > MATCHING_PSNR


@CUDA
def test_the_race_harness_catches_an_unordered_writer() -> None:
    # The control: without it, 0 corrupted above could mean a harness that sees nothing.
    assert queued_reductions_corrupted(_unordered_writer) > 0


@CUDA
@pytest.mark.parametrize("codec", ["jpeg:90:444", "jpeg:90:420"])
def test_nvjpeg_pixels_match_the_cpu_decoder(race_blobs: dict[str, list], codec: str) -> None:
    encoded = EncodedTiles.from_blobs(race_blobs[codec])
    on_gpu, on_cpu = encoded.decode("cuda").cpu(), encoded.decode("cpu")
    assert on_gpu.shape == on_cpu.shape == (VICTIMS, 3, TILE, TILE)
    assert _psnr(on_gpu, on_cpu) > MATCHING_PSNR


@pytest.mark.parametrize("device", DEVICES)
def test_a_tile_only_the_decoder_rejects_is_named_on_the_device_path(
    race_blobs: dict[str, list], device: str
) -> None:
    # Huffman code counts that overflow: the stream's structure is intact, the decoder refuses.
    blobs = list(race_blobs["jpeg:90:444"])
    at = blobs[3].index(b"\xff\xc4") + 5
    blobs[3] = blobs[3][:at] + b"\xff" * 16 + blobs[3][at + 16 :]
    encoded = EncodedTiles.from_blobs(blobs, tiles=range(100, 100 + VICTIMS))

    def name(tile: int, reason: str) -> Exception:
        return RuntimeError(f"tile {tile}: {reason}")

    tiles, damage = decode_or_name(encoded, torch.device(device), name)
    assert [tile for tile, _ in damage] == [103]
    assert tiles.shape == (VICTIMS, 3, TILE, TILE) and tiles.device.type == device


def _scan_middle(blob: bytes) -> int:
    at = blob.index(b"\xff\xda")
    return (at + 2 + int.from_bytes(blob[at + 2 : at + 4], "big") + len(blob)) // 2


DECODER_DAMAGE = {
    "truncated": lambda blob: blob[: int(len(blob) * 0.6)],
    "corrupt": lambda blob: (
        blob[: _scan_middle(blob)] + b"\xff\x4a" + blob[_scan_middle(blob) + 2 :]
    ),
    "empty": lambda blob: b"",
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(DECODER_DAMAGE))
def test_the_decoder_itself_rejects_each_kind_of_damage(
    race_blobs: dict[str, list], kind: str, device: str
) -> None:
    # Without the workers' jpeg_damage check: does the decoder (nvJPEG on CUDA) see the same
    # damage? If it does, the check only makes the two paths agree by construction; if not,
    # the check is what keeps a damaged tile from training silently on the GPU.
    blobs = list(race_blobs["jpeg:90:420"])
    blobs[5] = DECODER_DAMAGE[kind](blobs[5])
    encoded = EncodedTiles.from_blobs(blobs, tiles=range(VICTIMS))
    _, damage = decode_or_name(encoded, torch.device(device), lambda t, r: RuntimeError(r))
    assert [tile for tile, _ in damage] == [5]


@CUDA
def test_decode_waits_for_nothing_queued_on_the_training_stream(
    race_blobs: dict[str, list],
) -> None:
    # TorchCodec waits on the host for the decode's own stream; ours must not be the training
    # stream, or every step would drain the GPU before decoding (no run-ahead).
    parts = EncodedTiles.from_blobs(race_blobs["jpeg:90:420"]).pin_memory().parts()
    decode_on_device(parts, torch.device("cuda"))  # warm-up: nvJPEG handles, decode stream
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN_CYCLES * 8)  # ~200 ms queued on the training stream
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    decode_on_device(parts, torch.device("cuda"))
    assert not start.query(), "the decode waited for the kernel queued before it"
    torch.cuda.synchronize()


# -- full device-path steps under torch.cuda.set_sync_debug_mode("error") -----------------------

VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True},
}
STEP_OBJECTIVES: dict[str, Callable[[], tuple[L.LightningModule, object]]] = {
    "simclr": lambda: (
        SimCLR(**VIT, proj_hidden_dim=32, proj_out_dim=16),
        TwoViews(output_size=32, device_augment=True),
    ),
    "mocov3": lambda: (
        MoCoV3(**VIT, proj_hidden_dim=32, proj_out_dim=16),
        TwoViews(output_size=32, device_augment=True),
    ),
    "dino": lambda: (
        DINO(**VIT, out_dim=64, hidden_dim=32, bottleneck_dim=16),
        MultiCrop(global_size=32, local_size=16, n_local_crops=2, device_augment=True),
    ),
    "dinov2": lambda: (
        DINOv2(
            backbone="vit_small_patch14_reg4_dinov2",
            backbone_kwargs={
                "img_size": 32,
                "patch_size": 8,
                "depth": 2,
                "embed_dim": 48,
                "num_heads": 2,
                "dynamic_img_size": True,
            },
            out_dim=64,
            hidden_dim=32,
            bottleneck_dim=16,
        ),
        MultiCrop(global_size=32, local_size=16, n_local_crops=2, device_augment=True),
    ),
    "mae": lambda: (
        MAE(**VIT, decoder_dim=32, decoder_depth=1, decoder_heads=2),
        MAEView(output_size=32, device_augment=True),
    ),
}
# (steps, checked from): steps 3..6 on a GPU (with the batch loading before each); on a CPU,
# where only the test's own code is checked, steps 2..3
STEPS = {"cuda": (6, 2), "cpu": (3, 1)}


class _SyncDebugWindow(L.Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` from the end of step ``start`` to the end of
    the last step: each checked step's next-batch fetch, host-to-device transfer, JPEG decode,
    device views, forward, loss, backward, gradient clipping, optimiser step and EMA update
    raise if they synchronise the host with the device."""

    def __init__(self, on_cuda: bool, start: int) -> None:
        self.on_cuda, self.start = on_cuda, start
        self.checked_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.start:
            self.checked_steps += 1
        if self.on_cuda and trainer.global_step == self.start:
            torch.cuda.set_sync_debug_mode("error")
        if self.on_cuda and trainer.global_step >= trainer.max_steps:
            torch.cuda.set_sync_debug_mode("default")  # before Lightning's end-of-fit work


@pytest.fixture(scope="module")
def step_store(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 real tiles at 64 px, JPEG: the device path reads their bytes, decodes on the device."""
    root = tmp_path_factory.mktemp("steps")
    return _import(_lc25000(tiles_dir, 64), root / "store", tile_size=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(STEP_OBJECTIVES))
def test_device_path_steps_do_not_synchronise(step_store: Path, name: str, device: str) -> None:
    torch.manual_seed(0)
    module, views = STEP_OBJECTIVES[name]()
    data = PatchDataModule(stores=[str(step_store)], views=views, batch_size=8, num_workers=0)
    steps, start = STEPS[device]
    window = _SyncDebugWindow(on_cuda=device == "cuda", start=start)
    trainer = L.Trainer(
        accelerator=device, devices=1, precision="bf16-mixed", max_steps=steps,
        gradient_clip_val=1.0, log_every_n_steps=1000, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[window],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert data.views.device_augment is True  # the device path: bytes decoded on `device`
    assert trainer.global_step == steps and window.checked_steps == steps - start
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -- bf16 fit of every smoke recipe, and a 2-GPU NCCL fit ----------------------------------------

SMOKE = ["smoke_simclr", "smoke_mocov3", "smoke_dino", "smoke_dinov2", "smoke_mae"]


@pytest.fixture(scope="module")
def smoke_workdir(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository root for the smoke recipes (runs/smoke_store,
    runs/lc25000_store), from the real tiles there are, at 64 px."""
    root = tmp_path_factory.mktemp("smoke")
    runs = root / "runs"
    unlabelled = tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled"
    import_tiles(unlabelled, runs / "smoke_store", tile_size=64)
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if (source / r["path"]).is_file()]
    subset = [r for label in ("lung_aca", "lung_n", "lung_scc")
              for r in [r for r in rows if r["label"] == label][:40]]  # fmt: skip
    with open(root / "lc_labels.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    import_tiles(source, runs / "lc25000_store", labels_csv=root / "lc_labels.csv",
                 group_column="lc25000clean_group_id", tile_size=64)  # fmt: skip
    return root


# On a CPU one recipe runs, to check this test's own code: tests/test_fit.py fits them all there.
SMOKE_FITS = [pytest.param(name, "cuda", marks=CUDA) for name in SMOKE] + [
    pytest.param("smoke_simclr", "cpu", marks=pytest.mark.slow)
]


@pytest.mark.parametrize(("name", "device"), SMOKE_FITS)
def test_smoke_recipe_fits_in_bf16(
    smoke_workdir: Path, name: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU: 30 steps (the online evaluation runs at step 25); on a CPU, 3 steps.
    steps = 30 if device == "cuda" else 3
    monkeypatch.chdir(smoke_workdir)
    status = run_fit(
        [
            "--config",
            str(REPO / "recipes" / f"{name}.yaml"),
            "--trainer.accelerator",
            "gpu" if device == "cuda" else "cpu",
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            str(steps),
            "--trainer.default_root_dir",
            f"runs/{device}_{name}",
        ]
    )
    assert status == 0
    checkpoint = torch.load(
        smoke_workdir / "runs" / f"{device}_{name}" / "checkpoints" / "last.ckpt",
        weights_only=True,
        map_location="cpu",
    )
    assert checkpoint["global_step"] == steps
    config = checkpoint["scratchpath"]["config"]
    assert "precision: bf16-mixed" in config
    weights = [t for t in checkpoint["state_dict"].values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights)


@CUDA
def test_two_gpu_nccl_fit_trains_and_checkpoints(smoke_workdir: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scratchpath",
            "fit",
            "--config",
            str(REPO / "recipes" / "smoke_dino.yaml"),
            "--trainer.accelerator",
            "gpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "5",
            "--trainer.default_root_dir",
            "runs/nccl",
            "--data.batch_size",
            "16",
        ],
        cwd=smoke_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=nccl" in (result.stdout + result.stderr).lower()
    checkpoint = torch.load(
        smoke_workdir / "runs" / "nccl" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 5
    assert "global batch 32" in result.stderr  # 2 ranks x 16
