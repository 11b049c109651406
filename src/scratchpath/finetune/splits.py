"""Grouped, class-stratified train/test splits of labelled stores.

Labelled tile sets are often augmented copies (LC25000: ~20 rotated/flipped copies per original)
or many tiles per patient. A random split then leaks near-duplicates into the test set, so the
split here is by a *group* column of the store's tile table (patient, case, original tile): a
group is always entirely on one side.
"""

from __future__ import annotations

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore


def require_labels(store: PatchStore, name: str) -> np.ndarray:
    """The store's int64 labels; ScratchpathError if it is unlabelled or has < 2 classes."""
    if store.labels is None or len(store.class_names) < 2:
        raise ScratchpathError(f"{name}: {store.paths[0]} has no class labels (need >= 2)")
    if (store.labels < 0).any():
        raise ScratchpathError(f"{name}: {int((store.labels < 0).sum())} tiles have no label")
    return np.asarray(store.labels, dtype=np.int64)


def grouped_split(
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    test_fraction: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split tile indices into train/test so that no group is on both sides.

    Groups are visited in a seeded random order; each goes to the test side when that brings
    the per-class test counts closer to ``test_fraction`` of each class (a greedy stratified
    group split), else to train. Tiles with an empty group id count as their own group.

    Returns:
        ``(train_indices, test_indices)``, sorted int64 arrays.
    """
    if not 0 < test_fraction < 1:
        raise ScratchpathError(f"--split: test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups).astype(str)
    keys = np.where(groups == "", np.char.add("\0tile", np.arange(len(groups)).astype(str)), groups)
    unique, group_of = np.unique(keys, return_inverse=True)
    n_classes = int(labels.max()) + 1
    counts = np.zeros((len(unique), n_classes), np.int64)  # (G, C) tiles per group and class
    np.add.at(counts, (group_of, labels), 1)
    target = test_fraction * np.bincount(labels, minlength=n_classes)
    in_test = np.zeros(len(unique), bool)
    taken = np.zeros(n_classes)
    for g in np.random.default_rng(seed).permutation(len(unique)):
        after = taken + counts[g]
        if np.abs(target - after).sum() < np.abs(target - taken).sum():
            in_test[g] = True
            taken = after
    test_mask = in_test[group_of]
    train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if len(train) == 0 or len(test) == 0:
        raise ScratchpathError(
            f"--split: {len(unique)} groups cannot make both a train and a test side"
        )
    return train, test


def split_store(
    store: PatchStore, *, test_fraction: float, group_column: str = "group", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Grouped, class-stratified split of one labelled store (see :func:`grouped_split`)."""
    labels = require_labels(store, "--data")
    if group_column not in store.tiles:
        raise ScratchpathError(
            f"--group-column: {store.paths[0]} has no tile column {group_column!r} "
            f"(columns: {sorted(store.tiles)})"
        )
    groups = store.tile_column(group_column)  # "group" codes decoded to their names
    return grouped_split(labels, groups, test_fraction=test_fraction, seed=seed)
