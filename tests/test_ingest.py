"""ingest: real slides -> tiles at a target µm/px -> patch store; failures, resume, shards."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from scratchpath.cli import ingest as ingest_cli
from scratchpath.errors import ScratchpathError
from scratchpath.ingest import find_slides, ingest, select_shard
from scratchpath.slides import open_slide
from scratchpath.store import PatchStore
from store_helpers import psnr_db

CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
OME = "CMU-1-Small-Region_derived_pyramid.ome.tif"
PAGES = "CMU-1-Small-Region_derived_pyramid_pages.tif"
# Four real slides; the J2K one (TCGA, no µm/px recorded) second so that a run killed after the
# first commit is still busy. Its 0.5 µm/px is an assumption for the test.
RUN = {"mpp": 0.5, "tile_size": 128, "min_tissue": 0.5, "assume_mpp": 0.5}


def _slides(slides_dir: Path) -> list[Path]:
    return [slides_dir / name for name in (CMU, TCGA, OME, PAGES)]


def _table(store: PatchStore) -> list[tuple]:
    """Tile table as sorted rows (slide id, x, y, level, mpp, tissue fraction)."""
    ids = [s["slide_id"] for s in store.slides]
    t = store.tiles
    rows = zip(
        t["slide_index"], t["x"], t["y"], t["level"], t["mpp"], t["tissue_fraction"], strict=True
    )
    return sorted(
        (ids[s], int(x), int(y), int(lv), float(m), float(f)) for s, x, y, lv, m, f in rows
    )


@pytest.fixture(scope="module")
def clean_store(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "store"
    report = ingest(_slides(slides_dir), out, progress=False, **RUN)
    assert report.ok, report.failed
    return out


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="scratchpath")
    ingest_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ingest", *argv])
    return args.run(args)


def test_native_mpp_is_cut_without_resampling(slides_dir: Path, tmp_path: Path) -> None:
    report = ingest([slides_dir / CMU], tmp_path / "s", mpp=0.5, tile_size=128, codec="zstd",
                    progress=False)  # fmt: skip
    assert report.ok
    store = PatchStore(tmp_path / "s")
    assert len(store) > 50
    assert set(store.tiles["level"]) == {0}
    np.testing.assert_allclose(store.tiles["mpp"], 0.499)  # 0.499 is within 5 % of 0.5
    with open_slide(slides_dir / CMU) as slide:
        for i in range(0, len(store), 7):
            x, y = int(store.tiles["x"][i]), int(store.tiles["y"][i])
            np.testing.assert_array_equal(store[i], slide.read_region(0, x, y, 128, 128))


@pytest.mark.parametrize(
    ("name", "mpp", "level", "read_size"),
    [(PAGES, 1.5, 1, 96), (OME, 1.0, 1, 64), (CMU, 1.0, 0, 128)],
    ids=["pages-level1-downsampled", "ome-level1-native", "svs-level0-downsampled"],
)
def test_tiles_come_from_the_right_level_and_equal_the_resampled_region(
    slides_dir: Path, tmp_path: Path, name: str, mpp: float, level: int, read_size: int
) -> None:
    ingest([slides_dir / name], tmp_path / "s", mpp=mpp, tile_size=64, codec="zstd",
           progress=False)  # fmt: skip
    store = PatchStore(tmp_path / "s")
    assert len(store) > 20
    assert set(store.tiles["level"]) == {level}
    np.testing.assert_allclose(store.tiles["mpp"], mpp, rtol=0.02)  # µm/px actually stored
    with open_slide(slides_dir / name) as slide:
        downsample = slide.levels[level].downsample
        for i in range(0, len(store), 5):
            x, y = (round(int(store.tiles[k][i]) / downsample) for k in ("x", "y"))
            region = slide.read_region(level, x, y, read_size, read_size)
            expected = cv2.resize(region, (64, 64), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(store[i], expected)


def test_jpeg_store_tiles_match_the_slide_above_35_db(slides_dir: Path, tmp_path: Path) -> None:
    ingest([slides_dir / OME], tmp_path / "s", mpp=0.5, tile_size=128, progress=False)
    store = PatchStore(tmp_path / "s")
    with open_slide(slides_dir / OME) as slide:
        psnrs = [
            psnr_db(store[i], slide.read_region(0, int(x), int(y), 128, 128))
            for i, (x, y) in enumerate(zip(store.tiles["x"], store.tiles["y"], strict=True))
        ]
    assert len(psnrs) > 50 and min(psnrs) >= 35.0


def _write_blank_glass_tiff(slides_dir: Path, path: Path) -> None:
    rgb = np.asarray(Image.open(slides_dir / "regions" / "histolab_no-tissue.png").convert("RGB"))
    tifffile.imwrite(path, rgb, tile=(128, 128), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


def test_bad_slides_fail_one_line_each_and_the_others_ingest(
    slides_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.svs").write_bytes(b"")
    (bad / "notes.svs").write_text("this is not a slide\n")
    (bad / "truncated.ome.tif").write_bytes((slides_dir / OME).read_bytes()[:900_000])
    _write_blank_glass_tiff(slides_dir, bad / "glass.tif")
    missing = tmp_path / "missing.svs"
    out = tmp_path / "store"
    status = _cli(str(slides_dir / OME), str(bad), str(missing), "--out", str(out),
                  "--mpp", "1.0", "--tile-size", "64", "--no-progress")  # fmt: skip
    assert status == 1
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("failed: ")]
    expected = {"empty.svs": "empty file", "notes.svs": "not a TIFF", "missing.svs": "no such file",
                "truncated.ome.tif": "truncated", "glass.tif": "no tissue tiles"}  # fmt: skip
    assert len(err_lines) == len(expected)
    for name, reason in expected.items():
        assert any(name in ln and reason in ln for ln in err_lines), (name, err_lines)
    store = PatchStore(out)
    ok = [s for s in store.slides if s["status"] == "ok"]
    assert [s["slide_id"] for s in ok] == ["CMU-1-Small-Region_derived_pyramid"]
    assert len(store) == ok[0]["n_tiles"] > 0
    run = json.loads((out / "run.json").read_text())
    assert sorted(s["status"] for s in run["slides"]) == ["failed"] * 5 + ["ok"]


def test_rerun_skips_complete_slides_and_adds_nothing(clean_store: Path, slides_dir: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "store"
    shutil.copytree(clean_store, out)
    before = PatchStore(out)
    report = ingest(_slides(slides_dir), out, progress=False, **RUN)
    after = PatchStore(out)
    assert [s["status"] for s in report.slides] == ["skipped"] * 4
    assert len(after) == len(before) and after.fingerprint == before.fingerprint


def test_rerun_skips_by_fast_identity_without_reading_slides(
    clean_store: Path, slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scratchpath.ingest as ingest_module
    from scratchpath.files import file_sha256

    out = tmp_path / "store"
    shutil.copytree(clean_store, out)
    for slide in PatchStore(out).slides:  # the full hash was recorded while tiling
        assert slide["sha256"] == file_sha256(slide["source"])
        assert slide["fast_id"] == ingest_module.fast_id(slide["source"])

    def must_not_run(*args, **kwargs):
        raise AssertionError("a committed slide was read again")

    monkeypatch.setattr(ingest_module.identity, "file_sha256", must_not_run)
    monkeypatch.setattr(ingest_module.plan, "open_slide", must_not_run)  # planning
    monkeypatch.setattr(ingest_module.tiles, "open_slide", must_not_run)  # tile reads
    report = ingest(_slides(slides_dir), out, progress=False, **RUN)
    assert [s["status"] for s in report.slides] == ["skipped"] * 4
    lines = (out / "run.log.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines[-4:]] == ["skipped"] * 4


def test_store_records_thumbnails_and_run_report(clean_store: Path) -> None:
    store = PatchStore(clean_store)
    run = json.loads((clean_store / "run.json").read_text())
    assert run["status"] == "finished" and run["arguments"]["mpp"] == 0.5
    assert [s["n_tiles"] for s in run["slides"]] == [s["n_tiles"] for s in store.slides]
    for slide in store.slides:
        with Image.open(clean_store / "thumbnails" / f"{slide['slide_id']}.png") as thumb:
            assert max(thumb.size) >= 1024 and thumb.mode == "RGB"
        assert len(slide["sha256"]) == 64 and slide["vendor"] in {"aperio", "ome", "generic-tiff"}


def test_shards_partition_the_slides(slides_dir: Path, tmp_path: Path) -> None:
    # The four top-level H&E slides (slides/formats holds other formats' fixtures).
    slides_dir, real = tmp_path / "slides", slides_dir
    slides_dir.mkdir()
    for slide in _slides(real):
        (slides_dir / slide.name).symlink_to(slide)
    paths = find_slides([slides_dir])
    assert [p.name for p in paths] == sorted([CMU, OME, PAGES, TCGA])
    parts = [select_shard(paths, (i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(paths)
    for i in range(2):
        ingest([slides_dir], tmp_path / f"s{i}", shard=(i, 2), mpp=2.0, tile_size=64,
               assume_mpp=0.5, progress=False)  # fmt: skip
    both = PatchStore(tmp_path / "s0", tmp_path / "s1")
    assert sorted(s["slide_id"] for s in both.slides) == sorted(p.name.split(".")[0] for p in paths)
    with pytest.raises(ScratchpathError, match="shard"):
        select_shard(paths, (2, 2))


def test_worker_processes_write_the_same_store(slides_dir: Path, tmp_path: Path) -> None:
    args = {"mpp": 1.0, "tile_size": 64, "progress": False}
    ingest([slides_dir / CMU, slides_dir / PAGES], tmp_path / "one", workers=1, **args)
    ingest([slides_dir / CMU, slides_dir / PAGES], tmp_path / "two", workers=2, **args)
    one, two = PatchStore(tmp_path / "one"), PatchStore(tmp_path / "two")
    assert _table(one) == _table(two)
    np.testing.assert_array_equal(one.read(range(len(one))), two.read(range(len(two))))


def test_killed_run_resumes_to_the_same_store_as_a_clean_run(
    clean_store: Path, slides_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    command = [sys.executable, "-m", "scratchpath", "ingest", *map(str, _slides(slides_dir)),
               "--out", str(out), "--mpp", "0.5", "--tile-size", "128", "--assume-mpp", "0.5",
               "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    log = out / "run.log.jsonl"  # one line per slide, appended after its commit
    while not (log.exists() and log.read_text().count('"status"') >= 2):  # run line + a slide
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # while the J2K slide is being written
    assert proc.wait() == -signal.SIGKILL

    interrupted = PatchStore(out)
    assert 1 <= len(interrupted.slides) < 4
    counts = np.bincount(interrupted.tiles["slide_index"], minlength=len(interrupted.slides))
    for slide, n in zip(interrupted.slides, counts, strict=True):
        assert slide["status"] == "ok" and slide["n_tiles"] == n

    report = ingest(_slides(slides_dir), out, progress=False, **RUN)
    assert report.ok and sum(s["status"] == "skipped" for s in report.slides) == len(counts)
    resumed, clean = PatchStore(out), PatchStore(clean_store)
    assert _table(resumed) == _table(clean)
    order = np.lexsort((resumed.tiles["x"], resumed.tiles["y"], resumed.tiles["slide_index"]))
    order_clean = np.lexsort((clean.tiles["x"], clean.tiles["y"], clean.tiles["slide_index"]))
    np.testing.assert_array_equal(resumed.read(order[::9]), clean.read(order_clean[::9]))


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (("--mpp", "0"), "mpp"),
        (("--min-tissue", "1.5"), "min_tissue"),
        (("--workers", "0"), "workers"),
    ],
)
def test_bad_arguments_raise_a_usage_error_naming_the_field(
    slides_dir: Path, tmp_path: Path, argv: tuple[str, ...], field: str
) -> None:
    with pytest.raises(ScratchpathError, match=f"^{field}: "):
        _cli(str(slides_dir / CMU), "--out", str(tmp_path / "s"), *argv)
    assert not (tmp_path / "s").exists()  # nothing written before the arguments are checked


def test_bad_shard_spec_is_rejected_by_the_parser(slides_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        _cli(str(slides_dir / CMU), "--out", str(tmp_path / "s"), "--shard", "3")
    assert info.value.code == 2
