"""The ``scratchpath`` command.

Each subcommand lives in its own module of this package and exposes two functions:

``add_parser(subparsers) -> None``
    registers the subcommand (name, help, arguments) on the top-level argparse parser and
    calls ``parser.set_defaults(run=run)``;
``run(args: argparse.Namespace) -> int``
    does the work and returns the exit status.

``fit`` is the exception: it hands its raw arguments to LightningCLI (``scratchpath.cli.fit``).
Expected failures raise :class:`scratchpath.errors.ScratchpathError`; :func:`main` prints them
as one ``error: ...`` line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from scratchpath import __version__
from scratchpath.errors import ScratchpathError

# Order is the order shown in --help: the path a tile takes.
COMMANDS = {
    "ingest": "scratchpath.cli.ingest",
    "import-tiles": "scratchpath.cli.import_tiles",
    "info": "scratchpath.cli.info",
    "verify": "scratchpath.cli.verify",
    "preview": "scratchpath.cli.preview",
    "fit": "scratchpath.cli.fit",
    "export": "scratchpath.cli.export",
    "embed": "scratchpath.cli.embed",
    "eval": "scratchpath.cli.eval",
    "compare": "scratchpath.cli.compare",
    "synth": "scratchpath.cli.synth",
    "demo": "scratchpath.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchpath",
        description=(
            "Pretrain vision backbones from scratch on H&E: slides -> patch store -> "
            "stain-aware views -> SSL objective -> exported backbone -> evaluation."
        ),
        epilog="Run 'scratchpath COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"scratchpath {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if name == "fit":
            # Listed here without importing torch/Lightning, so other commands start fast;
            # main() hands 'fit ...' to LightningCLI before argparse sees it.
            subparsers.add_parser(
                "fit",
                help="pretrain a backbone from a recipe (LightningCLI; 'scratchpath fit --help')",
                add_help=False,
            )
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a command not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # albumentations asks PyPI for a newer release at import unless told not to: a network call
    # at every start (and a warning on clusters without internet). Nothing here fetches at run time.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        if argv and argv[0] == "fit":
            # A stop signal (SLURM's --signal, SIGTERM) may come while torch is imported: it is
            # remembered from here on and fit saves and stops at its first step.
            with _stop_signals_remembered() as received:
                from scratchpath.cli import fit

                return fit.run_fit(argv[1:], early_signals=received)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except ScratchpathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _stop_signals_remembered() -> Iterator[list[int]]:
    """Record SIGTERM / SIGUSR1 instead of dying of them (their default action), until the
    block ends; the signal numbers received are in the yielded list."""
    received: list[int] = []
    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]
    found = {signum: signal.signal(signum, _append_to(received)) for signum in numbers}
    try:
        yield received
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


def _append_to(received: list[int]) -> Callable[[int, Any], None]:
    return lambda signum, frame: received.append(signum)


if __name__ == "__main__":
    sys.exit(main())
