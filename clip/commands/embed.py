"""`clip embed INPUT... --model M --output OUT`: embeddings of a large collection into shards (torchrun-ready)."""

from __future__ import annotations

import argparse

from clip.commands.common import add_video_arguments
from clip.runtime import INFERENCE_PRECISIONS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a large collection into float16 .npy shards + Parquet metadata (resumable, torchrun)",
        description=(
            "Embed every image of INPUT (a folder of images with optional same-named .txt captions, a "
            "CSV/TSV/Parquet table filepath,caption, or WebDataset .tar shards / their folder; videos in a folder or "
            "table give one row per frame, see --frame-interval) into OUT: "
            "img_emb/*.npy (float16, unit norm) and metadata/*.parquet (key, path, caption, width, height, and "
            "text_emb with --text). Run under `torchrun --nproc_per_node N -m clip embed ...` to split the work "
            "over ranks; the output is the same for any number of ranks and workers. Rerun the same command "
            "to resume a killed job (finished shards are skipped). Unreadable images are skipped and listed in "
            "OUT/report.json. Needs pyarrow (and PyAV for videos): pip install 'clipforge[embed]'."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, table, or .tar shards")
    parser.add_argument(
        "--model", required=True, metavar="M", help="model name (e.g. ViT-B/32) or checkpoint"
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder (created if missing)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="input rows per output shard (10000)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument(
        "--workers", type=int, default=4, help="decoding processes per rank (default 4; 0 = main)"
    )
    parser.add_argument(
        "--text", action="store_true", help="also embed each caption (metadata column text_emb)"
    )
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="fp32",
        help="fp32 (exact, default); bf16: on the CPU bf16 weights (AVX512-BF16), on a GPU autocast; fp16: "
        "autocast; int8: CPU only, dynamically quantised linear layers (VNNI). Not fp32: the first batch is "
        "also embedded in fp32 and the cosine agreement written to OUT/report.json",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = this rank's GPU when present",
    )
    parser.add_argument("--csv-img-key", default="filepath", help="image-path column (default filepath)")
    parser.add_argument("--csv-caption-key", default="caption", help="caption column (default caption)")
    parser.add_argument("--csv-separator", help="column separator (default: tab for .tsv, else comma)")
    add_video_arguments(
        parser,
        "each frame is a row keyed PATH#t=SECONDS with metadata columns frame_time and video",
        "the rest is reported",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.collection.embed import EmbedConfig, print_summary, run_embed

    cfg = EmbedConfig(
        inputs=tuple(args.inputs), output=args.output, model=args.model, shard_size=args.shard_size,
        batch_size=args.batch_size, workers=args.workers, text=args.text, precision=args.precision,
        device=args.device, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
        separator=args.csv_separator, progress=not args.no_progress, frame_interval=args.frame_interval,
        max_frames_per_video=args.max_frames_per_video,
    )  # fmt: skip
    report = run_embed(cfg)
    if report:  # rank 0
        print_summary(report, args.output)
    return 0
