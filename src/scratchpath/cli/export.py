"""``scratchpath export``: a training checkpoint -> a backbone folder others can load."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the backbone of a training checkpoint (safetensors + config + model card)",
        description=(
            "Write the backbone of a scratchpath training checkpoint to DIR: model.safetensors "
            "(backbone weights only, with the exact keys of timm.create_model(ARCH, "
            "num_classes=0, **kwargs)), config.json (architecture, preprocessing, µm/px, "
            "training provenance, a timm pretrained_cfg) and README.md (model card). Load it "
            "with scratchpath.load_backbone(DIR), plain timm or kaiko's eva (see the card)."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="Lightning checkpoint (.ckpt) of `fit`")
    parser.add_argument("--out", required=True, metavar="DIR", help="export folder to create")
    parser.add_argument(
        "--which",
        choices=("teacher", "student"),
        default=None,
        help="which backbone to export: the EMA teacher (DINO, MoCo v3) or the online student "
        "(default: the teacher when the checkpoint has one, else the student)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists and is not empty"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.export import export_checkpoint, load_config

    out = export_checkpoint(args.checkpoint, args.out, args.which, overwrite=args.overwrite)
    config = load_config(out)
    print(
        f"exported {config['weights']} {config['architecture']} "
        f"({config['num_features']}-d, {config['objective']}, step {config['global_step']}) "
        f"to {out}"
    )
    return 0
