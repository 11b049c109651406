"""``scratchpath info``: what a patch store holds."""

from __future__ import annotations

import argparse
import json
from collections import Counter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="summarise patch stores (slides, tiles, classes, µm/px, codec, fingerprint)",
        description=(
            "Print a summary of each patch store: slides (ok / failed), tiles, classes with "
            "tile counts, µm/px, tile size, codec, stored bytes per tile, format version and "
            "content fingerprint. With several stores, also the summary of them opened as one."
        ),
    )
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store folder or URL")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
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
        "tile_size": store.tile_size,
        "codec": store.codec,
        "bytes_per_tile": round(stored / n, 1) if n else None,
        "compression_ratio": round(n * store.tile_size**2 * 3 / stored, 2) if stored else None,
        "format_version": store.format_version,
        "fingerprint": store.fingerprint,
    }


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
    lines += [
        f"µm/px          {'unknown or mixed' if mpp is None else f'{mpp:.4g}'}",
        f"tile size      {summary['tile_size']}",
        f"codec          {summary['codec']}",
        f"bytes/tile     {summary['bytes_per_tile']} ({summary['compression_ratio']}x smaller "
        "than raw)",
        f"format         {summary['format_version']}",
        f"fingerprint    {summary['fingerprint']}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from scratchpath.errors import ScratchpathError
    from scratchpath.store import PatchStore

    stores = [PatchStore(path) for path in args.stores]
    summaries = [summarise(s) for s in stores]
    if len(stores) > 1:
        try:
            summaries.append({"combined": True, **summarise(PatchStore(*args.stores))})
        except ScratchpathError as err:  # e.g. different class names: still show each store
            summaries.append({"combined": False, "reason": str(err)})
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
    else:
        print("\n\n".join(_text(s) for s in summaries))
    return 0
