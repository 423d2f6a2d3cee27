"""Arguments shared by the commands that open an existing index (`clip search`, `clip serve`)."""

from __future__ import annotations

import argparse


def add_index_model_args(parser: argparse.ArgumentParser) -> None:
    """--device and --model: where to run the index's recorded model, and where it lives if it moved."""
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument(
        "--model",
        default=None,
        metavar="M",
        help="where the index's model is now, if its recorded path moved (it must be the same model)",
    )
