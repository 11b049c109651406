"""Attention heatmaps: each tile's weight in a slide-level prediction, on the slide thumbnail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scratchpath.embed import SlideEmbeddings
from scratchpath.files import atomic_write


def attention_map(slide: SlideEmbeddings, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """``(h, w)`` float map at the thumbnail's resolution (NaN where no tile is), each tile's
    box holding its weight as a percentile rank in 0..1 (the contrast CLAM's heatmaps use: a
    few tiles taking most of the attention still show the runners-up), and its scale
    (level-0 px per map px)."""
    if slide.thumbnail is not None and slide.thumbnail_scale > 0:
        scale = slide.thumbnail_scale
        h, w = slide.thumbnail.shape[:2]
    else:  # no thumbnail: a blank canvas over the tiles
        extent = slide.coords.max(0) + slide.patch_size_level0
        scale = max(1.0, float(extent.max()) / 1024)
        w, h = int(np.ceil(extent[0] / scale)), int(np.ceil(extent[1] / scale))
    ranks = np.argsort(np.argsort(weights)) / max(len(weights) - 1, 1)  # (N,) in 0..1
    heat = np.full((h, w), np.nan, np.float32)
    size = slide.patch_size_level0 / scale
    for (x, y), value in zip(slide.coords / scale, ranks, strict=True):
        x0, y0 = round(x), round(y)
        x1, y1 = max(x0 + 1, round(x + size)), max(y0 + 1, round(y + size))
        heat[y0:y1, x0:x1] = value
    return heat, scale


def plot_attention(slide: SlideEmbeddings, weights: np.ndarray, path: Path, title: str) -> Path:
    """Write the thumbnail with the attention map over it (and the thumbnail alone beside)."""
    heat, _ = attention_map(slide, np.asarray(weights, np.float64))
    background = (
        slide.thumbnail if slide.thumbnail is not None else np.full((*heat.shape, 3), 255, np.uint8)
    )
    aspect = heat.shape[1] / heat.shape[0]
    fig = Figure(figsize=(2 * 4.5 * aspect + 1.2, 4.8), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.imshow(background)
    left.set_title("slide")
    right.imshow(background)
    shown = right.imshow(np.ma.masked_invalid(heat), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    right.set_title("ABMIL attention (percentile)")
    fig.colorbar(shown, ax=right, fraction=0.04)
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
