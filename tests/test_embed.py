"""embed: real slides (SVS, OME/pyramidal TIFF, DICOM, NDPI, J2K SVS) -> one HDF5 file per slide
holding ingest's tiles embedded exactly as load_backbone embeds them; resume, failures, stores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from embed_helpers import MEAN, STD, make_export
from scratchpath.embed import embed, read_manifest, read_slide
from scratchpath.embed.tiles import area_resize
from scratchpath.errors import ScratchpathError
from scratchpath.export import load_backbone
from scratchpath.finetune import extract_features
from scratchpath.ingest import ingest
from scratchpath.store import PatchStore

# H&E slides read four ways: CMU SVS (RGB-coded JPEG tiles, level 0.499 µm/px resampled to 1.0,
# a non-integer 257 -> 128 area reduction), the OME pyramid (its 0.998 µm/px level cut as is),
# the J2K SVS (no µm/px: 0.5 assumed; not JPEG: CPU reads) and the real DICOM (pydicom frames,
# 0.5 assumed, 256 -> 128).
HE = [
    "CMU-1-Small-Region.svs",
    "CMU-1-Small-Region_derived_pyramid.ome.tif",
    "TCGA-CR-7395-01A-01-TS1.svs",
    "formats/TCGA-XK-AAJU-01A-01-TS1_small.dcm",
]
NDPI = "formats/hamamatsu_fluorescence_DAPI.ndpi"  # fluorescence: every tile (min_tissue 0)
RUN = {"mpp": 1.0, "tile_size": 128, "min_tissue": 0.5, "assume_mpp": 0.5}
INPUT = 64  # the export's input size: tiles are resized 128 -> 64 before the forward pass


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"), mpp=1.0, tile_size=128, input_size=INPUT)


@pytest.fixture(scope="module")
def reference(slides_dir: Path, tmp_path_factory) -> PatchStore:
    """What ingest stores at the same settings (lossless codec: its tiles exactly)."""
    out = tmp_path_factory.mktemp("ingest") / "store"
    slides = [slides_dir / name for name in HE]
    assert ingest(slides, out, codec="zstd", progress=False, **RUN).ok
    assert ingest(
        [slides_dir / NDPI], out, codec="zstd", progress=False, **{**RUN, "min_tissue": 0.0}
    ).ok
    return PatchStore(out)


def _embed(slides_dir: Path, out: Path, export: Path, names=HE, **kwargs):
    settings = {**RUN, "workers": 2, "progress": False, "log": lambda line: None, **kwargs}
    return embed([slides_dir / n for n in names], export, out, **settings)


@pytest.fixture(scope="module")
def embedded(slides_dir: Path, export: Path, tmp_path_factory) -> dict[str, Path]:
    """The H&E slides embedded with stored JPEG tiles decoded by torchvision ("device" path, on
    the CPU here) and with the CPU reads, the NDPI (stripes: CPU reads) beside them."""
    runs = {}
    for decode in ("device", "cpu"):
        runs[decode] = out = tmp_path_factory.mktemp(decode)
        report = _embed(slides_dir, out, export, decode=decode)
        assert report.ok, report.failed
        runs[f"ndpi-{decode}"] = out = tmp_path_factory.mktemp(f"ndpi-{decode}")
        ndpi = _embed(slides_dir, out, export, [NDPI], decode=decode, min_tissue=0.0)
        assert ndpi.ok, ndpi.failed
    return runs


def _reference_features(store: PatchStore, export: Path, slide_id: str):
    index = [s["slide_id"] for s in store.slides].index(slide_id)
    rows = np.flatnonzero(store.tiles["slide_index"] == index)
    model = load_backbone(export)
    features = extract_features(model, store, mean=MEAN, std=STD, indices=rows, input_size=INPUT)
    xy = np.stack([store.tiles["x"][rows], store.tiles["y"][rows]], axis=1)
    return xy, features


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["device", "cpu"])
@pytest.mark.parametrize("name", [*HE, NDPI], ids=["svs", "ome", "j2k", "dicom", "ndpi"])
def test_embeddings_are_load_backbone_on_the_tiles_ingest_cuts(
    embedded, reference, export, name: str, decode: str
) -> None:
    slide_id = Path(name).name.split(".")[0]
    xy, expected = _reference_features(reference, export, slide_id)
    got = read_slide(embedded[decode if name != NDPI else f"ndpi-{decode}"] / f"{slide_id}.h5")
    np.testing.assert_array_equal(got.coords, xy)  # same tissue mask, level, grid
    # Area resampling on the device is float; ingest rounds its tiles to uint8 (<= 0.5 grey).
    resampled = decode == "device" and not got.coords_attrs["native_level"]
    torch.testing.assert_close(
        torch.from_numpy(np.array(got.features)), expected, atol=5e-3 if resampled else 1e-5, rtol=0
    )


@pytest.mark.slow
def test_the_device_path_decodes_jpeg_levels_and_reads_the_others_on_the_cpu(embedded) -> None:
    manifest = read_manifest(embedded["device"])
    assert manifest["n_slides"] == len(HE) and manifest["n_failed"] == 0
    read = {}
    for name in [*HE, NDPI]:
        slide_id = Path(name).name.split(".")[0]
        folder = embedded["ndpi-device" if name == NDPI else "device"]
        read[slide_id] = read_slide(folder / f"{slide_id}.h5").provenance["source"]["read"]
    on_device = "stored JPEG decoded on the device"
    assert read["CMU-1-Small-Region"] == on_device + ", resampled there"  # 0.499 -> 1 µm/px
    assert read["CMU-1-Small-Region_derived_pyramid"] == on_device  # its 0.998 µm/px level
    assert read["TCGA-XK-AAJU-01A-01-TS1_small"] == on_device + ", resampled there"
    assert read["TCGA-CR-7395-01A-01-TS1"].startswith("CPU reads")  # JPEG 2000
    assert read["hamamatsu_fluorescence_DAPI"].startswith("CPU reads")  # NDPI stripes


def test_device_area_resampling_matches_opencv_inter_area() -> None:
    import cv2

    image = np.random.default_rng(0).integers(0, 256, (257, 257, 3), dtype=np.uint8)
    expected = cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    got = area_resize(torch.from_numpy(image).permute(2, 0, 1)[None], 128)[0].permute(1, 2, 0)
    assert np.abs(got.numpy() - expected).max() <= 0.5 + 1e-3  # cv2 rounds to uint8


@pytest.mark.slow
def test_files_carry_the_trident_and_clam_layout(embedded) -> None:
    path = embedded["cpu"] / "CMU-1-Small-Region.h5"
    with h5py.File(path) as f:
        n = f["features"].shape[0]
        assert f["coords"].shape == (n, 2) and f["coords"].dtype == np.int64
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_size"] == 128 and attrs["patch_size_level0"] == 257
        assert attrs["level0_magnification"] == pytest.approx(20.04, abs=0.01)
        assert attrs["target_magnification"] == 10.0 and attrs["name"] == "CMU-1-Small-Region"
        assert f["features"].attrs["encoder"] == "resnet10t"
        assert f["thumbnail"].ndim == 3 and f["tissue_fraction"].shape == (n,)
    assert (embedded["cpu"] / "thumbnails" / "CMU-1-Small-Region.png").is_file()
    got = read_slide(path)
    assert isinstance(got.features, np.memmap)  # bags of 10^4 slides need not fit in memory
    encoder = got.provenance["encoder"]
    assert encoder["input_size"] == INPUT and encoder["mean"] == list(MEAN)
    assert encoder["precision"] == "fp32" and len(encoder["export_sha256"]) == 64


@pytest.mark.slow
def test_bf16_and_fp16_storage_stay_within_their_tolerance(slides_dir, export, embedded, tmp_path):
    report = _embed(
        slides_dir, tmp_path, export, HE[:1], precision="bf16", features_dtype="float16"
    )
    assert report.ok
    got = read_slide(tmp_path / "CMU-1-Small-Region.h5")
    assert got.features.dtype == np.float16
    fp32 = np.asarray(read_slide(embedded["cpu"] / "CMU-1-Small-Region.h5").features)
    error = np.abs(np.asarray(got.features, np.float32) - fp32).max() / np.abs(fp32).max()
    assert 0 < error < 0.05  # bf16 keeps ~3 significant digits through a few layers


@pytest.mark.slow
def test_rerun_skips_finished_slides_and_refuses_another_encoder(
    slides_dir, export, embedded, tmp_path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(embedded["cpu"], out)
    report = _embed(slides_dir, out, export, decode="cpu")
    assert [s["status"] for s in report.slides] == ["skipped"] * len(HE)
    other = make_export(tmp_path / "other", mpp=1.0, tile_size=128, input_size=INPUT, seed=1)
    with pytest.raises(ScratchpathError, match=r"another encoder.*export_sha256"):
        _embed(slides_dir, out, other, HE[:1])
    report = _embed(slides_dir, out, other, HE[:1], overwrite=True)
    assert report.slides[0]["status"] == "ok"
    assert (
        read_slide(out / "CMU-1-Small-Region.h5").provenance["encoder"]["export_sha256"]
        != (
            read_slide(embedded["cpu"] / "CMU-1-Small-Region.h5").provenance["encoder"][
                "export_sha256"
            ]
        )
    )


@pytest.mark.slow
def test_bad_slides_fail_one_line_each_and_the_others_are_embedded(slides_dir, export, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.svs").write_bytes(b"")
    (bad / "truncated.svs").write_bytes((slides_dir / HE[0]).read_bytes()[:50_000])
    shutil.copy(slides_dir / HE[1], bad / "good.ome.tif")
    lines: list[str] = []
    report = embed([bad], export, tmp_path / "out", **RUN, progress=False, log=lines.append)
    assert [s["status"] for s in report.slides] == ["failed", "ok", "failed"]
    failed = [line for line in lines if line.startswith("failed: ")]
    assert len(failed) == 2 and all("\n" not in line for line in failed)
    assert "empty.svs: empty file" in failed[0] and "truncated.svs" in failed[1]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["n_slides"] == 1 and manifest["n_failed"] == 2


def _same_file(out: Path, reference: Path, slide_id: str) -> None:
    got, expected = read_slide(out / f"{slide_id}.h5"), read_slide(reference / f"{slide_id}.h5")
    np.testing.assert_array_equal(got.features, expected.features)
    np.testing.assert_array_equal(got.coords, expected.coords)


@pytest.mark.slow
def test_killed_run_leaves_no_partial_file_and_resumes(slides_dir, export, embedded, tmp_path):
    out = tmp_path / "out"
    slides = [str(slides_dir / n) for n in HE[:3]]
    command = [
        sys.executable,
        "-m",
        "scratchpath",
        "embed",
        *slides,
        "--model",
        str(export),
        "--out",
        str(out),
        "--mpp",
        "1.0",
        "--tile-size",
        "128",
        "--assume-mpp",
        "0.5",
        "--decode",
        "cpu",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.h5")):  # killed right after the first slide's file appeared
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finished = sorted(out.glob("*.h5"))
    assert 1 <= len(finished) < 3
    for path in finished:  # every file there is whole
        assert read_slide(path).features.shape[0] > 0
    report = _embed(slides_dir, out, export, HE[:3], decode="cpu")
    assert report.ok and sum(s["status"] == "skipped" for s in report.slides) == len(finished)
    assert not list(out.glob(".*.tmp"))
    for name in HE[:3]:
        slide_id = Path(name).name.split(".")[0]
        _same_file(out, embedded["cpu"], slide_id)


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["device", "cpu"])
def test_a_store_is_embedded_per_slide_like_its_tiles(slides_dir, export, tmp_path, decode) -> None:
    store_dir = tmp_path / "store"
    assert ingest([slides_dir / HE[1]], store_dir, progress=False, **RUN).ok  # JPEG codec
    store = PatchStore(store_dir)
    report = embed(
        [store_dir], export, tmp_path / decode, decode=decode, progress=False, log=lambda line: None
    )
    assert report.ok
    got = read_slide(tmp_path / decode / "CMU-1-Small-Region_derived_pyramid.h5")
    expected = extract_features(load_backbone(export), store, mean=MEAN, std=STD, input_size=INPUT)
    np.testing.assert_array_equal(got.coords, np.stack([store.tiles["x"], store.tiles["y"]], 1))
    torch.testing.assert_close(
        torch.from_numpy(np.array(got.features)), expected, atol=1e-5, rtol=0
    )
    assert got.coords_attrs["mpp"] == pytest.approx(0.998, abs=1e-3)


@pytest.mark.slow
def test_two_ranks_split_the_slides_and_write_what_one_process_writes(
    slides_dir, export, embedded, tmp_path
) -> None:
    """torchrun, 2 CPU processes (gloo): each slide embedded once, by one rank; same files."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "scratchpath",
        "embed",
        *(str(slides_dir / n) for n in HE[:2]),
        "--model",
        str(export),
        "--out",
        str(out),
        "--mpp",
        "1.0",
        "--tile-size",
        "128",
        "--assume-mpp",
        "0.5",
        "--decode",
        "cpu",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    embedded_by = [line.split("]")[0] for line in done.stderr.splitlines() if " tiles in " in line]
    assert sorted(embedded_by) == ["[rank 0/2", "[rank 1/2"]
    manifest = read_manifest(out)  # written once both ranks were done
    assert manifest["n_slides"] == 2
    for name in HE[:2]:
        slide_id = Path(name).name.split(".")[0]
        _same_file(out, embedded["cpu"], slide_id)


