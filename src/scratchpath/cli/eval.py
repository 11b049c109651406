"""``scratchpath eval``: kNN and linear probe of a backbone on labelled stores, with baselines."""

from __future__ import annotations

import argparse
from typing import Any

from scratchpath.errors import ScratchpathError


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """``["img_size=64", "patch_size=8", "dynamic_img_size=true"]`` -> typed dict (YAML values)."""
    from scratchpath.finetune.models import parse_key_values  # torch: only when eval runs

    return parse_key_values(items, "--model-kwargs")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="kNN + linear probe of a backbone on labelled stores, next to two baselines",
        description=(
            "Embed labelled tiles with a backbone and evaluate the frozen features by weighted\n"
            "kNN (k=20, as in DINO) and a linear probe. The same run evaluates two baselines:\n"
            "the same architecture randomly initialised (--random-seeds N: the mean of N\n"
            "inits), and colour histograms (RGB + HSV).\n"
            "Writes DIR/metrics.json (accuracy, balanced accuracy, macro-F1, per-class\n"
            "precision/recall/F1, the tile indices of each side), DIR/confusion_matrix.png,\n"
            "DIR/embedding_pca.png, and prints a table. Tiles are resized (bilinear,\n"
            "antialiased) to the model's input size (what it was trained at) when it differs\n"
            "from the store's tile size."
        ),
        epilog=(
            "examples:\n"
            "  scratchpath eval --model exports/dino_vits --train tr.zarr --test te.zarr --out ev\n"
            "  scratchpath eval --model random:vit_tiny_patch16_224 --model-kwargs img_size=64 \\\n"
            "      --data lung.zarr --split 0.3 --group-column group --out ev\n"
            "  scratchpath eval --model runs/cpu_pretrain/export --data ebhi.zarr --split 0.4 \\\n"
            "      --repeats 5 --group-column case_id --random-seeds 3 --out ev\n"
            "      # mean of 5 grouped 60/40 splits; random_init the mean of 3 twins\n"
            "  scratchpath eval --slides cohort/labels.csv --model EXPORT --repeats 5 --out ev\n"
            "      # slide level: embeds the slides (or reuses --embeddings), ABMIL vs mean pool"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR|random:TIMM_NAME|timm:TIMM_NAME@FILE",
        help="an export folder (scratchpath export), random:NAME for a random-init timm model, "
        "or timm:NAME@FILE for a timm model started from a weights file (see compare --help)",
    )
    parser.add_argument(
        "--model-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="timm kwargs of a random:NAME model, values in YAML (img_size=64 patch_size=8)",
    )
    data = parser.add_argument_group("data (either --train and --test, or --data)")
    data.add_argument("--train", metavar="STORE", help="labelled store to fit the probes on")
    data.add_argument("--test", metavar="STORE", help="labelled store to evaluate on")
    data.add_argument("--data", metavar="STORE", help="one labelled store, split into train/test")
    data.add_argument(
        "--split",
        type=float,
        default=0.3,
        metavar="F",
        help="test fraction of --data (default 0.3)",
    )
    data.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="split --data N times (seeds SEED..SEED+N-1) and report the mean ± std (default 1)",
    )
    data.add_argument(
        "--group-column",
        default="group",
        metavar="COLUMN",
        help="tile column whose groups (patient, original tile) never straddle the split "
        "(default: group); tiles with an empty group are split individually",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    parser.add_argument(
        "--input-size",
        type=int,
        metavar="PX",
        help="resize tiles to PX (default: the model's input size, i.e. what an export was "
        "trained at; a random:NAME CNN without img_size sees the tiles as stored)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="tiles per forward pass"
    )
    parser.add_argument(
        "--k", type=int, default=20, metavar="N", help="neighbours of the kNN (default 20)"
    )
    parser.add_argument(
        "--linear-epochs",
        type=int,
        default=100,
        metavar="N",
        help="linear-probe epochs (default 100)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="split, init and probe seed"
    )
    parser.add_argument(
        "--random-seeds",
        type=int,
        default=1,
        metavar="N",
        help="random-init twins (init seeds seed+1 ... seed+N) whose mean ± std is the "
        "random_init baseline (default 1; one init can land several points off another)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    _add_slide_arguments(parser)
    parser.set_defaults(run=run)


def _add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    slides = parser.add_argument_group(
        "slide level (--slides): ABMIL vs mean pooling on tile embeddings (scratchpath embed)"
    )
    slides.add_argument(
        "--slides",
        metavar="LABELS_CSV",
        help="CSV with slide (file, relative to the CSV, or slide id), label and optional "
        "patient columns; uses --split, --repeats (patient-grouped), --seed, --device",
    )
    slides.add_argument(
        "--embeddings",
        metavar="DIR",
        help="embedding files (scratchpath embed); slides missing there are embedded with "
        "--model first (default: OUT/embeddings)",
    )
    slides.add_argument(
        "--mil-epochs", type=int, default=100, metavar="N", help="MIL epochs (100; eva's)"
    )
    slides.add_argument(
        "--heatmaps",
        type=int,
        default=8,
        metavar="N",
        help="attention heatmaps of the first N test slides, positives first (8)",
    )


def _run_slides(args: argparse.Namespace) -> int:
    from scratchpath.finetune.mil import TrainConfig
    from scratchpath.finetune.slides import format_slide_table, run_slide_evaluation
    from scratchpath.weights import config_init, describe_init, load_config

    if args.data or args.train or args.test:
        raise ScratchpathError("--slides: give --slides or --data/--train/--test, not both")
    if args.model.startswith(("random:", "timm:")):
        raise ScratchpathError("--slides: --model must be an export folder (it embeds slides)")
    # how the encoder's weights began, as tile-level eval and compare say it
    init = config_init(load_config(args.model))
    metrics = run_slide_evaluation(
        args.slides,
        args.out,
        embeddings=args.embeddings,
        model=args.model,
        embed_kwargs={"device": args.device, "progress": False},
        test_fraction=args.split,
        repeats=args.repeats,
        config=TrainConfig(epochs=args.mil_epochs),
        seed=args.seed,
        heatmaps=args.heatmaps,
        device=args.device,
    )
    print(f"model init: {describe_init(init)}")
    print(format_slide_table(metrics))
    shown = f", heatmaps/ ({len(metrics['heatmaps'])})" if metrics["heatmaps"] else ""
    print(f"report: {args.out}/slide_metrics.json{shown}")
    return 0


def run(args: argparse.Namespace) -> int:
    from scratchpath.finetune.report import format_table, run_evaluation
    from scratchpath.weights import describe_init

    if args.slides is not None:
        return _run_slides(args)
    if args.data is not None and (args.train or args.test):
        raise ScratchpathError("--data: use either --data or --train/--test, not both")
    if args.data is None and not (args.train and args.test):
        raise ScratchpathError("--train/--test: both are needed (or one store with --data)")
    metrics = run_evaluation(
        args.model,
        args.out,
        train=args.train,
        test=args.test,
        data=args.data,
        test_fraction=args.split,
        repeats=args.repeats,
        group_column=args.group_column,
        model_kwargs=parse_kwargs(args.model_kwargs),
        input_size=args.input_size,
        batch_size=args.batch_size,
        k=args.k,
        linear_epochs=args.linear_epochs,
        seed=args.seed,
        random_seeds=args.random_seeds,
        device=args.device,
    )
    repeats = (metrics["split"] or {}).get("repeats", 1)
    print(
        f"{metrics['train']['n_tiles']} train / {metrics['test']['n_tiles']} test tiles"
        f"{f' (first of {repeats} grouped splits; figures are means)' if repeats > 1 else ''}, "
        f"{len(metrics['class_names'])} classes, input {metrics['input_size'] or 'as stored'} px"
    )
    print(f"model init: {describe_init(metrics.get('init'))}")
    print(format_table(metrics))
    if args.random_seeds > 1:
        seeds = metrics["random_init_seeds"]
        print(
            f"random_init: mean ± std over {len(seeds)} twins (init seeds {seeds[0]}-{seeds[-1]})"
        )
    print(f"report: {args.out}/metrics.json, confusion_matrix.png, embedding_pca.png")
    return 0
