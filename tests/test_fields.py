"""µm-continuous views: field of view drawn in µm, cut from the finest µm/px that covers it.

The slide here is synthetic on purpose: its red and green channels are linear functions of the
physical position (µm), so a view's true field of view and position can be measured from its
pixels alone (a plane fit), independently of the code under test. Each ramp is tilted a little
along the other axis, so that its rounding to 8 bits falls at a different place in every row
and averages out in the fit (a plain staircase would limit the measurement to ~1 grey level).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from scipy import stats

from scratchpath.data import FieldsOfView, FieldViewBatches, PatchDataModule
from scratchpath.data.fields import MagnificationIndex, crop_fields
from scratchpath.data.sampling import BatchRequest, sample_seed
from scratchpath.errors import ScratchpathError
from scratchpath.ingest import ingest
from scratchpath.store import PatchStore
from scratchpath.views import MultiCrop

MPP0, SIDE = 0.25, 2048  # level 0: 2048 px at 0.25 µm/px = 512 µm
LEVEL_MPPS = (0.25, 0.5, 1.0, 2.0)
TILE = 128  # stored tiles are 32, 64, 128 and 256 µm wide
SLOPE, TILT = 0.33, 0.5  # red = SLOPE * (x + TILT * y) in grey levels (µm), green likewise


def _ramp_level(mpp: float) -> np.ndarray:
    n = round(SIDE * MPP0 / mpp)
    centre_um = (np.arange(n) + 0.5) * mpp  # level pixel centres in µm
    x, y = centre_um[None, :], centre_um[:, None]
    rgb = np.empty((n, n, 3), np.uint8)
    rgb[..., 0] = np.rint(SLOPE * (x + TILT * y))
    rgb[..., 1] = np.rint(SLOPE * (y + TILT * x))
    rgb[..., 2] = 128
    return rgb


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    root = tmp_path_factory.mktemp("fields")
    path = root / "ramp.tif"
    with tifffile.TiffWriter(path) as tif:
        for k, mpp in enumerate(LEVEL_MPPS):
            tif.write(_ramp_level(mpp), tile=(256, 256), compression="zlib",
                      subfiletype=1 if k else 0, resolution=(1e4 / mpp, 1e4 / mpp),
                      resolutionunit="CENTIMETER")  # fmt: skip
    report = ingest([path], root / "store", mpp=LEVEL_MPPS, tile_size=TILE, min_tissue=0.0,
                    codec="zstd", progress=False)  # fmt: skip
    assert report.ok, report.failed
    return PatchStore(root / "store")


FIELDS = {"global_microns": (64.0, 224.0), "local_microns": (16.0, 64.0), "n_global": 2,
          "n_local": 4, "global_size": 64, "local_size": 32}  # fmt: skip


def _measure(view: np.ndarray) -> tuple[float, float, float, float]:
    """(µm/px along x, along y, x and y in µm of the view's top-left corner) from its pixels."""
    size = view.shape[-1]
    rows, cols = np.mgrid[0:size, 0:size] + 0.5  # output pixel centres
    design = np.stack([cols.ravel(), rows.ravel(), np.ones(size * size)], axis=1)
    # red / SLOPE = x + TILT * y with x = x0 + m_x * col, y = y0 + m_y * row; green likewise.
    (ar, br, cr), (ag, bg, cg) = (
        np.linalg.lstsq(design, view[c].ravel() / SLOPE, rcond=None)[0] for c in (0, 1)
    )
    mpp_x = (ar - TILT * ag) / (1 - TILT**2)
    mpp_y = (bg - TILT * br) / (1 - TILT**2)
    x0 = (cr - TILT * cg) / (1 - TILT**2)
    y0 = (cg - TILT * cr) / (1 - TILT**2)
    return mpp_x, mpp_y, x0, y0


def test_views_cover_the_requested_microns_within_one_pixel_at_every_magnification(
    store: PatchStore,
) -> None:
    fields = FieldsOfView(**FIELDS)
    dataset = FieldViewBatches(store, fields, seed=5)
    index = MagnificationIndex(store)
    anchors = np.flatnonzero(np.isclose(store.tiles["mpp"], 0.25))[::3]
    request = BatchRequest(0, anchors)
    plan = dataset.plan(request)
    batch = dataset[request]
    used, errors = set(), []
    for v, size in enumerate(fields.sizes):
        views = batch["views"][v].numpy().astype(np.float64)  # (B, 3, s, s)
        for i, anchor in enumerate(anchors):
            rng = np.random.default_rng(sample_seed(5, 0, int(anchor), 2))
            rng.random(2)  # the location
            requested = fields.draw(rng, 1)[v, 0]  # what the view was asked to cover (µm)
            source = plan.source[v, i]
            stored_mpp = index.tile_mpp[source]
            # The finest stored µm/px whose 128 px tile is at least as wide as the view.
            assert stored_mpp == min(m for m in LEVEL_MPPS if TILE * m >= requested)
            used.add(stored_mpp)
            mpp_x, mpp_y, left, top = _measure(views[i])
            view_mpp = float(batch["view_mpp"][v, i])
            assert view_mpp == pytest.approx(requested / size, rel=1e-5)
            pixel = view_mpp  # one pixel of the view
            for measured in (mpp_x, mpp_y):  # the measured field of view
                errors.append(abs(measured * size - requested) / pixel)
            # Same tissue location in every view: the sample's location lies inside each.
            location = plan.location[i]
            assert left - pixel <= location[0] <= left + requested + pixel
            assert top - pixel <= location[1] <= top + requested + pixel
    print(f"largest field-of-view error: {max(errors):.2f} view px")
    assert max(errors) <= 1.0
    assert used == set(LEVEL_MPPS)  # every stored magnification was exercised


def test_device_crops_equal_worker_crops_and_plans_are_deterministic(store: PatchStore) -> None:
    anchors = np.arange(0, len(store), 17)
    worker = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=1)[BatchRequest(3, anchors)]
    device = FieldViewBatches(store, FieldsOfView(**FIELDS, on_device=True), seed=1)
    shipped = device[BatchRequest(3, anchors)]
    assert "views" not in shipped
    assert len(shipped["field_tiles"]) <= len(anchors) * 4  # distinct source tiles only
    views = crop_fields(shipped["field_tiles"], shipped["field_source"], shipped["field_boxes"],
                        device.fields.sizes)  # fmt: skip
    for a, b in zip(worker["views"], views, strict=True):
        assert a.dtype == b.dtype == torch.uint8
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    again = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=1)[BatchRequest(3, anchors)]
    other = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=1)[BatchRequest(4, anchors)]
    np.testing.assert_array_equal(worker["view_mpp"], again["view_mpp"])
    assert not np.array_equal(worker["view_mpp"], other["view_mpp"])


