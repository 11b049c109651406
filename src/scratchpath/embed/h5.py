"""One HDF5 file per slide, in the layout the MIL tools read, and the folder's manifest.

``<out>/<slide_id>.h5`` (what TRIDENT and CLAM write and read, plus scratchpath's provenance)::

    features         (N, D) float32 | float16   one embedding per tile, contiguous on disk
        attrs: name (slide id), encoder (architecture), export_sha256
    coords           (N, 2) int64               level-0 (x, y) of each tile's top-left corner
        attrs: patch_size (tile edge in px at the target µm/px), patch_size_level0,
               patch_level (the level read), level0_magnification, target_magnification
               (10 / µm/px, the usual 20x = 0.5 µm/px convention), level0_mpp, target_mpp,
               mpp (µm/px of the tiles), overlap (0), name, level0_width, level0_height
    tissue_fraction  (N,) float32               of each tile, from the thumbnail mask
    thumbnail        (h, w, 3) uint8            the slide at low resolution (attention heatmaps)
        attrs: scale (level-0 px per thumbnail px)
    file attrs: format, format_version, scratchpath (JSON: encoder + tiling provenance and
                the source slide's identity)

``features`` is stored contiguous and uncompressed, so :func:`read_features` can memory-map it:
a MIL head trains on 10^4 slides without holding their bags in memory. Each file is written to
a temporary name beside its target, fsync'ed and renamed (:func:`scratchpath.files.atomic_write`):
a killed run never leaves a half-written file.

``<out>/manifest.json``: the encoder and tiling provenance, and one entry per slide (``ok`` with
its file and tile count, or ``failed`` with the reason), rebuilt from the files on disk at the
end of every run (:func:`write_manifest`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write

FORMAT = "scratchpath-embeddings"
FORMAT_VERSION = 1
SUFFIX = ".h5"
MANIFEST = "manifest.json"
FAILED_DIR = "failed"
# Provenance fields that must agree before a file is reused (the export's path may differ).
ENCODER_KEYS = (
    "architecture",
    "export_sha256",
    "input_size",
    "mean",
    "std",
    "interpolation",
    "precision",
    "features_dtype",
    "num_features",
)


def magnification(mpp: float | None) -> float | None:
    """Objective magnification of a µm/px by the usual convention (10 / µm/px: 0.5 -> 20x)."""
    return None if not mpp else round(10.0 / mpp, 3)


@dataclass
class SlideEmbeddings:
    """The content of one slide's file (``features`` possibly memory-mapped)."""

    slide_id: str
    features: np.ndarray  # (N, D)
    coords: np.ndarray  # (N, 2) int64, level-0 px
    coords_attrs: dict[str, Any]
    provenance: dict[str, Any]
    tissue_fraction: np.ndarray | None = None
    thumbnail: np.ndarray | None = None
    thumbnail_scale: float = 0.0

    @property
    def patch_size_level0(self) -> int:
        return int(self.coords_attrs["patch_size_level0"])


def write_slide(
    path: str | os.PathLike,
    *,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    provenance: dict[str, Any],
    tissue_fraction: np.ndarray | None = None,
    thumbnail: np.ndarray | None = None,
    thumbnail_scale: float = 0.0,
) -> Path:
    """Write one slide's embeddings atomically (see the module docstring for the layout)."""
    import h5py

    path = Path(path)
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise ValueError(f"features {features.shape} and coords {coords.shape} do not pair")
    name = str(coords_attrs.get("name", path.stem))
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["scratchpath"] = json.dumps(provenance, default=str)
        feats = f.create_dataset("features", data=features)  # contiguous: memory-mappable
        encoder = provenance.get("encoder", {})
        feats.attrs["name"] = name
        feats.attrs["encoder"] = str(encoder.get("architecture", ""))
        feats.attrs["export_sha256"] = str(encoder.get("export_sha256", ""))
        dset = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in coords_attrs.items():
            dset.attrs[key] = "None" if value is None else value  # TRIDENT's None spelling
        if tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))
        if thumbnail is not None:
            thumb = f.create_dataset(
                "thumbnail", data=thumbnail, compression="gzip", compression_opts=1
            )
            thumb.attrs["scale"] = float(thumbnail_scale)
    return path


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``scratchpath`` provenance of a finished file, or None when it is not one of ours
    (unreadable, another format)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or "features" not in f:
                return None
            provenance = json.loads(f.attrs["scratchpath"])
            provenance["n_tiles"] = int(f["features"].shape[0])
            return provenance
    except (OSError, KeyError, ValueError):
        return None


