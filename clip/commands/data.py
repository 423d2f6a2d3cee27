"""`clip data ...`: build the bundled data sets.

clip data build-emoji --npm-install                      # fetch the pinned npm packages into a temp folder
clip data build-emoji --node-modules DIR [--size 32] [--output-dir clip/data/emoji] [--no-openmoji]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build the bundled data sets", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True
    emoji = sub.add_parser(
        "build-emoji",
        help="build the emoji image-text data set from npm packages",
        description="Build clip/data/emoji/{emoji,openmoji}.npz from the pinned npm emoji packages.",
    )
    source = emoji.add_mutually_exclusive_group(required=True)
    source.add_argument("--node-modules", type=Path, help="a node_modules folder holding the four packages")
    source.add_argument(
        "--npm-install", action="store_true", help="run the pinned `npm install` in a temporary folder first"
    )
    emoji.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    emoji.add_argument(
        "--output-dir", type=Path, default=None, help="where to write the .npz files (default: the package's)"
    )
    emoji.add_argument(
        "--no-openmoji",
        action="store_true",
        help="skip OpenMoji's art (no cairosvg needed; its JSON is still read)",
    )
    parser.set_defaults(func=run)


def _build_emoji(args: argparse.Namespace) -> int:
    from clip.data.build_emoji import build_emoji, npm_install

    kwargs = {"output_dir": args.output_dir, "size": args.size, "openmoji": not args.no_openmoji}
    if args.npm_install:
        with tempfile.TemporaryDirectory(prefix="clip-emoji-npm-") as tmp:
            report = build_emoji(npm_install(tmp), **kwargs)
    else:
        report = build_emoji(args.node_modules, **kwargs)
    print(
        json.dumps(
            {
                "concepts": report.concepts,
                "held_out": report.held_out,
                "images_per_style": report.images_per_style,
                "files": report.files,
                "seconds": round(report.seconds, 1),
            },
            indent=1,
        )
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "build-emoji":
        return _build_emoji(args)
    raise ValueError(f"unknown data command {args.data_command!r}")
