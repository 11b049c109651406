"""Is every data path as lean at archive scale (10^7-10^8 tiles, 10^4 slides) as the default one?

CPU, synthetic: no pixels are needed. Stores are written directly (``scale_tables.py``: 10^4
slides, each cut at 0.25, 0.5, 1 and 2 µm/px like ``ingest --mpp 0.25 0.5 1 2``, random tissue
fractions, 1024-tile shards whose files are hard links to one template, so 10^8 tiles make
10^5 real shard files). Each figure is measured in a fresh child process
(``scale_measure.py``), for this tree's code and, for the *before* figures, for two baselines
extracted with ``git archive`` and run the same way:

- ``BASELINE`` (main before issue 20): µm-field index and sampler options;
- ``FORMAT1_BASELINE`` (main before issue 10: format-1 store, old sampler and ingest): the
  default path's table, open and plan figures.

Figures, per size:

- **default path** (no sampler option; tile and shard order): store open, reopen as a worker
  does, private and resident bytes per tile, seconds before the first batch of an epoch, ms per
  batch after (world size 8, batch 256).
- **sampler options**: ``mpp_weights`` ({0.25: 1}, as the µm-field recipes; and all four),
  ``max_tiles_per_slide=500``, ``min_tissue=0.5`` and all three at once: set-up and epoch plan
  in CPU seconds, ms per batch, private bytes per tile after and at the peak.
- **µm-field index**: build in CPU seconds (one core, empty cache), peak bytes per tile; then a
  DataLoader worker's private bytes per tile once it has the index (mapped) and planned batches.
- **shuffling on a parallel file system**: shard-file ``open`` calls per tile of a rank whose
  DataLoader has 4 worker processes, for ``shuffle: tile`` and ``shuffle: shard`` (buffers of
  4,096 and 65,536 tiles), and the price: distinct slides and shards per batch of 256.
- **verify** (10^7 only: a Python loop per tile): CPU µs per tile without decoding.
- **many stores**: 10^3 stores opened as one (the merged table, cached once); **ingest
  bookkeeping**: commit + run record of slide 10,001 against slide 1.

Usage: ``python benchmarks/bench_scale.py [--sizes 1e7,1e8] [--old-sizes 1e7] [--slides 10000]
[--stores 1000]``
(the old code is run at ``--old-sizes`` only: its µm index takes ~10 GB at 10^8; its 10^8
figures are extrapolated x10 where the cost is O(tiles)). The 10^8 store is 3.6 GB on disk.
Last line: ``scale: ... at 1e8: µm index build B s, worker W B/tile; weighted plan ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BASELINE = "3f9978c"  # main before issue 20 (µm index per worker, samplers O(tiles))
FORMAT1_BASELINE = "cfcb282"  # main before issue 10 (format-1 store, old sampler and ingest)
N_SLIDES = 10_000
MODES = ("weights_025", "weights_all", "cap", "tissue", "all")

sys.path[:0] = [str(REPO / "src"), str(BENCH)]  # this tree's code writes the stores
import scale_tables  # noqa: E402


def _child(function: str, *args, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{BENCH}", "OMP_NUM_THREADS": "1"}
    code = f"import json, scale_measure as m; print(json.dumps(m.{function}(*{args!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _baseline(commit: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def _say(text: str) -> None:
    print(text, flush=True)


def measure_size(
    n: int, tmp: Path, srcs: dict[str, Path], old: bool, verify: bool, n_slides: int
) -> dict:
    """Every figure at one size (new code; the baselines too when ``old``)."""
    new = srcs["new"]
    out: dict = {}
    path = tmp / f"store-{n}.zarr"
    t = time.perf_counter()
    scale_tables.write_multi_mpp_store(path, n, n_slides, shards=True)
    _say(f"-- {n:.0e} tiles, {n_slides} slides: store written in {time.perf_counter() - t:.0f} s")
    codes = [("new", new)] + ([("old", srcs["format1"])] if old else [])
    for code, src in codes:
        table = path
        if code == "old":
            table = tmp / f"format1-{n}.zarr"
            scale_tables.write_format1_store(table, n, n_slides)
        for shuffle in ("tile", "shard"):
            r = _child("child_table", str(table), n, shuffle, src=src)
            out[(code, "default", shuffle)] = r
            _say(f"{code} default path {shuffle:>5}: open {r['open_s']:.2f} s, reopen "
                 f"{r['reopen_s']:.2f} s, sampler set-up {r['setup_cpu_s']:.2f} CPU s, "
                 f"private {r['private_b']:.2f} B/tile, rss "
                 f"{r['rss_b']:.1f} B/tile, plan {r['plan_s']:.3f} s, then "
                 f"{r['batch_ms']:.3f} ms/batch")  # fmt: skip
        if code == "old":
            shutil.rmtree(table)
    codes = [("new", new)] + ([("old", srcs["before"])] if old else [])
    for code, src in codes:
        for mode in MODES:
            for shuffle in ("tile", "shard") if mode == "weights_025" else ("tile",):
                r = _child("child_sampler", str(path), n, mode, shuffle, src=src)
                out[(code, mode, shuffle)] = r
                _say(f"{code} sampler {mode:>11} {shuffle:>5}: set-up {r['setup_cpu_s']:.2f} "
                     f"CPU s ({r['setup_wall_s']:.2f} wall), plan {r['plan_cpu_s']:.3f} CPU s, "
                     f"{r['batch_ms']:.2f} ms/batch, private {r['private_b']:.3f} B/tile, peak "
                     f"{r['peak_b']:.2f} B/tile ({r['tiles_per_epoch']} tiles/epoch)")  # fmt: skip
        cache = tmp / f"cache-{code}-{n}"
        timed = _child("child_index", str(path), n, str(cache), False, src=src)
        shutil.rmtree(cache, ignore_errors=True)
        traced = _child("child_index", str(path), n, str(cache), True, src=src)
        r = {**timed, "peak_b": traced["peak_b"]}
        if code == "new":
            worker = _child("child_index_worker", str(path), n, str(cache), src=src)
            r.update(worker_private_b=worker["private_b"], worker_rss_b=worker["rss_b"],
                     worker_plan_ms=worker["plan_ms"], worker_open_s=worker["open_s"])  # fmt: skip
        else:  # every worker builds its own index: its resident memory is the build's
            r.update(worker_private_b=timed["private_b"])
        out[(code, "index")] = r
        shutil.rmtree(cache, ignore_errors=True)
        _say(f"{code} µm index: build {r['build_cpu_s']:.1f} CPU s ({r['build_wall_s']:.1f} "
             f"wall), peak {r['peak_b']:.1f} B/tile, per worker {r['worker_private_b']:.2f} "
             f"B/tile private; magnifications {timed['mpps']}")  # fmt: skip
    for shuffle, buffer in (("tile", 0), ("shard", 4096), ("shard", 65536)):
        r = _child("child_opens", str(path), n, shuffle, buffer or 1, 4, 300, src=new)
        out[("new", "opens", shuffle, buffer)] = r
        name = f"{shuffle} {buffer}" if buffer else shuffle
        _say(f"new {name:>11}: {r['opens_per_tile']:.4f} opens/tile over {r['shard_files']} "
             f"shard files (4 workers, {r['tiles']} tiles), {r['slides_per_batch']:.1f} slides "
             f"and {r['shards_per_batch']:.1f} shards per batch of 256")  # fmt: skip
    if verify:
        r = _child("child_verify", str(path), n, src=new)
        out[("new", "verify")] = r
        _say(
            f"new verify --skip-decode: {r['cpu_us_per_tile']:.1f} CPU µs/tile, "
            f"{r['damaged']} damaged, {r['checksummed']} checked against checksums"
        )
    shutil.rmtree(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e7,1e8")
    parser.add_argument("--old-sizes", default="1e7")
    parser.add_argument("--verify-sizes", default="1e7")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--slides", type=int, default=N_SLIDES, help="slides per store")
    parser.add_argument("--stores", type=int, default=1000, help="shard stores opened as one")
    parser.add_argument("--stores-tiles", type=int, default=10_000_000, help="their tiles in all")
    args = parser.parse_args()

    def sizes_of(text: str) -> list[int]:
        return [int(float(s)) for s in text.split(",") if s]

    sizes, old_sizes = sizes_of(args.sizes), sizes_of(args.old_sizes)
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        srcs = {"new": REPO / "src", "before": _baseline(BASELINE, tmp / "before"),
                "format1": _baseline(FORMAT1_BASELINE, tmp / "format1")}  # fmt: skip
        for n in sorted(set(sizes) | set(old_sizes)):
            verify = n in sizes_of(args.verify_sizes)
            results[n] = measure_size(n, tmp, srcs, n in old_sizes, verify, args.slides)
        if args.stores:
            many = tmp / "many"
            per_store = args.stores_tiles // args.stores
            for k in range(args.stores):
                scale_tables.write_multi_mpp_store(many / f"shard-{k:04d}.zarr", per_store, 10)
            os.environ["SCRATCHPATH_CACHE"] = str(tmp / "cache-many")
            r = _child("child_many", str(many), per_store * args.stores, src=srcs["new"])
            _say(f"new {r['stores']} stores of {per_store} tiles opened as one: first "
                 f"{r['first_s']:.1f} s (builds the merged cache), then {r['again_s']:.1f} s; "
                 f"private {r['private_b']:.1f} B/tile")  # fmt: skip
        ingest = {}
        for code in ("old", "new"):  # fsync times vary run to run: the median of 3 runs
            runs = []
            for rep in range(3):
                work = tmp / f"ingest-{code}-{rep}"
                work.mkdir()
                full = work / "full.zarr"
                if code == "old":
                    scale_tables.write_format1_store(full, 4 * N_SLIDES, N_SLIDES)
                else:
                    scale_tables.write_multi_mpp_store(full, 4 * N_SLIDES, N_SLIDES)
                import zarr

                shape = (N_SLIDES * 1024, 224, 224, 3)
                zarr.create_array(store=str(full / "tiles"), shape=shape, chunks=(1, 224, 224, 3),
                                  dtype="uint8", zarr_format=3)  # fmt: skip
                src = srcs["format1"] if code == "old" else srcs["new"]
                runs.append(_child("child_ingest", str(work), code == "old", N_SLIDES, src=src))
                shutil.rmtree(work)
            r = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
            ingest[code] = r
            ratio = r["late_s"] / r["first_s"]
            _say(f"{code} ingest bookkeeping (median of 3): slide 1 {r['first_s'] * 1e3:.1f} ms, "
                 f"slide 10,001 {r['late_s'] * 1e3:.1f} ms (ratio {ratio:.2f}); "
                 f"writer open {r['open_empty_s'] * 1e3:.0f} ms empty, "
                 f"{r['open_full_s'] * 1e3:.0f} ms at 10^4 slides")  # fmt: skip
    _summary(results, sizes, old_sizes, ingest)


def _summary(results: dict, sizes: list[int], old_sizes: list[int], ingest: dict) -> None:
    """Before/after per figure, and how each grows with the tiles."""
    _say("\nbefore -> after (old at 1e8: its 1e7 figure x10 where the cost is O(tiles))")
    rows = [("µm index build, CPU s", ("index",), "build_cpu_s", 10),
            ("µm index per worker, private B/tile", ("index",), "worker_private_b", 1),
            ("µm index build peak, B/tile", ("index",), "peak_b", 1)]  # fmt: skip
    for mode in MODES:
        rows += [(f"sampler {mode}: set-up CPU s", (mode, "tile"), "setup_cpu_s", 10),
                 (f"sampler {mode}: plan CPU s", (mode, "tile"), "plan_cpu_s", 10),
                 (f"sampler {mode}: private B/tile", (mode, "tile"), "private_b", 1),
                 (f"sampler {mode}: peak B/tile", (mode, "tile"), "peak_b", 1)]  # fmt: skip
    base_n = max(old_sizes, default=0)
    for label, key, field, growth in rows:
        cells = []
        for n in sorted(set(sizes) | set(old_sizes)):
            new = results[n].get(("new", *key), {}).get(field)
            old = results[n].get(("old", *key), {}).get(field)
            old_text = "-" if old is None else f"{old:.3f}"
            if old is None and base_n and n > base_n:
                base = results[base_n].get(("old", *key), {}).get(field)
                if base is not None:  # O(tiles) seconds grow with n; bytes per tile do not
                    old_text = f"~{base * (n / base_n if growth == 10 else 1):.2f}"
            if new is not None:
                cells.append(f"{n:.0e}: {old_text} -> {new:.3f}")
        _say(f"{label:>40}: " + "; ".join(cells))
    top = max(sizes)
    default = max(results[top][("new", "default", s)]["private_b"] for s in ("tile", "shard"))
    plan = max(results[top][("new", "default", s)]["plan_s"] for s in ("tile", "shard"))
    index = results[top][("new", "index")]
    weighted = results[top][("new", "weights_025", "tile")]
    opens = results[top][("new", "opens", "shard", 65536)]
    ratio = ingest["new"]["late_s"] / ingest["new"]["first_s"]
    _say(
        f"scale: {default:.1f} bytes/tile, plan {plan:.2f} s at {top:.0e}, ingest slide "
        f"10000/1 = {ratio:.2f}; at {top:.0e}: µm index build {index['build_cpu_s']:.1f} CPU s, "
        f"worker {index['worker_private_b']:.2f} B/tile; weighted plan set-up "
        f"{weighted['setup_cpu_s']:.2f} + {weighted['plan_cpu_s']:.3f} CPU s, "
        f"{weighted['private_b']:.2f} B/tile; shard mode {opens['opens_per_tile']:.4f} opens/tile"
    )


if __name__ == "__main__":
    main()
