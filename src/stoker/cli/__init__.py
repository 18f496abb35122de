"""The ``stoker`` command: one module per subcommand.

Each subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int``. Registering a new subcommand is one line in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stoker.errors import StokerError

__all__ = ["main"]

# Modules under stoker.cli, in the order `stoker --help` lists them.
_SUBCOMMANDS = (
    "run",
    "doctor",
    "runs",
    "report",
    "reproduce",
    "check_resume",
    "checkpoint",
    "compress",
    "experiment",
    "tune",
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="stoker", description="Keeps your accelerator fed. Building blocks for your own loop."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"stoker.cli.{name}")
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        modules[module.NAME] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stoker`` console script; returns the process exit code."""
    parser, modules = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = modules[args.command]
    if extra and not getattr(module, "ACCEPTS_EXTRA", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(module.main(args))  # type: ignore[attr-defined]
    except StokerError as exc:
        print(f"stoker: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exitcode", 2))
    except KeyboardInterrupt:
        print("stoker: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
