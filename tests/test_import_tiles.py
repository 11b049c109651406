"""Importing real tile datasets (class folders, labels CSVs, unlabelled folders) and `info`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath import cli
from scratchpath.cli import main
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore, import_tiles


@pytest.fixture(autouse=True)
def _only_store_commands(monkeypatch):
    # `main` imports every command module; the training ones pull in Lightning (slow to import).
    monkeypatch.setattr(
        cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in ("import-tiles", "info")}
    )


def test_lc25000_imports_with_labels_and_groups(tmp_path, tiles_dir):
    source = tiles_dir / "lc25000_lung_224"
    report = import_tiles(
        source,
        tmp_path / "lc.zarr",
        labels_csv=source / "labels.csv",
        group_column="lc25000clean_group_id",
    )
    store = PatchStore(tmp_path / "lc.zarr")
    with open(source / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert report.imported == len(store) == len(rows) == 740
    assert store.class_names == ["lung_aca", "lung_n", "lung_scc"]
    assert np.bincount(store.labels).tolist() == [243, 249, 248]
    expected = [(r["label"], r["lc25000clean_group_id"]) for r in rows]
    groups = store.tile_column("group")
    got = [(store.class_names[k], g) for k, g in zip(store.labels, groups, strict=True)]
    assert got == expected
    assert store.mpp is None  # no --mpp given: unknown
    first = np.asarray(Image.open(source / rows[0]["path"]).convert("RGB"))
    mse = np.mean((store[0].astype(float) - first) ** 2)
    assert 10 * np.log10(255**2 / mse) >= 35.0


def test_class_folders_of_150px_tiles_are_resized_with_scaled_mpp(tmp_path, tiles_dir):
    report = import_tiles(tiles_dir / "kather2016_texture_samples", tmp_path / "k.zarr", mpp=0.495)
    store = PatchStore(tmp_path / "k.zarr")
    assert report.imported == len(store) == 24
    assert store.class_names[0] == "01_TUMOR" and len(store.class_names) == 8
    assert np.bincount(store.labels).tolist() == [3] * 8
    assert store.read([0]).shape == (1, 224, 224, 3)
    assert store.mpp == pytest.approx(0.495 * 150 / 224)


def test_unlabelled_folder_imports_without_labels(tmp_path, tiles_dir):
    source = tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled"
    import_tiles(source, tmp_path / "u.zarr", tile_size=256, codec="zstd")
    store = PatchStore(tmp_path / "u.zarr")
    assert len(store) == 240 and store.labels is None and store.class_names == []
    first = sorted(source.iterdir())[0]
    np.testing.assert_array_equal(store[0], np.asarray(Image.open(first).convert("RGB")))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL on the deliberately broken file
def test_bad_image_is_reported_and_the_rest_imported(tmp_path, tiles_dir):
    source = tmp_path / "tiles"
    for cls in ("ADI", "TUM"):
        shutil.copytree(tiles_dir / "nct_crc_he_100k_samples" / cls, source / cls)
    (source / "TUM" / "broken.tif").write_bytes(b"II*\x00 this is not an image")
    lines: list[str] = []
    report = import_tiles(source, tmp_path / "s.zarr", on_error=lines.append)
    store = PatchStore(tmp_path / "s.zarr")
    assert len(lines) == 1 and "broken.tif: unreadable image" in lines[0] and "\n" not in lines[0]
    assert report.imported == len(store) == 2 and store.labels.tolist() == [0, 1]
    assert [s["status"] for s in store.slides].count("failed") == 1


def test_rerun_of_an_import_skips_committed_batches(tmp_path, tiles_dir):
    source = tiles_dir / "nct_crc_he_100k_samples"
    import_tiles(source, tmp_path / "s.zarr", shard_size=4)
    again = import_tiles(source, tmp_path / "s.zarr", shard_size=4)
    assert again.imported == 0 and again.skipped == 9
    assert len(PatchStore(tmp_path / "s.zarr")) == 9


def test_csv_without_label_column_is_refused(tmp_path, tiles_dir):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,diagnosis\nADI/ADI-AAQEFMRI.tif,ADI\n")
    with pytest.raises(ScratchpathError, match="no 'label' column"):
        import_tiles(tiles_dir / "nct_crc_he_100k_samples", tmp_path / "s", labels_csv=csv_path)


def test_cli_imports_ebhi_with_case_groups_and_info_reports_it(tmp_path, tiles_dir, capsys):
    source = tiles_dir / "ebhi_seg_colorectal_224"
    with open(source / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["path"].split("-")[-1] in ("001.png", "002.png")]
        fields = reader.fieldnames
    subset = tmp_path / "subset.csv"  # a slice of the real CSV (extra columns kept): fast test
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    store = str(tmp_path / "ebhi.zarr")
    argv = ["import-tiles", str(source), "--out", store, "--labels", str(subset)]
    assert main([*argv, "--group-column", "case_id", "--mpp", "0.5"]) == 0
    assert f"imported {len(rows)} tiles" in capsys.readouterr().out
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tiles"] == len(rows) and info["slides_ok"] == 1 and info["slides_failed"] == 0
    assert info["classes"] == {
        name: sum(r["label"] == name for r in rows) for name in sorted({r["label"] for r in rows})
    }
    assert info["mpp"] == 0.5 and info["codec"] == "jpeg:90:444" and info["tile_size"] == 224
    assert info["fingerprint"] == PatchStore(store).fingerprint
    assert PatchStore(store).tile_column("group").tolist() == [r["case_id"] for r in rows]
    assert main(["info", store]) == 0
    assert "fingerprint" in capsys.readouterr().out


def test_cli_info_on_a_non_store_exits_2_with_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a scratchpath store" in err and "\n" not in err


def test_info_of_two_stores_reports_them_combined(tmp_path, tiles_dir, capsys):
    source = tiles_dir / "nct_crc_he_100k_samples"
    for name in ("a", "b"):
        import_tiles(source, tmp_path / name)
    assert main(["info", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["tiles"] for s in summaries] == [9, 9, 18] and summaries[2]["combined"]


def test_import_source_must_be_a_folder(tmp_path):
    with pytest.raises(ScratchpathError, match="not a folder"):
        import_tiles(Path(tmp_path / "nothing"), tmp_path / "s")


def test_parallel_import_equals_serial_import(tmp_path, tiles_dir):
    source = tiles_dir / "kather2016_texture_samples"
    import_tiles(source, tmp_path / "serial.zarr")
    import_tiles(source, tmp_path / "parallel.zarr", workers=2)
    serial, parallel = PatchStore(tmp_path / "serial.zarr"), PatchStore(tmp_path / "parallel.zarr")
    assert parallel.fingerprint == serial.fingerprint
    np.testing.assert_array_equal(parallel.read(np.arange(24)), serial.read(np.arange(24)))
