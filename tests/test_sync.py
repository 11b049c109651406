"""No host synchronisation and no host data made into tensors inside a training step.

A ``TorchDispatchMode`` sees every ATen op, and a ``TorchFunctionMode`` every ``torch.*`` call.
While whole steps of ``scratchpath fit`` run on the CPU, exactly as the CLI builds the run (the
smoke recipes' objective, data module, callbacks — ``Throughput``, ``ProgressLog``,
``PreemptionCheckpoint``, the default ``ModelCheckpoint``, the recipe's ``OnlineEvaluation`` —
and the CSV + TensorBoard loggers), they count, per step, the ops that would stall or copy on a
GPU. On the CPU a sync is free and a "copy" is none, but the op is the same one that a GPU run
would execute, so a count of 0 here means 0 there:

- **syncs**: ``_local_scalar_dense`` (behind ``.item()`` / ``float(t)`` / ``if t:``),
  ``nonzero``, boolean masks, ops whose output shape depends on the data;
- **tensors made from host data**: ``aten.lift_fresh`` (``torch.tensor`` / ``as_tensor`` /
  ``from_numpy`` of Python numbers or arrays, including Lightning's ``self.log`` of a Python
  number), and ``torch.arange`` / ``zeros`` / ``full`` / ... called without a ``device`` (a host
  tensor, made to be moved to the device): each is a pageable host-to-device copy on a GPU
  (which blocks the host). Host data may reach the device only through
  :func:`scratchpath.distributed.to_device` (written into pinned memory, copied non-blocking);
- **pageable copies**: ``_to_copy`` / ``copy_`` from unpinned host memory to another device
  (seen on a GPU only; counted so that the same test says it there).

What it does not see: a host tensor made *before* the step (at setup) and moved to the device in
every step (on the CPU that move is a no-op that reaches no op); the code caches such
constants per device instead. Fills with a Python scalar (``aten.scalar_tensor``, ``full`` with
a ``device``) are kernels with the number as an argument, not copies, and are not counted.

Exemptions, each checked by name:

- AdamW's per-parameter ``step`` counters are host tensors (not ``capturable``): reading them
  is no device sync.
- A *logging step* (every ``log_every_n_steps``) differs by Lightning's own logging only:
  ``LoggerConnector`` turns each logged value into a Python number (``.item()``: the host waits
  for the device once, then each read is immediate), and each Python number logged on that step
  (lr, weight decay, momentum, throughput) becomes a device tensor in ``LightningModule.log``.
  Nothing else may sync or make a tensor there.
- Not counted: the steps up to the first logging step (the optimiser state and Lightning's
  metrics are made on their first use) and the last one (the end of training, the online
  evaluation).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from objective_helpers import one_thread, one_torch_thread  # noqa: F401
from scratchpath.cli.fit import ScratchpathCLI, expand_method_alias
from scratchpath.data.module import EncodedTiles, PatchDataModule
from scratchpath.distributed import to_device
from scratchpath.ingest import ingest
from scratchpath.store import import_tiles
from scratchpath.views import MAEView, MultiCrop, TwoViews
from sync_helpers import StepCounter, SyncCounter

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _tiles(tiles_dir: Path, n: int = 4) -> torch.Tensor:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::500][:n]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def test_the_counter_sees_the_syncs_and_host_data_it_is_meant_to_catch():
    x = torch.arange(6.0, device="cpu")
    with SyncCounter() as counter:
        x.sum().item()
        (x > 2).nonzero()
        x[x > 2]
        torch.tensor(0.5, device=x.device)  # what self.log(name, 0.5) does
        torch.from_numpy(np.zeros(3)).to(x.device, non_blocking=True)
        torch.arange(4).to(x.device)
        to_device(np.zeros(3), torch.float32, x.device)  # pinned, non-blocking: allowed
        x.new_zeros(3) + torch.full((), 2.0, device=x.device)  # made on the device: allowed
    assert counter.syncs["aten._local_scalar_dense.default"] == 1
    assert sum(counter.syncs.values()) >= 3
    assert dict(counter.host_data) == {"aten.lift_fresh.default": 2, "torch.arange": 1}


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


# --- whole steps of `scratchpath fit` ----------------------------------------------------------
STEPS, LOG_EVERY = 9, 3
SMOKE = ["smoke_simclr", "smoke_mocov3", "smoke_dino", "smoke_dinov2", "smoke_mae"]
FIELDS_RECIPE = """
data:
  stores: [runs/multi_store]
  mpp_weights: {0.5: 1.0}
  fields:
    class_path: scratchpath.data.fields.FieldsOfView
    init_args: {global_microns: [48.0, 96.0], local_microns: [16.0, 32.0], n_global: 2,
                n_local: 4, global_size: 48, local_size: 24, on_device: true}
  views:
    class_path: scratchpath.views.MultiCrop
    init_args: {device_augment: true, global_size: 48, local_size: 24, n_global_crops: 2,
                n_local_crops: 4}