def test_inputs_mixing_slides_and_stores_are_refused(slides_dir, export, tmp_path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "zarr.json").write_text("{}")
    with pytest.raises(ScratchpathError, match="slides or patch stores, not both"):
        embed([slides_dir / HE[0], tmp_path / "store"], export, tmp_path / "out")


def test_the_recorded_width_is_what_a_catavgmax_backbone_gives(tmp_path) -> None:
    # global_pool="catavgmax" pools avg and max side by side: 2 x timm's num_features
    from scratchpath.embed.encoder import Encoder

    arch = ("resnet10t", {"channels": [8, 8, 16, 32], "global_pool": "catavgmax"})
    export = make_export(tmp_path / "model", mpp=0.5, tile_size=64, arch=arch)
    encoder = Encoder(export, torch.device("cpu"))
    width = encoder(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).shape[1]
    assert width == 64 and encoder.num_features == encoder.provenance["num_features"] == width


def test_cli_errors_are_one_line_with_exit_status_2(slides_dir, tmp_path, capsys) -> None:
    from scratchpath.cli import main

    status = main(["embed", str(slides_dir / HE[0]), "--model", str(tmp_path / "none"),
                   "--out", str(tmp_path / "out")])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("error: ") and "not a scratchpath export" in error
    assert "\n" not in error


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tier: no CUDA device here")
def test_on_cuda_nvjpeg_tiles_embed_as_the_cpu_reads_them(embedded, slides_dir, export, tmp_path):
    """The device path on a GPU: stored JPEG tiles decoded by nvJPEG, cut and resampled on the
    device, fp32 (nvJPEG's IDCT may differ from libjpeg-turbo by a grey level or two)."""
    report = _embed(slides_dir, tmp_path, export, device="cuda", precision="fp32")
    assert report.ok
    for name in HE:
        slide_id = Path(name).name.split(".")[0]
        got, cpu = (
            read_slide(tmp_path / f"{slide_id}.h5"),
            read_slide(embedded["cpu"] / f"{slide_id}.h5"),
        )
        np.testing.assert_array_equal(got.coords, cpu.coords)
        if name != HE[2]:  # the JPEG 2000 slide is read on the CPU
            assert got.provenance["source"]["read"].startswith("stored JPEG decoded on the device")
        scale = np.abs(np.asarray(cpu.features)).max()
        assert np.abs(np.asarray(got.features) - np.asarray(cpu.features)).max() < 0.02 * scale


@pytest.mark.slow
def test_a_store_cut_at_several_mpp_gives_the_exports_mpp(slides_dir, export, tmp_path) -> None:
    store_dir = tmp_path / "store"
    settings = {**RUN, "mpp": (0.5, 1.0)}
    assert ingest([slides_dir / HE[1]], store_dir, progress=False, **settings).ok
    store = PatchStore(store_dir)
    report = embed([store_dir], export, tmp_path / "out", progress=False, log=lambda line: None)
    assert report.ok  # the export was trained at 1 µm/px: those tiles, not the 0.5 µm/px ones
    got = read_slide(tmp_path / "out" / "CMU-1-Small-Region_derived_pyramid.h5")
    at_1 = np.abs(store.tiles["mpp"] - 1.0) < 0.05
    assert len(got.coords) == at_1.sum() < len(store)
    xy = np.stack([store.tiles["x"][at_1], store.tiles["y"][at_1]], 1)
    np.testing.assert_array_equal(got.coords, xy)