def read_slide(path: str | os.PathLike, *, mmap: bool = True) -> SlideEmbeddings:
    """Read one slide's file; ``features`` is memory-mapped when ``mmap`` (read-only)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise ScratchpathError(f"{path}: no 'features' / 'coords' datasets")
            dset = f["features"]
            offset = dset.id.get_offset()
            if mmap and offset is not None and dset.chunks is None and dset.compression is None:
                features = np.memmap(
                    path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape
                )
            else:  # chunked / compressed files written by other tools
                features = dset[()]
            provenance = json.loads(f.attrs.get("scratchpath", "{}"))
            coords_attrs = {k: _attr(v) for k, v in f["coords"].attrs.items()}
            thumbnail, scale = None, 0.0
            if "thumbnail" in f:
                thumbnail = f["thumbnail"][()]
                scale = float(f["thumbnail"].attrs.get("scale", 0.0))
            return SlideEmbeddings(
                slide_id=str(coords_attrs.get("name") or _attr(dset.attrs.get("name", path.stem))),
                features=features,
                coords=f["coords"][()].astype(np.int64),
                coords_attrs=coords_attrs,
                provenance=provenance,
                tissue_fraction=f["tissue_fraction"][()] if "tissue_fraction" in f else None,
                thumbnail=thumbnail,
                thumbnail_scale=scale,
            )
    except OSError as err:
        raise ScratchpathError(f"{path}: unreadable HDF5 ({err})") from None


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return None if value == "None" else value


def record_failure(out: Path, slide_id: str, entry: dict[str, Any]) -> None:
    """Note a failed slide in ``<out>/failed/<slide_id>.json`` (read by :func:`write_manifest`)."""
    folder = out / FAILED_DIR
    folder.mkdir(exist_ok=True)
    with atomic_write(folder / f"{slide_id}.json") as tmp:
        tmp.write_text(json.dumps(entry, default=str))


def clear_failure(out: Path, slide_id: str) -> None:
    (out / FAILED_DIR / f"{slide_id}.json").unlink(missing_ok=True)


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first provenance field on which two runs differ (encoder or tiling), else None."""
    for group in ("encoder", "tiling"):
        left, right = a.get(group) or {}, b.get(group) or {}
        keys = ENCODER_KEYS if group == "encoder" else sorted(set(left) | set(right))
        for key in keys:
            if _normal(left.get(key)) != _normal(right.get(key)):
                return f"{group}.{key}: {left.get(key)!r} vs {right.get(key)!r}"
    return None


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare equal


def write_manifest(out: Path, run: dict[str, Any]) -> Path:
    """Rebuild ``<out>/manifest.json`` from the slide files and failure notes on disk
    (O(slides): only the attributes of each file are read)."""
    slides, stale = [], []
    for path in sorted(out.glob(f"*{SUFFIX}")):
        provenance = read_provenance(path)
        if provenance is None:
            continue
        if same_encoder(provenance, run) is not None:  # left by another encoder (--overwrite)
            stale.append(path.name)
            continue
        source = provenance.get("source") or {}
        slides.append(
            {
                "slide_id": path.stem,
                "status": "ok",
                "file": path.name,
                "n_tiles": provenance["n_tiles"],
                **source,
            }
        )
    done = {s["slide_id"] for s in slides}
    for note in sorted((out / FAILED_DIR).glob("*.json")):
        entry = json.loads(note.read_text())
        if note.stem not in done:
            slides.append({"slide_id": note.stem, "status": "failed", **entry})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **run,
        "n_slides": sum(s["status"] == "ok" for s in slides),
        "n_failed": sum(s["status"] == "failed" for s in slides),
        "n_tiles": sum(int(s.get("n_tiles", 0)) for s in slides if s["status"] == "ok"),
        "slides": slides,
        "other_encoder_files": stale,
    }
    with atomic_write(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return out / MANIFEST


def read_manifest(out: str | os.PathLike) -> dict[str, Any] | None:
    """``<out>/manifest.json`` or None when there is none."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScratchpathError(f"{path}: invalid JSON ({err})") from None