@pytest.mark.parametrize("law", ["log-uniform", "uniform"])
def test_drawn_fields_of_view_follow_the_configured_law(store: PatchStore, law: str) -> None:
    fields = FieldsOfView(**FIELDS, law=law)
    dataset = FieldViewBatches(store, fields, seed=0)
    # Every tile as an anchor in 8 epochs: independent draws (seeded by seed, epoch, tile).
    plans = [dataset.plan(BatchRequest(epoch, np.arange(len(store)))) for epoch in range(8)]
    for rows, (low, high) in ((slice(0, 2), (64.0, 224.0)), (slice(2, 6), (16.0, 64.0))):
        fov = np.concatenate([plan.fov[rows].ravel() for plan in plans])
        assert fov.min() >= low and fov.max() <= high
        log_uniform = stats.kstest(np.log(fov), "uniform", args=(np.log(low), np.log(high / low)))
        uniform = stats.kstest(fov, "uniform", args=(low, high - low))
        right, wrong = (log_uniform, uniform) if law == "log-uniform" else (uniform, log_uniform)
        assert right.pvalue > 0.01  # consistent with the configured law
        assert wrong.pvalue < 1e-6  # and the test tells the two laws apart


def test_data_module_trains_on_field_views_and_records_their_mpp(store: PatchStore) -> None:
    views = MultiCrop(global_size=64, local_size=32, n_global_crops=2, n_local_crops=4)
    dm = PatchDataModule(stores=[store.paths[0]], views=views, batch_size=8, num_workers=0,
                         pin_memory=False, fields=FieldsOfView(**FIELDS, on_device=True),
                         mpp_weights={0.25: 1.0})  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert np.allclose(store.tiles["mpp"][batch["index"].numpy()], 0.25)  # anchors: 0.25 µm/px
    out = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    assert [tuple(v.shape) for v in out["views"]] == [(8, 3, 64, 64)] * 2 + [(8, 3, 32, 32)] * 4
    assert all(v.dtype == torch.float32 for v in out["views"])  # normalised by the generator
    assert tuple(out["view_mpp"].shape) == (6, 8)
    assert (out["view_mpp"][:2] >= 1.0).all() and (out["view_mpp"][2:] <= 2.0).all()
    with pytest.raises(ScratchpathError, match=r"^data\.fields: 6 views"):
        PatchDataModule(stores=[store.paths[0]], views=MultiCrop(n_local_crops=2),
                        fields=FieldsOfView(**FIELDS))  # fmt: skip


