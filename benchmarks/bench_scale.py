"""Does the store stay cheap at archive scale (10^7-10^8 tiles, 10^4 slides)? CPU, synthetic.

No pixels are needed: the tile tables are written directly (10^4 slides, random tissue
fractions, 1024-tile shards), in this code's format 2 and, for the *before* figures, in the
format 1 of the code this branch started from (``BASELINE`` commit, extracted with ``git
archive`` and run in its own process). Each figure is measured in a fresh process:

- **table**: open time, then bytes per tile that one process holds resident after touching the
  columns a training process reads (slide_index, tissue_fraction; chunk ids for shard mode):
  ``private`` (anonymous memory: copied per rank and per worker) and ``rss`` (also counting the
  memory-mapped pages, which all processes of a machine share).
- **plan**: seconds before the first batch of an epoch (both shuffle modes, world size 8, batch
  256), and milliseconds per batch after that (new code: the order is a function of position).
- **ingest**: per-slide bookkeeping of one ingest run (writer commit of a 4-tile slide + the run
  record) for slides 1-10 and for slides 10,001-10,010 of a store prefilled with 10^4 slides;
  the old code's run record is its run.json with every outcome so far, rewritten per slide.

- **many stores**: 10^3 format-2 stores (10^4 tiles each) opened as one ``PatchStore``.

Usage: ``python benchmarks/bench_scale.py [--sizes 1e7,1e8] [--old-sizes 1e7] [--stores 1000]``.
The 10^8 table is 3.2 GB on disk (format 2); the format-1 baseline is run at 10^7 only (~26 GB
of RAM at 10^8).
Last line: ``scale: B bytes/tile, plan P s at 1e8, ingest slide 10000/1 = R``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE = "cfcb282"  # main before issue 10 (format-1 store, old sampler and ingest)
N_SLIDES = 10_000
SHARD = 1024


# -- synthetic tables -------------------------------------------------------------------------
def _slide_sizes(n: int, n_slides: int = N_SLIDES) -> np.ndarray:
    sizes = np.full(n_slides, n // n_slides, np.int64)
    sizes[: n % n_slides] += 1
    return sizes


def _records(sizes: np.ndarray) -> list[dict]:
    rows = np.concatenate([[0], np.cumsum(-(-sizes // SHARD) * SHARD)[:-1]])
    pairs = enumerate(zip(sizes.tolist(), rows.tolist(), strict=True))
    return [{"source": f"s{k}.svs", "slide_id": f"s{k}", "sha256": f"{k:064x}", "bytes": 1,
             "vendor": "aperio", "width": 1, "height": 1, "mpp": 0.25, "status": "ok",
             "reason": "", "n_tiles": int(n), "row_start": int(r), "slide_index": k}
            for k, (n, r) in pairs]  # fmt: skip


def _group_attrs(path: Path, version: int, codec: str) -> None:
    (path / "tables").mkdir(parents=True, exist_ok=True)
    attrs = {"scratchpath_format_version": version, "tile_size": 224, "codec": codec,
             "shard_size": SHARD, "class_names": []}  # fmt: skip
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "tables" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))


def _column_chunks(sizes: np.ndarray, chunk: int = 10_000_000):
    """(first, slide_index, tissue_fraction) in chunks, so 10^8 tiles never sit in memory."""
    slide_of = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    rng = np.random.default_rng(0)
    for first in range(0, len(slide_of), chunk):
        part = slide_of[first : first + chunk]
        yield first, part, rng.random(len(part), np.float32)


def write_new_table(path: Path, n: int, n_slides: int = N_SLIDES) -> None:
    """A format-2 store's table (slides.jsonl + column files) of n tiles, no shards."""
    from scratchpath.store import table as tbl

    _group_attrs(path, 2, "jpeg:90:444")
    sizes = _slide_sizes(n, n_slides)
    folder = path / "tables" / tbl.TILE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files = {k: open(folder / f"{k}.bin", "wb") for k in tbl.TABLE_DTYPES}  # noqa: SIM115
    for _, slide, tissue in _column_chunks(sizes):
        m = len(slide)
        xy = np.arange(m, dtype=np.int32) % 50_000 * 224
        values = {"slide_index": slide, "x": xy, "y": xy, "level": np.zeros(m, np.int16),
                  "mpp": np.full(m, 0.5), "tissue_fraction": tissue,
                  "label": np.full(m, -1, np.int16), "group": np.zeros(m, np.int32)}  # fmt: skip
        for key, (dtype, _) in tbl.TABLE_DTYPES.items():
            files[key].write(np.ascontiguousarray(values[key], dtype).tobytes())
    for f in files.values():
        f.close()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    with open(path / "tables" / tbl.SLIDES_FILE, "w") as f:
        for record, start in zip(_records(sizes), starts.tolist(), strict=True):
            table = {"tile_start": start, "n_tiles": record["n_tiles"], "new_groups": [],
                     "sha256": "0" * 64}  # fmt: skip
            f.write(json.dumps({"slide": record, "table": table}, sort_keys=True) + "\n")


