"""``FieldsOfView``: how each view's physical field of view is drawn (a typed data argument)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from scratchpath.errors import ScratchpathError

FieldLaw = Literal["uniform", "log-uniform"]


class FieldsOfView:
    """How views' physical fields of view are drawn (a typed argument of ``PatchDataModule``).

    Args:
        global_microns: (min, max) field of view in µm of the first ``n_global`` views.
        local_microns: (min, max) field of view in µm of the other ``n_local`` views.
        n_global, n_local: number of views of each kind (match the view generator: e.g. DINO's
            2 global + 10 local crops, MAE's 1 view).
        global_size, local_size: output edge in px of each kind.
        law: ``"log-uniform"`` (each octave of field of view equally likely; the default) or
            ``"uniform"`` in µm.
        max_shift: a view's centre moves at most ``max_shift * F / 2`` from the sample's
            location (< 1 keeps the location inside every view).
        on_device: crop on the training device from the source tiles (True) or in the data
            workers (False).
    """

    def __init__(
        self,
        global_microns: tuple[float, float] = (64.0, 224.0),
        local_microns: tuple[float, float] = (16.0, 64.0),
        n_global: int = 2,
        n_local: int = 0,
        global_size: int = 224,
        local_size: int = 96,
        law: FieldLaw = "log-uniform",
        max_shift: float = 0.25,
        on_device: bool = False,
    ) -> None:
        for name, (low, high) in (("global_microns", global_microns),
                                  ("local_microns", local_microns)):  # fmt: skip
            if not 0 < low <= high:
                raise ScratchpathError(f"{name}: needs 0 < min <= max, got ({low}, {high})")
        if n_global < 0 or n_local < 0 or n_global + n_local == 0:
            raise ScratchpathError(
                f"n_global, n_local: need at least one view ({n_global}, {n_local})"
            )
        if global_size < 1 or local_size < 1:
            raise ScratchpathError("global_size, local_size: must be positive")
        if law not in ("uniform", "log-uniform"):
            raise ScratchpathError(f"law: must be 'uniform' or 'log-uniform', got {law!r}")
        if not 0 <= max_shift < 1:
            raise ScratchpathError(f"max_shift: must be within [0, 1), got {max_shift}")
        self.ranges = [tuple(map(float, global_microns))] * n_global + [
            tuple(map(float, local_microns))
        ] * n_local
        self.sizes = [int(global_size)] * n_global + [int(local_size)] * n_local
        self.n_views = n_global + n_local
        self.law = law
        self.max_shift = float(max_shift)
        self.on_device = bool(on_device)

    def draw(self, rng: np.random.Generator, n: int = 1) -> np.ndarray:
        """(n_views, n) fields of view in µm drawn from each view's range and the law."""
        low = np.array([r[0] for r in self.ranges])[:, None]
        high = np.array([r[1] for r in self.ranges])[:, None]
        u = rng.random((self.n_views, n))
        if self.law == "uniform":
            return low + (high - low) * u
        return np.exp(np.log(low) + (np.log(high) - np.log(low)) * u)
