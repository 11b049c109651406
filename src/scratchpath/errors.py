"""The one exception type the CLI turns into a one-line message (no traceback)."""

from __future__ import annotations


class ScratchpathError(Exception):
    """An expected failure caused by the user's input: a bad file, field or argument.

    The message is one line that names the file or field and the reason, e.g.
    ``"slides/a.svs: not a TIFF file"``. ``scratchpath`` prints it as ``error: <message>``
    and exits non-zero; anything else is a bug and keeps its traceback.
    """
