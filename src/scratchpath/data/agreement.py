"""One committed state of the stores for every rank of a run.

Each rank opens the stores itself, possibly a moment after an ingest committed another slide,
and ranks that see different tile counts plan different numbers of batches: one takes an extra
step and the others hang in its collective. :func:`agree_on_stores` runs once at set-up: rank 0
broadcasts its state (per store: committed slide count and state digest), every other rank
reopens its stores at exactly that state (a prefix of what it sees, since writers only append),
and all ranks compare fingerprint and tile count in one ``all_gather``. A rank that cannot open
that state, or sees other content (e.g. another copy of the store on its node), makes *every*
rank raise the same one-line :class:`~scratchpath.errors.ScratchpathError`: nobody is left
waiting in a collective. Cost: two small collectives and O(slides) hashing per rank.
"""

from __future__ import annotations

import torch

from scratchpath.distributed import rank_and_world_size
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore


def agree_on_stores(store: PatchStore) -> PatchStore:
    """``store`` at rank 0's committed state on every rank (see the module docstring); the
    store itself when there is no process group of several ranks."""
    rank, world = rank_and_world_size()
    if world == 1:
        return store
    dist = torch.distributed
    box = [store.state if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    state = tuple(tuple(s) for s in box[0])
    seen, problem = None, ""
    try:
        if store.state != state:
            store = PatchStore(*store.paths, state=state)
        seen = (store.fingerprint, len(store))
    except ScratchpathError as err:
        problem = str(err)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (seen, problem))
    for other, (_, err) in enumerate(everyone):
        if err:
            raise ScratchpathError(
                f"stores: rank {other} cannot open the committed state rank 0 opened: {err}"
            )
    if len({theirs for theirs, _ in everyone}) > 1:
        detail = "; ".join(
            f"rank {r}: fingerprint {fp}, {n} tiles" for r, ((fp, n), _) in enumerate(everyone)
        )
        raise ScratchpathError(
            f"stores: the ranks see different stores ({detail}); every node must read the "
            "same store files"
        )
    return store
