"""Slides -> tissue tiles at a target µm/px -> a patch store (``scratchpath ingest``).

Per slide: take its fast identity (size, mtime and the sha256 of its first and last MiB: a
rerun skips a committed slide on that alone, without reading it), open it, build a thumbnail
and its tissue mask, lay a grid of non-overlapping tiles over the pyramid level at or just
finer than the target µm/px, keep tiles whose tissue fraction reaches ``min_tissue``, read
them, downsample with area averaging (skipped when the level is within 5 % of the target) and
encode them with the store's codec. The full sha256 of the file is computed once, by a pool
job that runs beside the slide's tile reads (not in a separate pass before them), and recorded
with the slide. Planning and tile reading/encoding run in worker processes (``workers``); the
main process alone writes, one slide at a time, and commits each slide atomically, so a killed
run resumes where it stopped and never duplicates tiles.

Several target µm/px (``mpp=(0.25, 0.5, 1, 2)``) are cut in the same pass over each slide: one
open, one thumbnail and tissue mask, then one grid per µm/px (each read from its own nearest
finer level, tissue-filtered on its own tile boxes), all committed with the slide. Every tile
records its level-0 corner, so tiles of different µm/px are linked by slide and position. A
µm/px finer than a slide's level 0 is left out for that slide (noted in its record).

Cost per slide is independent of how many slides came before: a commit writes only its own
tiles' table bytes, and each slide's outcome is one line appended to ``<out>/run.log.jsonl``
(``<out>/run.json`` is written at the start and the end of a run).

One module per job: ``identity`` (which slides, shards, fast and full identities), ``plan``
(open, mask, grid: one slide in a worker), ``tiles`` (region reads and area downsampling, shared
with ``embed``), ``run`` (:func:`ingest`: the pool and the one writer).
"""

from scratchpath.ingest.identity import (
    fast_id,
    find_slides,
    select_shard,
    slide_files,
    slide_sha256,
)
from scratchpath.ingest.plan import (
    Grid,
    SlidePlan,
    TilingOptions,
    plan_slide,
    render_thumbnail,
    tile_grid,
    tile_grids,
)
from scratchpath.ingest.run import IngestReport, InlineExecutor, SlideOutcomes, ingest
from scratchpath.ingest.tiles import iter_tiles, level_corners, read_tiles

__all__ = [
    "Grid",
    "IngestReport",
    "InlineExecutor",
    "SlideOutcomes",
    "SlidePlan",
    "TilingOptions",
    "fast_id",
    "find_slides",
    "ingest",
    "iter_tiles",
    "level_corners",
    "plan_slide",
    "read_tiles",
    "render_thumbnail",
    "select_shard",
    "slide_files",
    "slide_sha256",
    "tile_grid",
    "tile_grids",
]
