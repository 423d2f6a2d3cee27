"""`clip score INPUT --model M`: CLIPScore / RefCLIPScore of images and their captions or prompts, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from clip.commands.common import CLIError, add_device_argument, add_precision_argument
from clip.runtime import resolve_device

MAX_LISTED_ERRORS = 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="CLIPScore / RefCLIPScore of images and their captions (e.g. generated images and prompts)",
        description=(
            "Score how well each image matches its caption: CLIP-S = w * max(cos, 0) (Hessel et al. 2021, "
            "w = 2.5) and, with --references, RefCLIP-S. INPUT is a folder of images with a same-named .txt "
            "caption beside each, or a CSV/TSV/Parquet table with columns filepath,caption (paths relative to "
            "the table). Prints JSON (per image and the mean); unreadable images are skipped and listed. "
            "torchmetrics' clip_score equals 40 x CLIP-S per pair (w = 100, no prefix)."
        ),
    )
    parser.add_argument(
        "input", metavar="INPUT", help="folder of images + .txt captions, or a CSV/TSV/Parquet"
    )
    parser.add_argument(
        "--model", required=True, metavar="M", help="model name (e.g. ViT-B/32) or checkpoint"
    )
    parser.add_argument(
        "--references",
        metavar="JSON",
        help="JSON {image key: [reference captions]} (keys: paths as listed in INPUT) for RefCLIPScore",
    )
    parser.add_argument(
        "--prefix",
        nargs="?",
        const="A photo depicts",
        default=None,
        metavar="TEXT",
        help="put TEXT before every caption (bare --prefix: the paper's 'A photo depicts'; default none)",
    )
    parser.add_argument(
        "--w", type=float, default=2.5, help="the scale w of CLIP-S (default 2.5, the paper's)"
    )
    parser.add_argument("--output", metavar="FILE", help="write the JSON here (atomically) instead of stdout")
    parser.add_argument("--csv-img-key", default="filepath", help="image-path column (default filepath)")
    parser.add_argument("--csv-caption-key", default="caption", help="caption column (default caption)")
    parser.add_argument("--csv-separator", help="column separator (default: tab for .tsv, else comma)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in process)")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import clip
    from clip.collection.sources import open_collection
    from clip.io import atomic_write_json
    from clip.score import read_references, score_collection

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}")
    collection = open_collection([args.input], args.csv_img_key, args.csv_caption_key, args.csv_separator)
    references = read_references(args.references) if args.references else None
    model, preprocess = clip.load(args.model, device=resolve_device(args.device))
    report = score_collection(
        model, preprocess, collection, references, w=args.w, prefix=args.prefix, batch_size=args.batch_size,
        workers=args.workers, precision=args.precision, progress=not args.no_progress,
    )  # fmt: skip
    report = {"model": args.model, "input": args.input, **report}
    if args.output:
        atomic_write_json(args.output, report)
        print(
            f"scored {report['count']} images: mean CLIP-S {report['mean_clip_score']:.4f}; wrote {args.output}"
        )
    else:
        print(json.dumps(report, indent=2))
    for e in report["errors"][:MAX_LISTED_ERRORS]:
        print(f"skipped {e['key']}: {e['error']}", file=sys.stderr)
    if len(report["errors"]) > MAX_LISTED_ERRORS:
        print(f"... and {len(report['errors']) - MAX_LISTED_ERRORS} more skipped", file=sys.stderr)
    return 0
