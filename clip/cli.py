"""The `clip` command line: a thin argparse front over typed library functions.

Each subcommand lives in its own module under `clip.commands` and exposes
`add_parser(subparsers) -> None`, which registers the parser and sets `func` (a
callable taking the parsed namespace and returning an exit code).  Modules are
listed here explicitly, in help order; nothing is discovered by scanning folders.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from clip.commands.common import CLIError  # user-input errors; re-exported here, their old home

COMMAND_MODULES: tuple[str, ...] = (
    "clip.commands.models",
    "clip.commands.download",
    "clip.commands.convert",
    "clip.commands.export",
    "clip.commands.train",
    "clip.commands.classify",
    "clip.commands.eval",
    "clip.commands.index",
    "clip.commands.search",
    "clip.commands.serve",
    "clip.commands.demo",
    "clip.commands.data",
    "clip.commands.score",
    "clip.commands.embed",
    "clip.commands.filter",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip", description="CLIP: load, convert, train, evaluate, search.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, FileNotFoundError, ValueError, RuntimeError) as err:
        # Errors about inputs are reported as one clear line; programming errors keep their traceback.
        print(f"clip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
