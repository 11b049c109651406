"""``scratchpath embed``: slides or stores + an export -> an HDF5 file of embeddings per slide."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Embed every tissue tile of every slide with an exported backbone and write one HDF5 file per
slide, OUT/<slide>.h5, in the layout TRIDENT, CLAM and other MIL tools read: `features` (N, D),
`coords` (N, 2, level-0 px) with patch_size, patch_size_level0, level0_magnification,
target_magnification and the µm/px; plus the tissue fraction of each tile, a thumbnail, and
the provenance (export sha256, input size, normalisation, precision, tiling) that a rerun
checks before reusing a file. OUT/manifest.json lists the slides; OUT/thumbnails/ shows the
tissue mask and the tiles kept.

Tiles are cut exactly as `scratchpath ingest` cuts them (same tissue mask, level at or just
finer than --mpp, area-downsampled unless within 5 %), without writing a store, then resized
to the export's input size and normalised with its mean/std. Patch stores may be given instead
of slides (their tiles, one file per slide of the store).

Fast where the usual tools wait on their reader: worker threads read ahead of the GPU; where
the level read is stored as JPEG tiles (SVS, most pyramidal TIFFs, DICOM) their bytes go to
the GPU's JPEG decoder undecoded (checked against the CPU reader on one tile of the first
slide of each kind) and tiles are cut and resampled there; other levels (JPEG 2000, NDPI) are
read on the CPU.

Several GPUs: start one process per GPU with torchrun or srun; slides are split between the
processes (sorted, every N-th), each uses cuda:LOCAL_RANK, and the last to finish writes the
manifest. Re-running the same command skips finished slides; a killed run leaves no partial
file. A bad slide is reported on one line and the others continue; the exit status is then 1."""

EPILOG = """\
examples:
  scratchpath embed slides/ --model exports/dino_vits16 --out embeddings/
  scratchpath embed slides/ --model EXPORT --out emb/ --mpp 0.5 --tile-size 224 --fp16
  torchrun --nproc_per_node 8 -m scratchpath embed slides/ --model EXPORT --out emb/
  srun --ntasks-per-node 4 --gpus-per-task 1 scratchpath embed slides/ --model EXPORT --out emb/
  scratchpath embed cohort.zarr --model EXPORT --out emb/        # tiles of an existing store
then: scratchpath eval --slides labels.csv --model EXPORT --embeddings emb/ --out report/

exit status: 0 all slides embedded or already done, 1 some slides failed, 2 bad usage."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed every tissue tile of slides with an export (HDF5 per slide, for MIL)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="SLIDES_OR_STORES",
        help="slide files / folders of them, or patch stores",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="export folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the .h5 files")
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="X",
        help="µm/px of the tiles (default: the export's training µm/px)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        metavar="N",
        help="tile edge at --mpp (default: the export's training tile size)",
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        metavar="F",
        help="keep tiles with at least this tissue fraction (0.5)",
    )
    parser.add_argument(
        "--assume-mpp", type=float, metavar="X", help="µm/px of level 0 for slides that record none"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, metavar="N", help="tiles per forward pass (128)"
    )
    parser.add_argument(
        "--workers", type=int, default=4, metavar="N", help="reader threads per process (4)"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda:LOCAL_RANK when there is a GPU)"
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="forward-pass precision (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--fp16", action="store_true", help="store features as float16")
    parser.add_argument(
        "--decode",
        choices=("auto", "device", "cpu"),
        default="auto",
        help="where stored JPEG tiles are decoded (auto: on the GPU when used)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="re-embed files made with another encoder or tiling",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.embed import embed

    report = embed(
        args.inputs,
        args.model,
        args.out,
        mpp=args.mpp,
        tile_size=args.tile_size,
        min_tissue=args.min_tissue,
        assume_mpp=args.assume_mpp,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        features_dtype="float16" if args.fp16 else "float32",
        decode=args.decode,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0 if report.ok else 1
