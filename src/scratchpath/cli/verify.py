"""``scratchpath verify``: check that every committed tile of stores is intact (read-only)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check that every tile of stores decodes and matches its commit (read-only)",
        description=(
            "Read every committed tile of each store back from its shard file and check it: "
            "the shard exists and its index is readable, the tile's bytes have the CRC-32C "
            "recorded when its slide was committed (stores written before checksums existed: "
            "decodability only), it decodes to a tile_size x tile_size RGB image, and each "
            "slide's table rows hash to what its commit recorded. Prints one line per damaged "
            "tile (store, slide, position in the slide, store tile index, reason) and a summary "
            "per store; exits 1 if anything is damaged, 0 if not. Nothing is written. Shards "
            "are checked in parallel worker processes."
        ),
    )
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store folder or URL")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: every core this process may use)",
    )
    parser.add_argument(
        "--skip-decode",
        action="store_true",
        help="do not decode tiles that have a commit checksum (much faster: bytes that match "
        "their checksum decode as they did when committed); tiles without one are decoded",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scratchpath.errors import ScratchpathError
    from scratchpath.store.verify import default_workers, verify_stores

    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise ScratchpathError(f"--workers: must be at least 1, got {workers}")
    with tqdm(
        unit="tile", unit_scale=True, desc="verify", file=sys.stderr, disable=args.no_progress
    ) as bar:
        reports = verify_stores(
            args.stores, workers=workers, decode=not args.skip_decode, progress=bar.update
        )
    damaged = False
    for report in reports:
        for damage in report.damaged:
            print(damage.line())
        print(report.summary())
        damaged = damaged or bool(report.damaged)
    return 1 if damaged else 0
