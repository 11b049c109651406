"""Which tiles each rank reads in an epoch, and in which order: DDP-correct, seeded, resumable.

An epoch is planned on tile *indices* only (no pixels are touched), in four steps, with
O(slides + shards) memory per rank whatever the options (no per-tile array: see
:mod:`~scratchpath.data.sampling.units`):

1. **pool** — tiles with ``tissue_fraction >= min_tissue`` (fixed for the run; one bit per tile).
2. **slide balance** (``max_tiles_per_slide=K``) — per slide, a fresh random subset of at most
   ``K`` tiles each epoch, so that slides with many tiles do not dominate an epoch while all of
   their tiles are still seen over several epochs (each tile kept with probability ``K / c``
   for a slide of ``c`` tiles; the subset is stratified over the slide's shards).
2b. **magnification weights** (``mpp_weights={0.25: 1, 0.5: 2, ...}``) — for stores cut at
   several µm/px: each epoch holds about ``w_m / sum(w) * n`` tiles of µm/px ``m`` (``n`` the
   tiles after step 2), a fresh random subset of that magnification's tiles (repeating them only
   when the weight asks for more than it has); tiles of a µm/px with no weight are not sampled.
   A tile's µm/px is matched to the nearest weighted one within 10 %.
3. **order**, by ``shuffle`` (:mod:`~scratchpath.data.sampling.order`):

   - ``"tile"``: a random permutation of the epoch's tiles. Best mixing (a batch draws from the
     whole store: ~all of its tiles from different slides), at the price of one small random
     read per tile, each from another shard file. Fine on a local disk or SSD; on a parallel
     (Lustre, GPFS) or network file system with more shards than the reader keeps open (128
     per process), nearly every tile costs an ``open``, an ``fstat`` and an index read: a
     metadata storm at 10^5 tiles/s. Up to ``EXACT_SHUFFLE_TILES`` tiles it is a uniform
     permutation; above, a *blocked* permutation that never materialises (consecutive positions
     visit randomly ordered blocks of ~4096 tiles, a fresh block order per row, each block in
     its own random affine order).
   - ``"shard"``: the epoch's shards (units) are visited in a random order, each read in one
     go, and that stream is shuffled in windows of whole shards: about ``shuffle_buffer``
     tiles, never more than 64 shard files (half of the 128 a reader keeps open), each window
     a uniform permutation from its own seed. A reader then opens each shard file once per
     window: measured by ``benchmarks/bench_scale.py`` at 10^5 shard files with 4 workers,
     0.0067 opens per tile against 1.84 for ``"tile"``, at the price of fewer slides per batch
     (63 per batch of 256 with the default 65,536-tile windows, against 254; 4 with 4,096).
     The cluster recipes use it; use ``"tile"`` when the store sits on local disk.
4. **split** — the epoch order is cut into ``world_size`` contiguous parts of
   ``n_batches * batch_size`` tiles (contiguous keeps shard locality per rank). With
   ``drop_last=True`` the at most ``world_size * batch_size - 1`` leftover tiles are skipped (a
   different random set each epoch); with ``drop_last=False`` the order is padded by repeating its
   first tiles. Either way every rank gets exactly the same number of *full* batches, so no rank
   ever waits in a collective for a batch that another rank does not have.

The order is a *function* from epoch position to tile index, evaluated batch by batch as the
loader asks: no rank ever holds the 10^8-entry order of an epoch, and skipping consumed batches
on resume costs nothing. The plan depends only on (seed, epoch, world size, batch size, the
store's tile table), so every rank computes its own share with no communication, and a resumed
run recomputes the same plan and skips the batches it already consumed
(:meth:`DistributedBatchSampler.resume`).
"""

from __future__ import annotations

from scratchpath.data.sampling.sampler import (
    BatchRequest,
    DistributedBatchSampler,
    ShuffleMode,
    sample_seed,
)

__all__ = ["BatchRequest", "DistributedBatchSampler", "ShuffleMode", "sample_seed"]
