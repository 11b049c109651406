"""View generators: the random views an SSL objective sees of each tile.

Two interchangeable paths build the views, from one parameter draw
(:mod:`~scratchpath.views.params`, in the data-loader worker, seeded per (seed, epoch, tile)):

* **CPU path** (``device_augment=False``): a data-loader worker turns each (H, W, 3) uint8 tile
  into a list of (3, h, w) uint8 views with albumentations' operations at the drawn parameters
  (``__call__``), and ``on_device`` only normalises the collated (B, 3, h, w) batches on the
  training device.
* **Device path** (``device_augment=True``): workers only read tiles (for JPEG stores: their
  encoded bytes; the data module decodes them batched on the device with nvJPEG) and draw the
  parameters, a (V, B, 17) float32 array pinned with the batch; ``device_views`` builds every
  view of a batch on the training device: the crops of all views of one size in one
  ``grid_sample`` (D4 folded into the sampling grid), then HED jitter, brightness/contrast,
  gamma, blur, grayscale and solarisation batched, without any device-to-host synchronisation.

For the same tile, seed and epoch both paths make the same views up to rounding (the CPU path
rounds to uint8 after each operation; ``tests/test_views.py`` checks it pixel by pixel).
``device_augment=None`` (the default) means "device path on a GPU, CPU path on a CPU": the data
module resolves it from the trainer's device (:meth:`ViewGenerator.resolve_device_augment`). On
a CPU the CPU path is faster per core: ``benchmarks/bench_input.py`` prints both.

Modules: :mod:`~scratchpath.views.config` (per-view settings), :mod:`~scratchpath.views.params`
(the draw), :mod:`~scratchpath.views.apply` (each path's application of a drawn row),
:mod:`~scratchpath.views.base` (``ViewGenerator``), :mod:`~scratchpath.views.kinds` (the
generators). Constructor arguments are plain typed values so that a LightningCLI recipe sets
them, e.g.::

    views:
      class_path: scratchpath.views.TwoViews
      init_args: {output_size: 224, crop_scale: [0.2, 1.0], stain: hed, hed_strength: 0.1}
"""

from __future__ import annotations

from scratchpath.views.base import ViewGenerator
from scratchpath.views.kinds import MAEView, MultiCrop, TwoViews

__all__ = ["MAEView", "MultiCrop", "TwoViews", "ViewGenerator"]