def write_old_table(path: Path, n: int) -> None:
    """A format-1 store's table (one merged npz segment) of n tiles, as the old writer leaves."""
    _group_attrs(path, 1, "jpeg:90")
    sizes = _slide_sizes(n)
    records = _records(sizes)
    slide = np.repeat(np.arange(N_SLIDES, dtype=np.int64), sizes)
    rows = np.concatenate([np.arange(r["row_start"], r["row_start"] + r["n_tiles"])
                           for r in records])  # fmt: skip
    arrays = {"slide_index": slide, "x": np.arange(n) % 50_000 * 224, "y": np.zeros(n, np.int64),
              "level": np.zeros(n, np.int64), "mpp": np.full(n, 0.5),
              "tissue_fraction": np.random.default_rng(0).random(n, np.float32),
              "label": np.full(n, -1, np.int64), "group": np.full(n, "", "<U1"), "row": rows,
              "slides_json": np.array(json.dumps(records, sort_keys=True))}  # fmt: skip
    np.savez(path / "tables" / f"seg-{0:010d}-{N_SLIDES:010d}.npz", **arrays)


# -- measurements in a child process ------------------------------------------------------------
def _memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0]) * 1024
    return out


def child_table(path: str, n: int, shuffle: str) -> dict:
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    before = _memory()  # after the imports (torch alone is a few hundred MB)
    start = time.perf_counter()
    store = PatchStore(path)
    opened = time.perf_counter() - start
    kw = {"batch_size": 256, "world_size": 8, "rank": 3, "shuffle": shuffle, "seed": 0}
    sampler = DistributedBatchSampler.from_store(store, **kw)
    sampler.set_epoch(1)
    t0 = time.perf_counter()
    first = next(iter(sampler))
    plan = time.perf_counter() - t0
    t1 = time.perf_counter()
    it = iter(sampler)
    for _ in range(50):
        next(it)
    per_batch = (time.perf_counter() - t1) / 50
    assert len(first.indices) == 256
    after = _memory()
    private = after["Anonymous"] - before["Anonymous"]
    rss = after["Rss"] - before["Rss"]
    return {"open_s": opened, "plan_s": plan, "batch_ms": per_batch * 1e3,
            "private_b": private / n, "rss_b": rss / n}  # fmt: skip


def child_many(root: str, n: int) -> dict:
    """Open 10^3 shard stores as one: first (builds the merged table cache) and again."""
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    paths = sorted(str(p) for p in Path(root).glob("shard-*.zarr"))
    before = _memory()
    t = time.perf_counter()
    store = PatchStore(*paths)
    first = time.perf_counter() - t
    t = time.perf_counter()
    store = PatchStore(*paths)
    again = time.perf_counter() - t
    sampler = DistributedBatchSampler.from_store(store, batch_size=256, world_size=8)
    next(iter(sampler))
    private = _memory()["Anonymous"] - before["Anonymous"]
    assert len(store) == n
    return {"first_s": first, "again_s": again, "private_b": private / n, "stores": len(paths)}


def child_ingest(path: str, old: bool) -> dict:
    """Seconds of per-slide bookkeeping for slides 1-10 (empty store) and 10,001-10,010."""
    import numpy as np

    from scratchpath.files import atomic_write
    from scratchpath.store import StoreWriter, TileCodec

    blob = TileCodec.parse("jpeg", 8).encode(np.zeros((8, 8, 3), np.uint8))

    def run(store: Path, first_slide: int) -> list[float]:
        times = []
        outcomes = [{"source": f"s{k}", "slide_id": f"s{k}", "n_tiles": 4, "status": "ok",
                     "reason": ""} for k in range(first_slide)]  # fmt: skip
        t_open = time.perf_counter()
        with StoreWriter(store, tile_size=224, codec="jpeg:90" if old else "jpeg") as writer:
            opened = time.perf_counter() - t_open
            log = None if old else open(store / "run.log.jsonl", "a")  # noqa: SIM115
            for k in range(first_slide, first_slide + 10):
                t = time.perf_counter()
                record = {"source": f"n{k}", "slide_id": f"n{k}", "sha256": f"n{k}"}
                with writer.begin_slide(record) as slide:
                    slide.add_encoded([blob] * 4, x=np.arange(4))
                outcome = {"source": f"n{k}", "slide_id": f"n{k}", "n_tiles": 4, "status": "ok",
                           "reason": ""}  # fmt: skip
                outcomes.append(outcome)
                if old:  # the old ingest loop: re-sum and rewrite run.json with every outcome
                    sum(o["n_tiles"] for o in outcomes)
                    info = {"arguments": {}, "slides": outcomes, "status": "running"}
                    with atomic_write(store / "run.json") as tmp:
                        tmp.write_bytes(json.dumps(info, indent=1).encode())
                else:
                    log.write(json.dumps(outcome) + "\n")
                    log.flush()
                times.append(time.perf_counter() - t)
            if log is not None:
                log.close()
        return times, opened

    first, open_first = run(Path(path) / "empty.zarr", 0)
    late, open_late = run(Path(path) / "full.zarr", N_SLIDES)
    return {"first_s": float(np.median(first)), "late_s": float(np.median(late)),
            "open_empty_s": open_first, "open_full_s": open_late}  # fmt: skip


