"""``scratchpath info``: what a patch store holds, or what a slide file holds."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="summarise patch stores (tiles, classes, µm/px, ...) or slides (levels, µm/px)",
        description=(
            "Print a summary of each patch store: slides (ok / failed), tiles, classes with "
            "tile counts, µm/px, tile size, codec, stored bytes per tile, format version and "
            "content fingerprint. With several stores, also the summary of them opened as one. "
            "A slide file (SVS, NDPI, DICOM, MRXS, ...; a DICOM folder with --slide) prints its "
            "vendor, the backend that reads it, its µm/px and where that came from, and its "
            "levels with their size, downsample and µm/px."
        ),
    )
    parser.add_argument(
        "stores", nargs="+", metavar="STORE_OR_SLIDE", help="store folder or URL, or slide file"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--slide", action="store_true", help="read every path as a slide (e.g. a DICOM folder)"
    )
    parser.add_argument(
        "--assume-mpp",
        type=float,
        metavar="X",
        help="µm per pixel of level 0 for a slide that records none",
    )
    parser.set_defaults(run=run)


def summarise(store) -> dict:
    """The summary of a :class:`~scratchpath.store.PatchStore` as a JSON-ready dict."""

    def key(slide: dict) -> str:  # failed slides carry a fast identity but no full sha256
        return slide.get("fast_id") or slide["sha256"] or slide.get("source", "")

    ok = {key(s) for s in store.slides if s["status"] == "ok"}
    # A slide that failed and later succeeded (a resumed run) counts as ok only.
    failed = {key(s) for s in store.slides if s["status"] == "failed"} - ok
    n = len(store)
    classes = {}
    if store.labels is not None:
        counts = Counter(store.labels.tolist())
        classes = {name: counts.get(k, 0) for k, name in enumerate(store.class_names)}
    stored = store.storage_bytes()
    return {
        "paths": store.paths,
        "slides": len(ok) + len(failed),
        "slides_ok": len(ok),
        "slides_failed": len(failed),
        "tiles": n,
        "classes": classes,
        "unlabelled_tiles": int((store.labels < 0).sum()) if store.labels is not None else n,
        "mpp": store.mpp,
        "tiles_per_mpp": tiles_per_mpp(store.tiles["mpp"]),
        "tile_size": store.tile_size,
        "codec": store.codec,
        "bytes_per_tile": round(stored / n, 1) if n else None,
        "compression_ratio": round(n * store.tile_size**2 * 3 / stored, 2) if stored else None,
        "format_version": store.format_version,
        "fingerprint": store.fingerprint,
    }


def tiles_per_mpp(mpp: np.ndarray) -> dict[str, int]:
    """Tiles per µm/px, the µm/px rounded to 2 significant digits (so that 0.499 and 0.5 µm/px
    tiles of slides scanned at slightly different scales count together), finest first."""
    if len(mpp) == 0:
        return {}
    values, counts = np.unique(np.asarray(mpp, np.float64), return_counts=True)
    grouped: Counter = Counter()
    for value, count in zip(values, counts, strict=True):
        grouped[float(f"{value:.2g}")] += int(count)
    return {f"{m:g}": grouped[m] for m in sorted(grouped)}


def _text(summary: dict) -> str:
    if summary.get("combined") is False:
        return f"not combinable as one dataset: {summary['reason']}"
    lines = [] if not summary.get("combined") else ["all stores opened as one:"]
    lines += [
        f"store          {', '.join(summary['paths'])}",
        f"slides         {summary['slides']} ({summary['slides_ok']} ok, "
        f"{summary['slides_failed']} failed)",
        f"tiles          {summary['tiles']}",
    ]
    if summary["classes"]:
        lines.append(f"classes        {len(summary['classes'])}")
        width = max(len(c) for c in summary["classes"])
        lines += [f"  {c:<{width}}  {k}" for c, k in summary["classes"].items()]
    else:
        lines.append("classes        none (unlabelled)")
    mpp = summary["mpp"]
    per_mpp = summary.get("tiles_per_mpp", {})
    if len(per_mpp) > 1:
        lines.append(f"µm/px          {len(per_mpp)} magnifications")
        lines += [f"  {m:>6} µm/px  {n} tiles" for m, n in per_mpp.items()]
    else:
        lines.append(f"µm/px          {'unknown or mixed' if mpp is None else f'{mpp:.4g}'}")
    lines += [
        f"tile size      {summary['tile_size']}",
        f"codec          {summary['codec']}",
        f"bytes/tile     {summary['bytes_per_tile']} ({summary['compression_ratio']}x smaller "
        "than raw)",
        f"format         {summary['format_version']}",
        f"fingerprint    {summary['fingerprint']}",
    ]
    return "\n".join(lines)


def _slide_text(info: dict) -> str:
    lines = [
        f"slide          {info['path']}",
        f"vendor         {info['vendor']}",
        f"backend        {info['backend']}",
        f"µm/px          {info['mpp']:.4g} ({info['mpp_source']})",
        f"levels         {len(info['levels'])}",
        "  level  width x height  downsample  µm/px",
    ]
    for lv in info["levels"]:
        size = f"{lv['width']} x {lv['height']}"
        lines.append(f"  {lv['index']:>5}  {size:>14}  {lv['downsample']:>10.4g}  {lv['mpp']:.4g}")
    return "\n".join(lines)


def _is_slide(path: str) -> bool:
    from pathlib import Path

    return "://" not in path and Path(path).is_file()


def run(args: argparse.Namespace) -> int:
    from scratchpath.errors import ScratchpathError
    from scratchpath.slides import open_slide
    from scratchpath.store import PatchStore

    slide_paths = [p for p in args.stores if args.slide or _is_slide(p)]
    slides = []
    for path in slide_paths:
        with open_slide(path, assume_mpp=args.assume_mpp) as slide:
            slides.append(slide.describe())
    if len(slide_paths) == len(args.stores):
        if args.json:
            print(json.dumps(slides if len(slides) > 1 else slides[0], indent=2))
        else:
            print("\n\n".join(_slide_text(s) for s in slides))
        return 0
    if slides and not args.json:
        print("\n\n".join(_slide_text(s) for s in slides), end="\n\n")
    stores = [PatchStore(path) for path in args.stores if path not in slide_paths]
    args.stores = [path for path in args.stores if path not in slide_paths]
    summaries = [summarise(s) for s in stores]
    if len(stores) > 1:
        try:
            summaries.append({"combined": True, **summarise(PatchStore(*args.stores))})
        except ScratchpathError as err:  # e.g. different class names: still show each store
            summaries.append({"combined": False, "reason": str(err)})
    if args.json:
        everything = slides + summaries
        print(json.dumps(everything if len(everything) > 1 else everything[0], indent=2))
    else:
        print("\n\n".join(_text(s) for s in summaries))
    return 0
