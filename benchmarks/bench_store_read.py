"""How fast does PatchStore read tiles in random order, against the usual alternatives?

Imports real H&E tiles (LC25000 lung + deeptexture, 224 px, JPEG q90) into a temporary store,
repeated to ~3k tiles, then times random-order reads on one core (one thread) of:

  store      PatchStore.read, batches of 256 random indices (shard index + os.pread + imagecodecs)
  files      the same JPEG bytes as one file per tile, opened with PIL (the ImageFolder way)
  bare       imagecodecs.jpeg8_decode of the same bytes already in memory (the codec's limit)
  zarr       zarr-python reading the same store: one tile per call, batches via .oindex, and
             (for reference, not random order) contiguous slices

and prints tiles/s and the ratios store/bare (target >= 0.8) and store/files (target >= 1.5).
Methods are interleaved batch by batch, so a shared machine's load hits them alike.
Files are in the page cache.

    SCRATCHPATH_TEST_DATA=../shared/data python benchmarks/bench_store_read.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402
from PIL import Image  # noqa: E402

from scratchpath.store import PatchStore, StoreWriter, import_tiles  # noqa: E402

DATA = Path(
    os.environ.get("SCRATCHPATH_TEST_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)
REPEATS = 3  # copies of the ~1k real tiles
BATCH = 256
ROUNDS = 2
ZARR_BATCH = 32


def build_store(tmp: Path) -> PatchStore:
    tiles = DATA / "tiles"
    lc = tmp / "lc.zarr"
    import_tiles(tiles / "lc25000_lung_224", lc, use_folder_labels=False)
    import_tiles(tiles / "deeptexture_examples_unlabeled_256" / "unlabeled", lc)
    source = PatchStore(lc)
    blobs = [source.read_encoded(i) for i in range(len(source))]
    out = tmp / "bench.zarr"
    with StoreWriter(out, tile_size=224, codec="jpeg:90") as writer:
        for k in range(REPEATS):
            with writer.begin_slide(
                {"source": "bench", "slide_id": f"copy{k}", "sha256": str(k)}
            ) as s:
                s.add_encoded(blobs)
    return PatchStore(out)


def timed(fn, order: np.ndarray) -> float:
    start = time.perf_counter()
    fn(order)
    return time.perf_counter() - start


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = build_store(tmp)
        n = len(store)
        blobs = [store.read_encoded(i) for i in range(n)]
        folder = tmp / "files"
        folder.mkdir()
        for i, blob in enumerate(blobs):
            (folder / f"{i:06d}.jpg").write_bytes(blob)
        files = [folder / f"{i:06d}.jpg" for i in range(n)]
        array = zarr.open_group(store.paths[0])["tiles"]
        rows = np.array([store.zarr_row(i)[1] for i in range(n)])
        order = np.random.default_rng(0).permutation(n)

        def read_store(o):
            for s in range(0, len(o), BATCH):
                store.read(o[s : s + BATCH])

        def read_files(o):
            for i in o:
                with Image.open(files[i]) as img:
                    np.asarray(img.convert("RGB"))

        def read_bare(o):
            for i in o:
                imagecodecs.jpeg8_decode(blobs[i])

        def read_zarr_single(o):
            for i in o:
                array[int(rows[i])]

        def read_zarr_slice(o):
            for s in range(0, len(o), BATCH):
                array[s : s + min(BATCH, len(o) - s)]

        def read_zarr_batch(o):
            for s in range(0, len(o), BATCH):
                array.oindex[rows[o[s : s + BATCH]]]

        assert np.array_equal(store.read(order[:4]), array.oindex[rows[order[:4]]])
        # Interleave the methods batch by batch so that they share the machine's load alike.
        methods = {
            "zarr_slice": read_zarr_slice,
            "store": read_store,
            "files": read_files,
            "bare": read_bare,
            "zarr_single": read_zarr_single,
        }
        seconds = dict.fromkeys(methods, 0.0)
        counts = dict.fromkeys(methods, 0)
        batches = [order[s : s + BATCH] for s in range(0, n, BATCH)]
        for r in range(ROUNDS):
            for k, batch in enumerate(batches):
                names = list(methods)
                names = names[(k + r) % len(names) :] + names[: (k + r) % len(names)]
                for name in names:
                    part = batch[: BATCH // 4] if name == "zarr_single" else batch
                    seconds[name] += timed(methods[name], part)
                    counts[name] += len(part)
        best = {name: counts[name] / seconds[name] for name in methods}
        small = order[:ZARR_BATCH]  # zarr's batched read is very slow here: one small batch
        best["zarr_batch"] = len(small) / timed(read_zarr_batch, small)
        stored = store.storage_bytes() / n
    print(
        f"{n} real H&E tiles 224x224, JPEG q90 ({stored / 1024:.1f} KiB/tile), random order, "
        f"1 core, {ROUNDS} interleaved rounds"
    )
    labels = {
        "store": "PatchStore.read (pread + imagecodecs)",
        "files": "JPEG files + PIL (baseline a)",
        "bare": "imagecodecs.jpeg8_decode in memory (b)",
        "zarr_single": "zarr arr[i] per tile (c)",
        "zarr_batch": f"zarr arr.oindex[{ZARR_BATCH} rows] (c)",
        "zarr_slice": f"zarr arr[i:i+{BATCH}] (sequential!)",
    }
    for name, label in labels.items():
        print(f"  {label:42s} {best[name]:8.0f} tiles/s")
    print(f"store / bare decode      = {best['store'] / best['bare']:.2f}x  (target >= 0.80)")
    print(f"store / files with PIL   = {best['store'] / best['files']:.2f}x  (target >= 1.50)")
    print(f"store / zarr per tile    = {best['store'] / best['zarr_single']:.2f}x")
    print(f"store / zarr batched     = {best['store'] / best['zarr_batch']:.2f}x")
    print(f"store / zarr sequential  = {best['store'] / best['zarr_slice']:.2f}x")


if __name__ == "__main__":
    main()
