"""What do several magnifications and µm-continuous views cost?

1. ``ingest --mpp 0.5 1 2 4`` in one pass over each slide, against the baseline of four
   single-µm/px ingests of the same slides into four stores (same tiles, same codec): the one
   pass opens, hashes, thumbnails and tissue-masks each slide once instead of four times.
2. µm-continuous views (``FieldViewBatches``: plan + one ``store.read`` of the distinct source
   tiles + one ``roi_align`` per output size), against the baseline of the existing CPU views
   (``ViewBatches`` with ``MultiCrop``'s random resized crops, colour augmentation off so that
   both do only crops) on the same store, batch and number of views: batches/s per core.

Data: the two 4-level pyramids derived from CMU-1-Small-Region (OME SubIFDs and pages;
SCRATCHPATH_TEST_DATA, default ../shared/data). About half a minute on one core.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scratchpath.data import FieldsOfView, FieldViewBatches, ViewBatches
from scratchpath.data.sampling import BatchRequest
from scratchpath.ingest import ingest
from scratchpath.store import PatchStore
from scratchpath.views import MultiCrop

DATA = Path(
    os.environ.get(
        "SCRATCHPATH_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
SLIDES = [
    "CMU-1-Small-Region_derived_pyramid.ome.tif",
    "CMU-1-Small-Region_derived_pyramid_pages.tif",
]
MPPS = (0.5, 1.0, 2.0, 4.0)


def main() -> None:
    torch.set_num_threads(1)
    paths = [DATA / "slides" / name for name in SLIDES]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest(paths[:1], tmp / "warm", mpp=4.0, tile_size=64, progress=False)
        start = time.perf_counter()
        ingest(paths, tmp / "multi", mpp=MPPS, tile_size=128, progress=False)
        one_pass = time.perf_counter() - start
        start = time.perf_counter()
        for m in MPPS:
            ingest(paths, tmp / f"single-{m}", mpp=m, tile_size=128, progress=False)
        separate = time.perf_counter() - start
        store = PatchStore(tmp / "multi")
        n = len(store)
        n_single = sum(len(PatchStore(tmp / f"single-{m}")) for m in MPPS)
        print(f"ingest --mpp {' '.join(f'{m:g}' for m in MPPS)} ({n} tiles, 2 slides)")
        print(f"  one pass            {n / one_pass:8.1f} tiles/s  ({one_pass:.2f} s)")
        print(f"  baseline: 4 runs    {n_single / separate:8.1f} tiles/s  ({separate:.2f} s)")
        print(f"  ratio baseline / one pass time  {separate / one_pass:.2f}x")

        anchors = np.flatnonzero(np.isclose(store.tiles["mpp"], 0.499, atol=0.01))
        batch, n_batches = 32, 12
        config = {"global_microns": (32.0, 120.0), "local_microns": (8.0, 32.0), "n_global": 2,
                  "n_local": 6, "global_size": 64, "local_size": 32}  # fmt: skip
        fields = FieldsOfView(**config)
        views = MultiCrop(global_size=64, local_size=32, n_global_crops=2, n_local_crops=6,
                          stain="none", brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0,
                          gray_p=0.0, d4=False)  # fmt: skip
        rng = np.random.default_rng(0)
        requests = [BatchRequest(e, rng.choice(anchors, batch)) for e in range(n_batches)]
        timings = {}
        on_device = FieldsOfView(**config, on_device=True)
        for name, dataset in (("fields", FieldViewBatches(store, fields, seed=0)),
                              ("worker", FieldViewBatches(store, on_device, seed=0)),
                              ("baseline", ViewBatches(store, views, seed=0))):  # fmt: skip
            dataset[requests[0]]  # warm: index, file handles
            start = time.perf_counter()
            for request in requests:
                dataset[request]
            timings[name] = (time.perf_counter() - start) / n_batches
        print(f"views: batch {batch}, 2 x 64 px + 6 x 32 px, crops only")
        print(f"  µm-continuous views        {1 / timings['fields']:7.1f} batches/s")
        print(f"  baseline: CPU MultiCrop    {1 / timings['baseline']:7.1f} batches/s")
        print(f"  ratio fields / baseline speed  {timings['baseline'] / timings['fields']:.2f}x")
        print(
            f"  with on_device (worker: plan + read; crops on the GPU, not measured here): "
            f"{1 / timings['worker']:.1f} batches/s, {timings['baseline'] / timings['worker']:.2f}x"
        )


if __name__ == "__main__":
    main()
