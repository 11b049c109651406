"""``scratchpath preview``: a PNG grid of store tiles beside the views a recipe makes of them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from scratchpath.errors import ScratchpathError

PAD = 4  # pixels between cells
HEADER = 20  # pixels of the caption row


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preview",
        help="write a PNG of store tiles beside the augmented views a recipe trains on",
        description=(
            "Draw N tiles of STORE (first column) beside the views the recipe's view generator\n"
            "makes of them (one column per view; for multi-crop the global crops first), after\n"
            "the device-side augmentations too (device_augment): what the model will see.\n"
            "The views come from data.init_args.views (or data.views) of a `scratchpath fit`\n"
            "recipe (--recipe), or from a view generator class with its defaults (--views)."
        ),
        epilog=(
            "examples:\n"
            "  scratchpath preview runs/store --recipe recipes/smoke_simclr.yaml --out grid.png\n"
            "  scratchpath preview runs/store --views MultiCrop --n 4 --seed 1 --out dino.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", nargs="+", metavar="STORE", help="patch store folder(s)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", metavar="YAML", help="LightningCLI recipe of `scratchpath fit`")
    source.add_argument(
        "--views",
        metavar="CLASS",
        help="view generator with default settings: TwoViews, MultiCrop, MAEView or a class path",
    )
    parser.add_argument("--out", required=True, metavar="PNG", help="image file to write")
    parser.add_argument("--n", type=int, default=8, help="number of tiles (rows; default 8)")
    parser.add_argument("--seed", type=int, default=0, help="picks the tiles and views (default 0)")
    parser.add_argument(
        "--device", default="cpu", help="torch device for the device-side augmentations (cpu)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from scratchpath.store import PatchStore

    if args.n < 1:
        raise ScratchpathError(f"--n: must be at least 1, got {args.n}")
    if args.recipe is not None:
        views = load_views_from_recipe(args.recipe)
    else:
        name = args.views if "." in args.views else f"scratchpath.views.{args.views}"
        views = instantiate_views({"class_path": name}, where="--views")
    store = PatchStore(*args.store)
    if len(store) == 0:
        raise ScratchpathError(f"{args.store[0]}: the store has no tiles")
    if getattr(views, "crop_microns", None) is not None and views.mpp is None:
        views.mpp = store.mpp  # crops in µm need the store's µm/px
    rng = np.random.default_rng(args.seed)
    indices = np.sort(rng.choice(len(store), size=min(args.n, len(store)), replace=False))
    tiles = store.read(indices)
    rows = preview_views(views, tiles, seed=args.seed, device=args.device)
    grid = draw_grid(tiles, rows)
    _save_png(grid, Path(args.out))
    print(f"wrote {args.out}: {len(tiles)} tiles x {len(rows[0])} views ({type(views).__name__})")
    return 0


def load_views_from_recipe(recipe: str | os.PathLike) -> Any:
    """The view generator configured under ``data.init_args.views`` (or ``data.views``)."""
    import yaml

    try:
        config = yaml.safe_load(Path(recipe).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScratchpathError(f"{recipe}: cannot read recipe ({type(err).__name__})") from err
    data = config.get("data") if isinstance(config, dict) else None
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        data = data["init_args"]
    views = data.get("views") if isinstance(data, dict) else None
    if views is None:
        raise ScratchpathError(f"{recipe}: no data.init_args.views section")
    return instantiate_views(views, where=f"{recipe}: data.views")


def instantiate_views(config: dict | str, where: str) -> Any:
    """Build a ViewGenerator from ``{class_path, init_args}`` with jsonargparse's type checks."""
    from jsonargparse import ArgumentParser

    from scratchpath.views import ViewGenerator

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--views", type=ViewGenerator, required=True)
    try:
        parsed = parser.parse_object({"views": config})
        return parser.instantiate(parsed).views
    except Exception as err:  # jsonargparse raises several types; all mean a bad config
        lines = [line.strip() for line in str(err).strip().splitlines()]
        # jsonargparse nests its reasons over lines, outermost first ("Parser key ...").
        reason = " ".join(lines[1:] or lines) or type(err).__name__
        raise ScratchpathError(f"{where}: {reason}") from err


def preview_views(
    views: Any, tiles: np.ndarray, *, seed: int, device: str = "cpu"
) -> list[list[np.ndarray]]:
    """Views of each tile (rows of (h, w, 3) uint8), device augmentations included."""
    import torch

    seeds = [seed * 1_000_003 + i for i in range(len(tiles))]  # per tile, on both paths
    views.resolve_device_augment(device)  # null in a recipe: what training on this device does
    if views.device_augment:  # the device path builds every view from the whole tiles
        batch = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).to(device)
        rngs = [np.random.default_rng(s) for s in seeds]
        params = torch.from_numpy(views.draw_params(rngs, tiles.shape[1:3])).to(device)
        made = views.device_views(batch, params)
    else:
        per_tile = []
        for tile, tile_seed in zip(tiles, seeds, strict=True):
            views.set_seed(tile_seed)
            per_tile.append(views(tile))
        batches = [torch.stack(column).to(device) for column in zip(*per_tile, strict=True)]
        made = views.on_device(batches)
    shown = [views.denormalize(x).cpu() for x in made]
    return [[b[i].permute(1, 2, 0).numpy() for b in shown] for i in range(len(tiles))]


def draw_grid(tiles: np.ndarray, rows: list[list[np.ndarray]]) -> np.ndarray:
    """White grid: a caption row, then per tile the original and its views (top-left aligned);
    each column as wide as its image, each row as tall as the tallest image."""
    from PIL import Image, ImageDraw

    widths = [tiles.shape[2]] + [v.shape[1] for v in rows[0]]
    row_height = max(tiles.shape[1], *(v.shape[0] for v in rows[0]))
    lefts = PAD + np.concatenate([[0], np.cumsum(np.array(widths) + PAD)[:-1]])
    width = PAD + sum(w + PAD for w in widths)
    height = HEADER + PAD + len(rows) * (row_height + PAD)
    grid = np.full((height, width, 3), 255, np.uint8)
    for r, (tile, views) in enumerate(zip(tiles, rows, strict=True)):
        top = HEADER + PAD + r * (row_height + PAD)
        for left, image in zip(lefts, [tile, *views], strict=True):
            grid[top : top + image.shape[0], left : left + image.shape[1]] = image
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    captions = ["original"] + [f"view {i + 1}" for i in range(len(rows[0]))]
    for left, text in zip(lefts, captions, strict=True):
        draw.text((int(left), 4), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def _save_png(image: np.ndarray, out: Path) -> None:
    from PIL import Image

    from scratchpath.files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
