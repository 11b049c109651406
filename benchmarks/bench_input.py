"""CPU cost of feeding each cluster recipe's views: the device path against the CPU path.

Imports real H&E tiles (LC25000 lung, 224 px) from ``$SCRATCHPATH_TEST_DATA/tiles`` into a
temporary patch store with the project's ``import_tiles`` (its default JPEG codec), then, for
the views of each cluster recipe (``recipes/{dino_vits16,mae_vits16,mocov3_vits16,
simclr_resnet50}.yaml``), measures the process CPU time (one thread: torch and OpenCV limited to
one, as ``PatchDataModule``'s workers are) that the data-loader worker side spends to deliver one
batch of the recipe's batch size:

  device path (the GPU default)  read the encoded bytes of the batch (``read_encoded_batch``),
                                 collate them into one flat uint8 buffer, pin it
  CPU path (before: the default) read and decode the JPEGs, make every view per tile with
                                 albumentations, stack the uint8 view batches, pin them

Pinning needs CUDA; without it a copy of the same bytes stands in for the pinned copy. It also
prints (for information) the core-ms per tile of the device-side work, decode + views, when it
runs on this CPU: that is what moved to the GPU. The last line is::

    dino_vits16: X core-ms/tile vs Y on the CPU path: ratio R        (R = X / Y)

With CUDA it then measures on the GPU (``gpu_measurements``, also run by
``benchmarks/gpu_check.py``): tiles/s of nvJPEG decode + device views per recipe, and training
images/s (source tiles) and MFU (bf16 model FLOPs from ``torch.utils.flop_counter`` over the
step time, against the GPU's dense bf16 peak) of ``dino_vits16``, ``mae_vitb16`` and
``dinov2_vits14`` fed by ``PatchDataModule`` with at most 4 workers, against the same model fed a
batch already resident on the GPU (the ratio's goal: >= 0.95). The GPU store cycles the real
tiles there are up to 8,192 tiles (``--gpu-only`` skips the CPU part).

    SCRATCHPATH_TEST_DATA=../shared/data python benchmarks/bench_input.py [--tiles 256] [--gpu-only]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from scratchpath.cli.preview import instantiate_views  # noqa: E402
from scratchpath.data import PatchDataModule  # noqa: E402
from scratchpath.data.module import EncodedTiles, ViewBatches  # noqa: E402
from scratchpath.data.sampling import BatchRequest  # noqa: E402
from scratchpath.store import PatchStore, import_tiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHPATH_TEST_DATA", ROOT.parent / "shared" / "data"))
RECIPES = ["simclr_resnet50", "mocov3_vits16", "mae_vits16", "dino_vits16"]  # DINO last
GPU_RECIPES = ["dino_vits16", "mae_vitb16", "dinov2_vits14"]
DECODE_RECIPES = [*RECIPES, "dinov2_vits14"]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per GPU
# The GPU part's store: more tiles than the 25 steps of a rate read at MAE's batch of 256.
GPU_TILES = 8192


def recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())


def make_store(root: Path, n_tiles: int) -> Path:
    """``n_tiles`` real LC25000 tiles (spread over the folder; cycled when fewer exist)."""
    files = sorted((DATA / "tiles" / "lc25000_lung_224").glob("*/*.jpeg"))
    if not files:
        raise SystemExit(f"no LC25000 tiles under {DATA}; set SCRATCHPATH_TEST_DATA")
    folder = root / "tiles"
    folder.mkdir()
    picked = files[:: max(1, len(files) // n_tiles)][:n_tiles]
    for k in range(n_tiles):
        f = picked[k % len(picked)]
        shutil.copy(f, folder / f"{k:05d}_{f.parent.name}_{f.name}")
    store = root / "store.zarr"
    import_tiles(
        folder, store, use_folder_labels=False, mpp=0.5, workers=min(8, os.cpu_count() or 1)
    )
    return store


def stand_in_pin(batch: dict) -> dict:
    """Pinned copies with CUDA (the DataLoader's pinning thread), else plain copies of the
    same bytes."""
    pin = torch.cuda.is_available()

    def copy(x):
        if isinstance(x, EncodedTiles):
            return x.pin_memory() if pin else EncodedTiles(x.data.clone(), x.sizes)
        if isinstance(x, list):
            return [copy(v) for v in x]
        return x.pin_memory() if pin else x.clone()

    return {k: copy(v) for k, v in batch.items()}


def worker_core_ms(dataset: ViewBatches, batches: list[np.ndarray], rounds: int = 2) -> float:
    """Best-of-``rounds`` process CPU ms per tile to make and pin ``batches``."""
    dataset[BatchRequest(0, batches[0][:2])]  # warm-up: open shards, load indexes
    best = float("inf")
    for r in range(rounds):
        start = time.process_time()
        for b in batches:
            stand_in_pin(dataset[BatchRequest(r, b)])
        tiles = sum(len(b) for b in batches)
        best = min(best, (time.process_time() - start) * 1000 / tiles)
    return best


def device_side_core_ms(store: PatchStore, views, batch: np.ndarray, device: str) -> float:
    """ms per tile of decode + device views where they run (CPU: core-ms; CUDA: wall ms)."""
    encoded = EncodedTiles.from_blobs(store.read_encoded_batch(batch))
    params = ViewBatches(store, views, seed=0).view_params(0, batch).to(device)  # the worker's

    def once() -> None:
        views.device_views(encoded.decode(device), params)

    once()
    if device == "cuda":
        torch.cuda.synchronize()
        start, n = time.perf_counter(), 10
        for _ in range(n):
            once()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / (n * len(batch))
    start = time.process_time()
    once()
    return (time.process_time() - start) * 1000 / len(batch)


def cpu_measurements(store_path: Path) -> None:
    store = PatchStore(store_path)
    order = np.random.default_rng(0).permutation(len(store))
    print(
        f"{len(store)} real H&E tiles (224 px, {store.codec}), worker side on one core; "
        f"pin: {'pinned copies' if torch.cuda.is_available() else 'copies (no CUDA)'}"
    )
    print(
        f"{'recipe':<16} {'batch':>5} {'views':>5} {'device path':>12} {'CPU path':>9} "
        f"{'ratio':>7} {'decode+views on CPU':>20}   (core-ms per tile)"
    )
    results = {}
    for name in RECIPES:
        config = recipe(name)["data"]
        batch_size = min(int(config["batch_size"]), len(store))
        batches = [
            order[i : i + batch_size] for i in range(0, len(store) - batch_size + 1, batch_size)
        ]
        batches = batches[: max(1, 256 // batch_size)]
        device_views = instantiate_views(config["views"], where=name)
        device_views.resolve_device_augment("cuda")  # the GPU default
        cpu_views = instantiate_views(config["views"], where=name)
        cpu_views.device_augment = False
        assert device_views.device_augment, f"{name}: the device path is not its GPU default"
        device = worker_core_ms(ViewBatches(store, device_views, seed=0), batches)
        cpu = worker_core_ms(ViewBatches(store, cpu_views, seed=0), batches, rounds=1)
        on_cpu = device_side_core_ms(store, device_views, batches[0][:32], "cpu")
        results[name] = (device, cpu)
        print(
            f"{name:<16} {batch_size:>5} {device_views.n_views:>5} {device:>12.3f} {cpu:>9.2f} "
            f"{device / cpu:>7.4f} {on_cpu:>20.1f}"
        )
    if torch.cuda.is_available():
        gpu_measurements(store_path, store)
    device, cpu = results["dino_vits16"]
    ratio = device / cpu
    print(f"dino_vits16: {device:.3f} core-ms/tile vs {cpu:.2f} on the CPU path: ratio {ratio:.4f}")


# -- GPU: decode + views throughput, training images/s and MFU ---------------------------------
def build_model(config: dict) -> torch.nn.Module:
    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**config.get("init_args", {}))


def _step_timer(warmup: int):
    """A callback timing the steps after ``warmup``: the device is synchronised once where the
    timing starts and once at the last step's end, never in between (a sync per step would stop
    the host from preparing the next batch while the GPU trains, which is what is measured)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                _sync()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= trainer.max_steps:
                _sync()
                self.end = time.perf_counter()
                self.steps = trainer.global_step - warmup

        def seconds_per_step(self) -> float:
            return (self.end - self.start) / self.steps

    return StepTimer()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_rate(
    name: str,
    store_path: Path,
    resident: bool,
    steps: int = 25,
    warmup: int = 5,
    device: str = "cuda",
    config: dict | None = None,
) -> tuple[float, float]:
    """(images/s, seconds per step) of the ``steps - warmup`` last of ``steps`` bf16 steps of
    recipe ``name`` (or ``config``) on one GPU (``device="cpu"``: a dry run of this code)."""
    import lightning as L
    from torch.utils.data import DataLoader

    config = config or recipe(name)
    model = build_model(config["model"])
    data_config = config["data"]
    dm = PatchDataModule(
        stores=[str(store_path)], views=instantiate_views(data_config["views"], where=name),
        batch_size=int(data_config["batch_size"]), num_workers=min(4, os.cpu_count() or 1),
        drop_last=False,
    )  # fmt: skip
    timer = _step_timer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], log_every_n_steps=1000,
    )  # fmt: skip
    if resident:  # one batch made once, already on the GPU: the input costs nothing
        dm.setup("fit")
        dm.views.resolve_device_augment(device)  # as the trainer would
        host = next(iter(dm.train_dataloader()))
        moved = {k: host[k].to(device) for k in ("index", "view_params") if k in host}
        batch = dm.on_after_batch_transfer({**host, **moved}, 0)
        batch = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else [x.to(device) for x in v])
            for k, v in batch.items()
        }
        trainer.fit(model, DataLoader([batch] * steps, batch_size=None))
    else:
        trainer.fit(model, datamodule=dm)
    seconds = timer.seconds_per_step()
    return int(data_config["batch_size"]) / seconds, seconds


