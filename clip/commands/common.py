"""What several commands share: the input-error type and the model / device / precision arguments.

Commands import these from here (never from each other, never from `clip.cli`, which imports the commands).
"""

from __future__ import annotations

import argparse
from typing import Any

from clip.runtime import PRECISIONS


class CLIError(Exception):
    """An error caused by user input: printed as one line, exit status 2, no traceback."""


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:N",
    )


def add_video_arguments(parser: argparse.ArgumentParser, frame_rows: str, cut: str) -> None:
    """--frame-interval and --max-frames-per-video (`clip embed`, `clip index`): `frame_rows` says what each
    frame becomes, `cut` what happens to the frames past the cap."""
    parser.add_argument(
        "--frame-interval", type=float, default=1.0, metavar="S",
        help=f"videos (.mp4, .webm, .mkv, .mov, ...): embed one frame every S seconds (default 1.0); {frame_rows}",
    )  # fmt: skip
    parser.add_argument(
        "--max-frames-per-video", type=int, default=10_000, metavar="N",
        help=f"stop a video after N frames (default 10000); {cut}",
    )  # fmt: skip


def add_precision_argument(parser: argparse.ArgumentParser, choices: tuple[str, ...] = PRECISIONS) -> None:
    parser.add_argument("--precision", default="fp32", choices=choices, help="autocast dtype (default fp32)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --precision, --batch-size, --workers: shared by `clip eval` and `clip classify`."""
    parser.add_argument("--model", required=True, help="model name (see `clip models`) or checkpoint path")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images (and texts) per batch (default 64)"
    )
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def encode_options(args: argparse.Namespace, device: str) -> Any:
    """The evaluators' `EncodeOptions` from the shared model arguments."""
    from clip.evaluation.features import EncodeOptions

    return EncodeOptions(args.batch_size, args.workers, device, args.precision, not args.no_progress)


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Load `args.model` in eval mode on `args.device` -> (model, preprocess, device)."""
    from clip.loading import load
    from clip.runtime import resolve_device

    if args.batch_size < 1 or args.workers < 0:
        raise CLIError("--batch-size must be >= 1 and --workers >= 0")
    device = str(resolve_device(args.device))
    model, preprocess = load(args.model, device=device)
    return model.eval(), preprocess, device
