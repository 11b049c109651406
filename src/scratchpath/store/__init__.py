"""The zarr v3 patch store: tiles in shards, slide and tile tables, atomic per-slide commits.

Public: :class:`PatchStore` (read), :class:`StoreWriter` / :class:`SlideWriter` (write),
:class:`TileCodec`, :func:`import_tiles` (tile folders / CSVs -> store), ``STORE_FORMAT_VERSION``.
The layout is described in :mod:`scratchpath.store.layout`.
"""

from __future__ import annotations

from scratchpath.store.codecs import TileCodec, register_zarr_codecs
from scratchpath.store.layout import STORE_FORMAT_VERSION
from scratchpath.store.reader import PatchStore
from scratchpath.store.writer import SlideWriter, StoreWriter

__all__ = [
    "STORE_FORMAT_VERSION",
    "PatchStore",
    "SlideWriter",
    "StoreWriter",
    "TileCodec",
    "import_tiles",
    "register_zarr_codecs",
]


def __getattr__(name: str):
    # Lazy: importing tiles pulls in Pillow, which readers of a store do not need.
    if name == "import_tiles":
        from scratchpath.store.tiles_import import import_tiles

        return import_tiles
    raise AttributeError(f"module 'scratchpath.store' has no attribute {name!r}")