def step_flops(name: str, device: str = "cuda", config: dict | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) of recipe ``name``."""
    from torch.utils.flop_counter import FlopCounterMode

    config = config or recipe(name)
    model = build_model(config["model"]).to(device)
    views = instantiate_views(config["data"]["views"], where=name)
    batch = int(config["data"]["batch_size"])
    tiles = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    crops = views.device_views(tiles)  # parameters drawn on the host: not timed here
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16):
        model.compute_loss(crops).backward()
    return float(counter.get_total_flops())


def gpu_measurements(store_path: Path, store: PatchStore) -> dict:
    """The GPU figures (printed as they come): ``{"gpu", "peak_tflops", "decode_views":
    {recipe: tiles/s}, "train": {recipe: {fed_img_s, resident_img_s, mfu_fed, mfu_resident,
    fed_over_resident}}}``."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    out: dict = {"gpu": name, "peak_tflops": peak, "decode_views": {}, "train": {}}
    print(f"\nGPU: {name} (dense bf16 peak {peak} TFLOP/s)")
    for recipe_name in DECODE_RECIPES:
        views = instantiate_views(recipe(recipe_name)["data"]["views"], where=recipe_name)
        views.resolve_device_augment("cuda")
        if not views.device_augment:
            print(f"  {recipe_name:<16} views not on the device path: no decode + views rate")
            continue
        batch = np.arange(min(len(store), int(recipe(recipe_name)["data"]["batch_size"])))
        ms = device_side_core_ms(store, views, batch, "cuda")
        out["decode_views"][recipe_name] = 1000 / ms
        print(f"  {recipe_name:<16} nvJPEG decode + device views: {1000 / ms:10.0f} tiles/s")
    for recipe_name in GPU_RECIPES:
        fed, seconds = train_rate(recipe_name, store_path, resident=False)
        resident, resident_seconds = train_rate(recipe_name, store_path, resident=True)
        flops = step_flops(recipe_name)
        mfu_fed, mfu_resident = (
            flops / s / (peak * 1e12) if peak else float("nan") for s in (seconds, resident_seconds)
        )
        out["train"][recipe_name] = {
            "fed_img_s": fed, "resident_img_s": resident, "mfu_fed": mfu_fed,
            "mfu_resident": mfu_resident, "fed_over_resident": fed / resident,
        }  # fmt: skip
        print(
            f"  {recipe_name:<16} fed by <=4 workers {fed:7.0f} img/s (MFU {mfu_fed:.2f}) vs "
            f"resident batch {resident:7.0f} img/s (MFU {mfu_resident:.2f}): "
            f"ratio {fed / resident:.3f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256, help="tiles imported (CPU part)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        n = args.tiles if not torch.cuda.is_available() else max(args.tiles, GPU_TILES)
        store_path = make_store(Path(tmp), n)
        if not args.gpu_only:
            cpu_measurements(store_path)
        elif torch.cuda.is_available():
            gpu_measurements(store_path, PatchStore(store_path))
        else:
            raise SystemExit("bench_input --gpu-only: no CUDA device")


if __name__ == "__main__":
    main()
