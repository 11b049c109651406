"""``scratchpath compare``: models and baselines side by side on the same splits, with paired
statistics against a reference."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="several models and baselines on the same labelled splits, paired statistics",
        description=(
            "Probe every model (frozen features; linear probe and weighted kNN, as `eval`) on\n"
            "the same case-grouped, class-stratified splits of each labelled store, each model\n"
            "at its own input size and normalisation, and compare each to the reference: the\n"
            "mean difference of balanced accuracy with a 95 % interval over the paired splits\n"
            "(Nadeau-Bengio corrected t: repeated splits share tiles) and over test cases\n"
            "(case bootstrap), the splits it wins, and a plain sentence when the difference is\n"
            "within noise. Prints how each model's weights began (from scratch, or the file it\n"
            "was continued from). Writes DIR/compare.md (table: rows models, columns datasets),\n"
            "compare.csv, compare.json and compare.png.\n\n"
            "models (LABEL=SPEC or SPEC):\n"
            "  DIR                       an export folder (scratchpath export)\n"
            "  random:DIR                its random-init twins (--random-seeds of them)\n"
            "  random:TIMM_NAME[?k=v]    a random-init timm architecture (H&E normalisation)\n"
            "  timm:TIMM_NAME@FILE[?k=v] timm architecture + weights file (export folder,\n"
            "                            .safetensors, .pth/.bin read with weights_only=True),\n"
            "                            timm's preprocessing for it; ?input_size=PX overrides\n"
            "  histogram                 RGB + HSV colour histograms of the stored tile\n"
            "  histogram:rgb             RGB colour histograms only"
        ),
        epilog=(
            "examples:\n"
            "  scratchpath compare --data ebhi=stores/ebhi \\\n"
            "      --model scratch=runs/scratch/export continued=runs/continued/export \\\n"
            "          random=random:runs/scratch/export histogram \\\n"
            "      --reference scratch --random-seeds 3 --out runs/compare\n"
            "  scratchpath compare --data stores/ebhi stores/lung --model runs/a/export \\\n"
            "      imagenet=timm:resnet50@weights/resnet50_a1_0-14fe96d1.pth histogram:rgb \\\n"
            "      --reference histogram:rgb --out runs/compare"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", nargs="+", required=True, metavar="[LABEL=]SPEC", help="models and baselines"
    )
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="[LABEL=]STORE", help="labelled stores"
    )
    parser.add_argument(
        "--reference", metavar="LABEL", help="model every other is compared with (default: first)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    parser.add_argument(
        "--split", type=float, default=0.4, metavar="F", help="test fraction (default 0.4)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, metavar="N", help="grouped splits (default 5)"
    )
    parser.add_argument(
        "--group-column",
        default="group",
        metavar="COLUMN",
        help="tile column whose groups (patient, case) never straddle a split (default: group)",
    )
    parser.add_argument(
        "--random-seeds",
        type=int,
        default=1,
        metavar="N",
        help="random-init twins of each random: model (init seeds seed+1 ... seed+N; default 1)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, metavar="N", help="case-bootstrap replicates"
    )
    parser.add_argument("--k", type=int, default=20, metavar="N", help="kNN neighbours")
    parser.add_argument("--linear-epochs", type=int, default=100, metavar="N")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="split and probe seed")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.finetune.comparison import PROBES, compare

    comparison = compare(
        args.model,
        args.data,
        reference=args.reference,
        out_dir=args.out,
        test_fraction=args.split,
        repeats=args.repeats,
        group_column=args.group_column,
        random_seeds=args.random_seeds,
        k=args.k,
        linear_epochs=args.linear_epochs,
        seed=args.seed,
        n_boot=args.bootstrap,
        batch_size=args.batch_size,
        device=args.device,
    )
    for probe in PROBES:
        print()
        print(comparison.table(probe))
        print()
        for sentence in comparison.sentences(probe):
            print(f"- {sentence}")
    print()
    print(comparison.init_lines())
    print(f"\nreport: {args.out}/compare.md, compare.csv, compare.json, compare.png")
    return 0