def _prefill_ingest_store(path: Path, old: bool) -> None:
    """10^4 committed 4-tile slides (shards not needed: nothing reads them)."""
    if old:
        write_old_table(path, 4 * N_SLIDES)
    else:
        write_new_table(path, 4 * N_SLIDES)
    import zarr

    zarr.create_array(store=str(path / "tiles"), shape=(N_SLIDES * SHARD, 224, 224, 3),
                      chunks=(1, 224, 224, 3), dtype="uint8", zarr_format=3)  # fmt: skip


def _child(args: list[str], src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    code = f"import sys, json; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); " \
           f"import bench_scale as b; print(json.dumps(b.{args[0]}(*{args[1:]!r})))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e7,1e8")
    parser.add_argument("--old-sizes", default="1e7")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--stores", type=int, default=1000, help="shard stores opened as one")
    parser.add_argument("--stores-tiles", type=int, default=10_000_000, help="their tiles in all")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    old_sizes = [int(float(s)) for s in args.old_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        old_src = tmp / "old"
        old_src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE, "src"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
        new_src, old_src = REPO / "src", old_src / "src"
        results: dict[tuple[str, int], dict] = {}
        for code, ns in (("old", old_sizes), ("new", sizes)):
            for n in ns:
                path = tmp / f"{code}-{n}.zarr"
                t = time.perf_counter()
                (write_old_table if code == "old" else write_new_table)(path, n)
                made = time.perf_counter() - t
                src = old_src if code == "old" else new_src
                for shuffle in ("tile", "shard"):
                    r = _child(["child_table", str(path), n, shuffle], src)
                    results[(code, n, shuffle)] = r
                    print(f"{code} {n:.0e} tiles {shuffle:>5}: open {r['open_s']:6.2f} s, "
                          f"private {r['private_b']:6.1f} B/tile, rss {r['rss_b']:6.1f} B/tile, "
                          f"plan {r['plan_s']:7.2f} s, then {r['batch_ms']:.3f} ms/batch "
                          f"(table written in {made:.0f} s)", flush=True)  # fmt: skip
                import shutil

                shutil.rmtree(path)
        if args.stores:
            many = tmp / "many"
            per_store = args.stores_tiles // args.stores
            for k in range(args.stores):
                write_new_table(many / f"shard-{k:04d}.zarr", per_store, n_slides=10)
            os.environ["SCRATCHPATH_CACHE"] = str(tmp / "cache")
            r = _child(["child_many", str(many), per_store * args.stores], new_src)
            print(f"new {r['stores']} stores of {per_store} tiles opened as one: first "
                  f"{r['first_s']:.1f} s (builds the merged cache), then {r['again_s']:.1f} s; "
                  f"private {r['private_b']:.1f} B/tile", flush=True)  # fmt: skip
        ingest = {}
        for code in ("old", "new"):
            work = tmp / f"ingest-{code}"
            work.mkdir()
            _prefill_ingest_store(work / "full.zarr", old=code == "old")
            r = _child(["child_ingest", str(work), code == "old"],
                       old_src if code == "old" else new_src)  # fmt: skip
            ingest[code] = r
            print(f"{code} ingest bookkeeping: slide 1 {r['first_s'] * 1e3:.1f} ms, slide 10,001 "
                  f"{r['late_s'] * 1e3:.1f} ms (ratio {r['late_s'] / r['first_s']:.2f}); writer "
                  f"open {r['open_empty_s'] * 1e3:.0f} ms empty, "
                  f"{r['open_full_s'] * 1e3:.0f} ms at 10^4 slides", flush=True)  # fmt: skip
    ratio = ingest["new"]["late_s"] / ingest["new"]["first_s"]
    if not sizes:
        print(f"scale: ingest slide 10000/1 = {ratio:.2f} (no table sizes asked)")
        return
    top = max(sizes)
    plan = max(results[("new", top, s)]["plan_s"] for s in ("tile", "shard"))
    per_tile = max(results[("new", top, s)]["private_b"] for s in ("tile", "shard"))
    for n in old_sizes:
        if n in sizes:
            for s in ("tile", "shard"):
                o, w = results[("old", n, s)], results[("new", n, s)]
                print(f"at {n:.0e} {s}: private bytes/tile {o['private_b']:.0f} -> "
                      f"{w['private_b']:.1f} ({o['private_b'] / max(w['private_b'], 1e-9):.0f}x "
                      f"less), open {o['open_s']:.2f} -> {w['open_s']:.2f} s, plan "
                      f"{o['plan_s']:.2f} -> {w['plan_s']:.3f} s")  # fmt: skip
    print(
        f"scale: {per_tile:.1f} bytes/tile, plan {plan:.2f} s at {top:.0e}, "
        f"ingest slide 10000/1 = {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
