"""Tiles to slides: every tissue tile of every slide embedded by a frozen export, one HDF5 file
per slide in the layout the MIL tools (TRIDENT, CLAM, ...) read.

- :func:`embed` (``scratchpath embed``): slides or stores + an export -> ``<out>/<slide>.h5``
  and ``<out>/manifest.json``; one GPU, every GPU of a node or many nodes; resumable;
- :func:`read_slide`, :func:`read_manifest`: read them back (``features`` memory-mapped).
"""

from __future__ import annotations

from scratchpath.embed.h5 import FORMAT, SlideEmbeddings, read_manifest, read_provenance, read_slide
from scratchpath.embed.run import EmbedReport, embed

__all__ = [
    "FORMAT",
    "EmbedReport",
    "SlideEmbeddings",
    "embed",
    "read_manifest",
    "read_provenance",
    "read_slide",
]