"""


@pytest.fixture(scope="module")
def workdir(tiles_dir: Path, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository root for the smoke recipes (runs/<store>), plus a
    store cut at three µm/px from a real slide for the µm-fields path."""
    root = tmp_path_factory.mktemp("fit")
    runs = root / "runs"
    import_tiles(tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled",
                 runs / "smoke_store", tile_size=64)  # fmt: skip
    lung = tiles_dir / "lc25000_lung_224"
    with open(lung / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    subset = [r for c in ("lung_aca", "lung_n", "lung_scc") for r in rows if r["label"] == c]
    subset = [r for i, r in enumerate(subset) if i % 500 < 12]  # 12 tiles per class
    with open(root / "labels.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    import_tiles(lung, runs / "lc25000_store", labels_csv=root / "labels.csv",
                 group_column="lc25000clean_group_id", tile_size=64)  # fmt: skip
    report = ingest([slides_dir / "CMU-1-Small-Region_derived_pyramid.ome.tif"],
                    runs / "multi_store", mpp=(0.5, 1.0, 2.0), tile_size=64, codec="zstd",
                    progress=False)  # fmt: skip
    assert report.ok
    (root / "fields.yaml").write_text(FIELDS_RECIPE)
    return root


def _fit_and_count(workdir: Path, argv: list[str]) -> list[tuple[int, bool, SyncCounter]]:
    """``scratchpath fit ARGV`` built by the CLI, a counter first among its callbacks."""
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.chdir(workdir)
        cli = ScratchpathCLI(args=expand_method_alias(argv), progress_stream=io.StringIO())
        counter = StepCounter()
        cli.trainer.callbacks.insert(0, counter)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == STEPS
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"Throughput", "ProgressLog", "PreemptionCheckpoint", "ModelCheckpoint"} <= names
    assert len(cli.trainer.loggers) == 2  # CSV + TensorBoard
    return counter.steps


def _lightning_logging(counter: SyncCounter) -> bool:
    """Whether every count of this step comes from Lightning writing the logs: its reading of
    the logged values, and ``self.log`` turning a Python number into a tensor."""
    return all(
        "convert_tensors_to_scalars" in origin or "__to_tensor" in origin
        for origin in counter.origins
    )


RUNS = {name: ["--config", str(RECIPES / f"{name}.yaml")] for name in SMOKE}
RUNS["smoke_dino+microns"] = [*RUNS["smoke_dino"], "--config", "fields.yaml"]
RUNS["smoke_mae+device_views"] = [*RUNS["smoke_mae"], "--data.views.device_augment", "true"]


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_fit_steps_neither_sync_nor_copy_host_data(run: str, workdir: Path) -> None:
    argv = [
        *RUNS[run], "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps",
        str(LOG_EVERY), "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1.0",
        "--data.batch_size", "8", "--data.num_workers", "1", "--model.nonfinite_check_every", "2",
        "--trainer.default_root_dir", f"runs/{run}",
    ]  # fmt: skip
    steps = _fit_and_count(workdir, argv)
    assert [step for step, _, _ in steps] == list(range(STEPS))
    first_logging = min(step for step, logging, _ in steps if logging)
    steady = steps[first_logging + 1 : -1]  # warm-up and the end are not counted (module doc)
    plain = {step: c.counts() for step, logging, c in steady if not logging}
    logging = {step: c for step, logging, c in steady if logging}
    assert len(plain) >= 4 and len(logging) >= 1
    assert plain == {step: {} for step in plain}, plain
    for step, counter in logging.items():
        assert _lightning_logging(counter), (step, counter.counts(), counter.origins)
