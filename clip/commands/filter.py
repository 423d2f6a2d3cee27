"""`clip filter INPUT... --output OUT`: clean image-text pairs as LAION was built (similarity, duplicates, concepts)."""

from __future__ import annotations

import argparse

from clip.commands.common import add_device_argument, add_precision_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="drop pairs with low image-caption similarity, near-duplicate images, unwanted concepts",
        description=(
            "Clean a pair data set from its CLIP embeddings: drop empty captions, pairs whose image-caption "
            "cosine is below --min-similarity, images matching an --exclude query (or matching no --keep "
            "query), and near-duplicate images (cosine >= --dedup-threshold with an earlier kept one). INPUT is "
            "a `clip embed --text` output folder, or what `clip embed` reads (embedded first into "
            "OUT/embeddings; needs --model). Writes the kept pairs (CSV, Parquet or WebDataset shards, all "
            "readable by `clip train`), OUT/decisions.parquet, OUT/report.json and OUT/similarity.png."
        ),
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="clip embed folder, or folder/table/.tar shards"
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument(
        "--format", choices=("csv", "parquet", "wds"), default="csv", help="kept pairs as (csv)"
    )
    parser.add_argument("--min-similarity", type=float, default=0.28,
                        help="drop pairs with image-caption cosine below this (default 0.28, LAION-5B's ViT-B/32)")  # fmt: skip
    parser.add_argument("--no-similarity-filter", action="store_true", help="keep pairs of any similarity")
    parser.add_argument("--dedup-threshold", type=float, default=None,
                        help="drop images with cosine >= this to an earlier kept image (e.g. 0.96; default off)")  # fmt: skip
    parser.add_argument("--exclude", action="append", default=[], metavar="TEXT",
                        help="drop images whose cosine with TEXT is >= --exclude-threshold (repeatable)")  # fmt: skip
    parser.add_argument("--exclude-threshold", type=float, default=0.25, help="(default 0.25)")
    parser.add_argument("--keep", action="append", default=[], metavar="TEXT",
                        help="keep only images whose cosine with some TEXT is >= --keep-threshold (repeatable)")  # fmt: skip
    parser.add_argument("--keep-threshold", type=float, default=0.25, help="(default 0.25)")
    parser.add_argument(
        "--model", metavar="M", help="model for raw inputs and queries (default: the embeddings')"
    )
    parser.add_argument("--embeddings", metavar="DIR", help="where raw inputs are embedded (OUT/embeddings)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="pairs per output tar (wds)")
    parser.add_argument(
        "--shard-size", type=int, default=10_000, help="rows per embedding shard (raw inputs)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (raw inputs)")
    parser.add_argument("--workers", type=int, default=4, help="decoding processes (raw inputs)")
    add_precision_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--csv-img-key", default="filepath", help="image-path column (default filepath)")
    parser.add_argument("--csv-caption-key", default="caption", help="caption column (default caption)")
    parser.add_argument("--csv-separator", help="column separator (default: tab for .tsv, else comma)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.collection.filter import FilterConfig
    from clip.collection.filter_job import FilterJob, run_filter, summary_lines

    filters = FilterConfig(
        min_similarity=None if args.no_similarity_filter else args.min_similarity,
        dedup_threshold=args.dedup_threshold, exclude=tuple(args.exclude),
        exclude_threshold=args.exclude_threshold, keep=tuple(args.keep), keep_threshold=args.keep_threshold,
    )  # fmt: skip
    job = FilterJob(
        inputs=tuple(args.inputs), output=args.output, filters=filters, format=args.format, model=args.model,
        embeddings=args.embeddings, samples_per_shard=args.samples_per_shard, shard_size=args.shard_size,
        batch_size=args.batch_size, workers=args.workers, precision=args.precision, device=args.device,
        img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=args.csv_separator,
        progress=not args.no_progress,
    )  # fmt: skip
    report = run_filter(job)
    if report is not None:
        print("\n".join(summary_lines(report)))
    return 0
