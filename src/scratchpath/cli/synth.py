"""``scratchpath synth``: write synthetic H&E slides (pyramidal TIFF) and labelled tiles."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scratchpath.errors import ScratchpathError

DESCRIPTION = """\
Write procedural H&E slides (pink stroma with collagen fibres, haematoxylin nuclei, glands,
fat) as pyramidal 256x256-tiled OME-TIFFs with their µm/px, streamed tile row by tile row so
any size fits in memory. Slides cycle through the tissue layouts 'mixed', 'tumour', 'stroma',
'glandular', 'adipose'. With --tiles-per-class N, also writes a labelled tile set (one folder
per tissue type + labels.csv with a group column) for 'scratchpath import-tiles' and 'eval'.

examples:
  scratchpath synth --out synthetic --slides 4 --size 8000x6000
  scratchpath synth --out big --slides 1 --size 50000x50000      # scale test
  scratchpath synth --out labelled --slides 0 --tiles-per-class 200
"""


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected WIDTHxHEIGHT, e.g. 8000x6000"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic H&E slides and labelled tiles",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--slides", type=int, default=4, help="number of slides (default 4)")
    parser.add_argument(
        "--size", type=_size, default=(8000, 6000), help="slide WIDTHxHEIGHT in px (8000x6000)"
    )
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--tissue",
        default=None,
        help="one tissue layout for all slides: mixed, tumour, stroma, glandular, adipose "
        "(default: cycle through them)",
    )
    parser.add_argument(
        "--compression", choices=("jpeg", "zstd"), default="jpeg", help="tile codec (jpeg)"
    )
    parser.add_argument(
        "--tiles-per-class", type=int, default=0, help="also write N labelled tiles per type"
    )
    parser.add_argument("--tile-size", type=int, default=224, help="labelled tile size (224)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.synthetic import TISSUE_TYPES, write_slide, write_tile_set

    layouts = ("mixed", *TISSUE_TYPES)
    if args.tissue is not None and args.tissue not in layouts:
        raise ScratchpathError(f"--tissue: {args.tissue!r} is not one of {', '.join(layouts)}")
    if args.mpp <= 0:
        raise ScratchpathError(f"--mpp: must be positive, got {args.mpp}")
    if args.slides < 0 or args.tiles_per_class < 0:
        raise ScratchpathError("--slides/--tiles-per-class: must not be negative")
    width, height = args.size
    for i in range(args.slides):
        tissue = args.tissue or layouts[i % len(layouts)]
        path = args.out / "slides" / f"synthetic_{i:03d}_{tissue}.ome.tif"
        start = time.perf_counter()
        write_slide(path, width, height, mpp=args.mpp, tissue=tissue, seed=args.seed + i,
                    compression=args.compression)  # fmt: skip
        size_mb = path.stat().st_size / 1e6
        print(f"{path}: {width}x{height} px @ {args.mpp} µm/px, {tissue}, "
              f"{size_mb:.1f} MB in {time.perf_counter() - start:.1f} s")  # fmt: skip
    if args.tiles_per_class:
        labels = write_tile_set(args.out / "tiles", args.tiles_per_class, args.tile_size,
                                args.seed, mpp=args.mpp)  # fmt: skip
        n = args.tiles_per_class * len(TISSUE_TYPES)
        print(f"{labels}: {n} labelled tiles ({', '.join(TISSUE_TYPES)})")
    return 0
