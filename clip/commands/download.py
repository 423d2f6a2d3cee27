"""`clip download NAME... [--root DIR]`: fetch released checkpoints into the cache and print their paths."""

from __future__ import annotations

import argparse

from clip import hub


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download released checkpoints (verified by SHA256) and print their paths",
        description=(
            "Download OpenAI's released CLIP checkpoints into the cache, resuming interrupted downloads "
            f"and verifying SHA256. ${hub.BASE_URL_ENV} points at a mirror (default {hub.DEFAULT_BASE_URL})."
        ),
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help=f"model name ({', '.join(hub.available_models())}) or 'all'",
    )
    parser.add_argument("--root", default=None, help="cache folder (default ~/.cache/clip)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = hub.available_models() if "all" in args.names else list(dict.fromkeys(args.names))
    # Check every name before downloading anything, so a typo does not surface after a 1 GB fetch.
    entries = [hub.get_pretrained(name) for name in names]
    for entry in entries:
        print(hub.download(entry, root=args.root, progress=not args.no_progress), flush=True)
    return 0
