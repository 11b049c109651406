"""The one exception type the CLI turns into a one-line message (no traceback)."""

from __future__ import annotations


class ScratchpathError(Exception):
    """An expected failure caused by the user's input: a bad file, field or argument.

    The message is one line that names the file or field and the reason, e.g.
    ``"slides/a.svs: not a TIFF file"``. ``scratchpath`` prints it as ``error: <message>``
    and exits non-zero; anything else is a bug and keeps its traceback.
    """


class DamagedTileError(ScratchpathError):
    """A stored tile whose bytes do not decode; the message names its store, shard, row and the
    reason, ``tile`` is its index in the (possibly concatenated) store."""

    def __init__(self, message: str, tile: int) -> None:
        super().__init__(message, tile)
        self.tile = tile

    def __str__(self) -> str:
        return str(self.args[0])
