"""µm-continuous views: each view's physical field of view is drawn from a range in µm.

For a store cut at several µm/px (``scratchpath ingest --mpp 0.25 0.5 1 2``), a sample is a
tissue location: a uniformly random point of the sampled (anchor) tile, in µm on its slide.
Each view of the sample then

1. draws its field of view ``F`` (µm) from its range (``global_microns`` for the first
   ``n_global`` views, ``local_microns`` for the others), uniform or log-uniform in µm, and a
   centre shift of at most ``max_shift * F / 2`` from the location (so the location lies in
   every view: all views of a sample show the same tissue);
2. takes the stored tile of the **finest** µm/px whose tile is at least ``F`` wide and holds the
   location (tiles of all µm/px are linked by slide and level-0 position), moving the window
   the least needed to lie inside that tile (the location stays inside); when no stored tile
   is ``F`` wide the coarsest one is used and ``F`` shrinks to its width;
3. is resampled from that window to its output size with ``torchvision.ops.roi_align``
   (``aligned=True``: continuous coordinates, so the field of view is exact rather than rounded
   to source pixels; adaptive sampling averages several source pixels per output pixel when it
   shrinks, like area downsampling), and records its µm/px ``F / size``.

The plan (which tile, which window) is made per sample with a generator seeded by
(seed, epoch, anchor tile), so it is deterministic and independent of workers and ranks. The
crops run batched (one ``roi_align`` per output size) either in the data workers or, with
``on_device=True``, on the training device from the source tiles (then only the distinct source
tiles of a batch travel to the device: at most ``B * min(views, magnifications)``).

Cost: the magnification index (:mod:`~scratchpath.data.fields.index`) is built once per store
state, vectorised (a stable sort of int64 keys per chunk of slides), and written into the
node-local table cache, where every rank and DataLoader worker memory-maps it (12 bytes per tile
on disk, shared; O(slides x magnifications) private per process). A batch costs O(B * V * K)
searchsorted look-ups for K magnifications, one ``store.read`` of its distinct source tiles and
one ``roi_align`` per output size; no host sync on the device path (boxes are computed on the
host with the batch and travel with it). ``benchmarks/bench_scale.py`` measures the build and
the memory at 10^7 and 10^8 tiles.

Modules: ``config`` (:class:`FieldsOfView`), ``index`` (:class:`MagnificationIndex`), ``plan``
(:func:`plan_fields`), ``crop`` (:func:`crop_fields`), ``dataset`` (:class:`FieldViewBatches`).
"""

from __future__ import annotations

from scratchpath.data.fields.config import FieldLaw, FieldsOfView
from scratchpath.data.fields.crop import crop_fields
from scratchpath.data.fields.dataset import FieldViewBatches
from scratchpath.data.fields.index import MagnificationIndex
from scratchpath.data.fields.plan import FieldPlan, plan_fields

__all__ = [
    "FieldLaw",
    "FieldPlan",
    "FieldViewBatches",
    "FieldsOfView",
    "MagnificationIndex",
    "crop_fields",
    "plan_fields",
]
