"""``scratchpath export``: a training checkpoint -> a backbone folder others can load."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the backbone of a training checkpoint (safetensors + config + model card)",
        description=(
            "Write the backbone of a scratchpath training checkpoint to DIR, a timm / "
            "Hugging Face Hub model folder: model.safetensors (backbone weights only, with the "
            "exact keys of timm.create_model(ARCH, num_classes=0, **model_args)), config.json "
            "(timm's model config: architecture, model_args, pretrained_cfg with the "
            "preprocessing and µm/px; scratchpath's provenance under the 'scratchpath' key) and "
            "README.md (model card). Load it with scratchpath.load_backbone(DIR), "
            "timm.create_model('local-dir:DIR', pretrained=True), transformers "
            "AutoModel.from_pretrained(DIR) or kaiko's eva (see the card)."
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
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="also upload DIR to the Hugging Face Hub model repository REPO (user/name; created "
        "when missing; token from HF_TOKEN or `hf auth login`); then "
        "timm.create_model('hf-hub:REPO', pretrained=True) loads it",
    )
    parser.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create REPO as private"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.export import export_checkpoint, load_config, push_to_hub

    out = export_checkpoint(args.checkpoint, args.out, args.which, overwrite=args.overwrite)
    config = load_config(out)
    prov = config["scratchpath"]
    dim = prov.get("embedding_dim") or config["num_features"]
    print(
        f"exported {prov['weights']} {config['architecture']} "
        f"({dim}-d, {prov['objective']}, step {prov['global_step']}) to {out}",
        flush=True,
    )
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed {out} to the Hub: {url} (timm: 'hf-hub:{args.push_to_hub}')")
    return 0
