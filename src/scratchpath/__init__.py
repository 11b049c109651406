"""scratchpath: self-supervised pretraining of vision backbones from scratch on H&E.

Public API (stable): :class:`PatchStore`, :func:`load_backbone`, and the ``scratchpath.finetune``
module (tile probes; slide-level heads ``ABMIL``, ``MeanPool``, ``run_slide_evaluation``) and
``scratchpath.embed`` (``embed``, ``read_slide``). Everything else may change between versions.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PatchStore", "__version__", "load_backbone"]


def __getattr__(name: str):
    # Lazy so that `import scratchpath` stays cheap (no torch import for store-only users).
    if name == "PatchStore":
        from scratchpath.store import PatchStore

        return PatchStore
    if name == "load_backbone":
        from scratchpath.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'scratchpath' has no attribute {name!r}")