def test_progressive_resizing_with_fields_is_a_clear_error(store: PatchStore) -> None:
    views = MultiCrop(global_size=64, n_local_crops=4, low_res_size=32, low_res_epochs=2)
    with pytest.raises(ScratchpathError, match=r"^data\.fields: progressive resizing"):
        PatchDataModule(stores=[store.paths[0]], views=views, fields=FieldsOfView(**FIELDS))


def test_dino_trains_two_steps_on_field_views(store: PatchStore, tmp_path) -> None:
    import lightning as L

    from scratchpath.objectives.dino import DINO

    torch.manual_seed(0)
    small = {"global_size": 32, "local_size": 16}
    views = MultiCrop(global_size=32, local_size=16, n_global_crops=2, n_local_crops=4,
                      device_augment=True)  # fmt: skip
    dm = PatchDataModule(stores=[store.paths[0]], views=views, batch_size=4, num_workers=0,
                         pin_memory=False, fields=FieldsOfView(**{**FIELDS, **small}))  # fmt: skip
    module = DINO(backbone="vit_tiny_patch16_224", out_dim=64, hidden_dim=32, bottleneck_dim=16,
                  backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 1,
                                   "dynamic_img_size": True})  # fmt: skip
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.backbone.parameters())


# -- the magnification index at archive scale: built once, cached, mapped ---------------------
def test_tile_at_finds_the_one_tile_holding_each_point(store: PatchStore) -> None:
    index = MagnificationIndex(store)
    rng = np.random.default_rng(3)
    points = rng.random((400, 2)) * SIDE * MPP0  # µm on the (only) slide
    slide = np.zeros(len(points), np.int64)
    origin = index.origin(np.arange(len(store)))
    extent = index.extent(np.arange(len(store)))
    for k, mpp in enumerate(index.mpps):
        found = index.tile_at(slide, k, points)
        at_k = np.isclose(store.tiles["mpp"], mpp, rtol=0.01)
        inside = ((points[:, None] >= origin[None]) & (points[:, None] <= origin[None]
                  + extent[None, :, None])).all(axis=2) & at_k[None]  # fmt: skip
        expected = np.where(inside.any(axis=1), inside.argmax(axis=1), -1)
        np.testing.assert_array_equal(found, expected)
    assert (index.tile_at(slide, 0, points) >= 0).mean() > 0.9  # most points lie in a tile


def test_the_index_is_built_once_cached_and_mapped_by_workers(
    store: PatchStore, tmp_path, monkeypatch
) -> None:
    import pickle

    from scratchpath.data.fields import index as index_module
    from scratchpath.store import table as tbl

    in_memory = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=2)
    monkeypatch.setattr(tbl, "IN_MEMORY_TILES", 0)  # index this small store as a large one
    monkeypatch.setenv("SCRATCHPATH_CACHE", str(tmp_path / "cache"))
    built = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=2)
    folder = built.index.folder
    assert folder is not None and folder.parent == tmp_path / "cache"
    assert isinstance(built.index._keys, np.memmap) and isinstance(built.index._order, np.memmap)
    request = BatchRequest(1, np.arange(0, len(store), 5))
    for a, b in ((in_memory.plan(request), built.plan(request)),):
        np.testing.assert_array_equal(a.source, b.source)
        np.testing.assert_array_equal(a.boxes, b.boxes)

    def no_rebuild(self, folder):
        raise AssertionError("the index was built again")

    def no_lookup(*args, **kwargs):
        raise AssertionError("a worker looked the index up instead of mapping its folder")

    monkeypatch.setattr(index_module.MagnificationIndex, "_write", no_rebuild)
    other_rank = FieldViewBatches(store, FieldsOfView(**FIELDS), seed=2)  # finds the entry
    with monkeypatch.context() as patch:
        patch.setattr(index_module.cache, "cached_or_none", no_lookup)
        worker = pickle.loads(pickle.dumps(built))  # what a spawned DataLoader worker receives
    for again in (worker, other_rank):
        assert again.index.folder == folder and isinstance(again.index._keys, np.memmap)
        np.testing.assert_array_equal(again.plan(request).source, built.plan(request).source)
