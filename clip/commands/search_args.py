"""Arguments shared by the commands that open an existing index (`clip search`, `clip serve`)."""

from __future__ import annotations

import argparse

from clip.commands.common import add_device_argument


def add_index_model_args(parser: argparse.ArgumentParser) -> None:
    """--device and --model: where to run the index's recorded model, and where it lives if it moved."""
    add_device_argument(parser)
    parser.add_argument(
        "--model",
        default=None,
        metavar="M",
        help="where the index's model is now, if its recorded path moved (it must be the same model)",
    )
