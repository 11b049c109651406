"""``scratchpath import-tiles``: a folder of ready-made tiles -> a (labelled) patch store."""

from __future__ import annotations

import argparse
import sys

from scratchpath.store.codecs import CODEC_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-tiles",
        help="import a folder of tiles (class folders or a labels CSV) into a patch store",
        description=(
            "Import ready-made tiles into a patch store.\n\n"
            "Labels come from one sub-folder per class, or from --labels CSV with columns\n"
            "path,label[,group] (paths relative to DIR; extra columns allowed). A folder of\n"
            "loose images is imported unlabelled. Tiles of another size are centre-cropped to\n"
            "a square and resized to --tile-size: the whole labelled field of view is kept and\n"
            "the stored µm/px is scaled to match. Unreadable images are reported one line each\n"
            "and skipped. Re-running an interrupted import resumes it."
        ),
        epilog=(
            "examples:\n"
            "  scratchpath import-tiles tiles/nct_crc --out nct.zarr --mpp 0.5\n"
            "  scratchpath import-tiles tiles/lc25000 --labels tiles/lc25000/labels.csv "
            "--group-column lc25000clean_group_id --out lc.zarr"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="folder holding the images")
    parser.add_argument("--out", required=True, metavar="STORE", help="store to create or extend")
    parser.add_argument("--labels", metavar="CSV", help="CSV with columns path,label[,group]")
    parser.add_argument(
        "--group-column", metavar="NAME", help="CSV column with the group (e.g. case_id)"
    )
    parser.add_argument(
        "--no-labels", action="store_true", help="ignore class folders: import unlabelled"
    )
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="X",
        help="µm per pixel of the source images (default: unknown)",
    )
    parser.add_argument("--tile-size", type=int, default=224, metavar="N", help="default: 224")
    parser.add_argument("--codec", default="jpeg:90", help=f"{CODEC_HELP}")
    parser.add_argument(
        "--shard-size", type=int, default=1024, metavar="N", help="tiles per shard file (1024)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes decoding images (1)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.errors import ScratchpathError
    from scratchpath.store.tiles_import import import_tiles

    if args.tile_size < 8:
        raise ScratchpathError(f"--tile-size: must be at least 8, got {args.tile_size}")
    if args.mpp is not None and not args.mpp > 0:
        raise ScratchpathError(f"--mpp: must be positive, got {args.mpp}")
    if args.shard_size < 1:
        raise ScratchpathError(f"--shard-size: must be positive, got {args.shard_size}")
    if args.workers < 1:
        raise ScratchpathError(f"--workers: must be positive, got {args.workers}")
    if args.labels and args.no_labels:
        raise ScratchpathError("--no-labels: cannot be combined with --labels")
    report = import_tiles(
        args.dir,
        args.out,
        labels_csv=args.labels,
        group_column=args.group_column,
        use_folder_labels=not args.no_labels,
        mpp=args.mpp,
        tile_size=args.tile_size,
        codec=args.codec,
        shard_size=args.shard_size,
        workers=args.workers,
        on_error=lambda line: print(f"warning: {line}", file=sys.stderr),
    )
    classes = ", ".join(report.class_names) if report.class_names else "unlabelled"
    print(
        f"{args.out}: imported {report.imported} tiles, skipped {report.skipped} already "
        f"present, {len(report.failed)} unreadable; classes: {classes}"
    )
    return 0
