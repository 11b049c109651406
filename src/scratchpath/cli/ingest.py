"""``scratchpath ingest``: whole-slide images -> tissue tiles at a target µm/px -> a patch store."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Cut whole-slide images (Aperio SVS, pyramidal TIFF, OME-TIFF; PNG/JPEG regions with
--assume-mpp) into square tissue tiles at a fixed physical resolution and write them to a
patch store (a zarr v3 folder that `scratchpath fit` trains on).

For each slide: the pyramid level at or just finer than --mpp is read and area-downsampled to
--mpp (cut as is when within 5 %); a tissue mask on the thumbnail rejects glass, pen marks and
specks; tiles with at least --min-tissue tissue are kept. The store records, per tile, the slide,
level-0 x/y, level read, µm/px stored and tissue fraction; STORE/thumbnails/<slide>.png shows
the mask and the kept tiles, STORE/run.json the arguments and (once finished) each slide's
outcome, STORE/run.log.jsonl one line per slide as it happens.

Folders are searched recursively for whole-slide files (.svs, .tif, .tiff, .ome.tif, .ndpi,
...); PNG/JPEG images are ingested only when named explicitly.

Re-running the same command resumes an interrupted run: slides already in the store are
skipped without being read again (same size, mtime and first/last MiB; the full sha256 of each
slide is recorded once, while its tiles are read), and a slide's tiles appear only once it is
complete. A slide that fails is
reported on one line and the others still ingest; the exit status is then 1."""

EPILOG = """\
examples:
  scratchpath ingest slides/ --out cohort.zarr
  scratchpath ingest a.svs b.ome.tif --out cohort.zarr --mpp 1.0 --tile-size 256 --workers 8
  scratchpath ingest slides/ --out multi.zarr --mpp 0.25 0.5 1 2   # four magnifications
  scratchpath ingest regions/*.png --out regions.zarr --assume-mpp 0.5 --min-tissue 0.8
  # SLURM array, one store per task (open them together with PatchStore(a, b, ...)):
  scratchpath ingest slides/ --out cohort-$SLURM_ARRAY_TASK_ID.zarr \\
      --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --workers $SLURM_CPUS_PER_TASK

exit status: 0 all slides ingested or already present, 1 some slides failed, 2 bad usage."""


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="tile whole-slide images into a patch store",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "slides", nargs="+", metavar="SLIDES_OR_DIRS", help="slide files and/or folders of them"
    )
    parser.add_argument("--out", required=True, metavar="STORE", help="store to create or extend")
    parser.add_argument(
        "--mpp",
        type=float,
        nargs="+",
        default=[0.5],
        metavar="X",
        help="µm per pixel of the tiles (0.5); several (--mpp 0.25 0.5 1 2) are cut in one pass "
        "over each slide into the same store",
    )
    parser.add_argument("--tile-size", type=int, default=224, metavar="N", help="tile edge (224)")
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        metavar="F",
        help="keep tiles with at least this tissue fraction, 0..1 (0.5)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (1)")
    parser.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="ingest only slides I, I+N, I+2N, ... of the sorted list (0 <= I < N)",
    )
    parser.add_argument(
        "--assume-mpp",
        type=float,
        metavar="X",
        help="µm per pixel of level 0 for slides that record none (required for PNG/JPEG)",
    )
    parser.add_argument(
        "--codec",
        default="jpeg",
        help="tile codec: jpeg[:QUALITY[:444|420]] (lossy, default jpeg:90:444, no chroma "
        "subsampling), zstd[:LEVEL] or webp (lossless)",
    )
    parser.add_argument(
        "--quality", type=int, default=90, metavar="Q", help="JPEG quality 1..100 (90)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.ingest import ingest

    def on_failure(reason: str) -> None:
        print(f"failed: {reason}", file=sys.stderr, flush=True)

    report = ingest(
        args.slides,
        args.out,
        mpp=args.mpp[0] if len(args.mpp) == 1 else tuple(args.mpp),
        tile_size=args.tile_size,
        min_tissue=args.min_tissue,
        workers=args.workers,
        shard=args.shard,
        assume_mpp=args.assume_mpp,
        codec=args.codec,
        quality=args.quality,
        progress=not args.no_progress,
        on_failure=on_failure,
    )
    print(report.summary())
    if not report.ok:
        print(f"failed slides are listed above and in {args.out}/run.json", file=sys.stderr)
    return 0 if report.ok else 1
