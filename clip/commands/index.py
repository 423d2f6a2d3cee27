"""`clip index PHOTOS_DIR --index IDX --model M`: embed a folder of images into a searchable index;
`clip index --from-embeddings DIR --index IDX`: index the shards of a `clip embed` job without embedding again."""

from __future__ import annotations

import argparse
import os
import sys

from clip.cli import CLIError
from clip.commands.common import add_device_argument, add_video_arguments
from clip.commands.output import print_line

MAX_LISTED_ERRORS = 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="embed the images of a folder into an index (incremental, crash-safe)",
        description=(
            "Walk PHOTOS_DIR recursively and embed every readable image (JPEG, PNG, WebP, GIF, BMP, TIFF; "
            "hidden folders skipped), and a frame of every video (.mp4, .webm, .mkv, .mov, ...; needs PyAV) "
            "every --frame-interval seconds, into the index folder IDX. Run it again to embed only new or changed "
            "files and drop deleted ones; a killed run resumes where it stopped; damaged shards are dropped and "
            "their images embedded again. Unreadable files and folders are listed in IDX/report.json."
        ),
    )
    parser.add_argument(
        "photos", nargs="?", metavar="PHOTOS_DIR", help="folder of images to index (recursively)"
    )
    parser.add_argument(
        "--from-embeddings",
        metavar="DIR",
        help="instead of PHOTOS_DIR: index the shards of a `clip embed` job in DIR without embedding again "
        "(vectors stay in DIR, memory-mapped; captions searchable when the job ran with --text)",
    )
    parser.add_argument(
        "--max-index-memory",
        default="16G",
        metavar="SIZE",
        help="with --from-embeddings: memory the IVF indexes may take (e.g. 16G, 512M); the most precise "
        "codes that fit are used (SQ8, SQ4, then PQ)",
    )
    parser.add_argument(
        "--no-captions", action="store_true", help="with --from-embeddings: leave the captions out"
    )
    parser.add_argument("--index", required=True, metavar="IDX", help="index folder (created if missing)")
    parser.add_argument(
        "--model",
        metavar="M",
        default=None,
        help="model name (e.g. ViT-B/32) or checkpoint path; required for a new index, and must match an "
        "existing one (default: the index's model)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: one per core)"
    )
    add_device_argument(parser)
    _add_precision_argument(parser)
    parser.add_argument(
        "--ann",
        choices=("auto", "always", "never"),
        default="auto",
        help="build an approximate (FAISS) index: auto = from 100,000 images when faiss is installed "
        "(with --from-embeddings: always = even below that)",
    )
    add_video_arguments(
        parser,
        "each frame is a search hit of its own (file, time); changing it embeds the videos again",
        "the rest is left out, with a note",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.io import atomic_write_json
    from clip.search.index import Index
    from clip.search.store import DB_NAME

    if args.from_embeddings is not None:
        return _from_embeddings(args)
    if args.photos is None:
        raise CLIError("give a folder of images (clip index PHOTOS_DIR --index IDX) or --from-embeddings DIR")
    video = _video_options(args)
    if _is_embeddings_index(args.index):
        raise CLIError(
            f"{args.index!r} was built from embeddings; rebuild it with --from-embeddings, or choose a new --index"
        )
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}")
    if not os.path.isdir(args.photos):
        raise FileNotFoundError(f"photo folder not found: {args.photos!r}; pass an existing directory")
    if args.model is None and not os.path.exists(os.path.join(args.index, DB_NAME)):
        raise CLIError(
            f"{args.index!r} is not an index yet: pass --model (e.g. --model ViT-B/32) to create it"
        )
    with Index.open(args.index, model=args.model, device=args.device, precision=args.precision) as idx:
        report = idx.sync(
            args.photos, batch_size=args.batch_size, num_workers=args.workers, progress=not args.no_progress,
            video=video,
        )  # fmt: skip
        for line in report.repaired:
            print(f"repaired: {line}", flush=True)
        print(
            f"embedded {report.added} new and {report.updated} changed images in {report.seconds:.1f} s "
            f"({report.images_per_second:.1f} images/s); removed {report.removed}; "
            f"{report.skipped + report.unchanged_content} unchanged; {len(report.failed)} unreadable"
            + (f" ({report.frames} video frames among them)" if report.frames else ""),
            flush=True,
        )
        for path, note in report.notes:  # a video cut short, videos left out without PyAV
            print_line(f"note: {note}" if not path or path in note else f"note: {path}: {note}")
        _print_agreement(idx.report(), report.added + report.updated)
        ann = None
        if args.ann == "always" or (args.ann == "auto" and idx.ann_needed()):
            print("building the approximate (FAISS) index...", file=sys.stderr, flush=True)
            ann = idx.build_ann()
            print(
                f"approximate index: {ann['count']} vectors, nlist {ann['nlist']}, nprobe {ann['nprobe']}, "
                f"recall@10 vs exact search {ann['recall']:.3f} (built in {ann['build_seconds']:.1f} s)"
            )
        full = idx.report()
        atomic_write_json(os.path.join(args.index, "report.json"), {"last_run": report.to_dict(), **full})
        print_line(f"index {args.index} holds {full['count']} images")
        report_file = os.path.join(args.index, "report.json")
        _list("files could not be read", full["errors"], report_file)
        _list(
            "folders could not be read (their files were left as they were)",
            report.to_dict()["unreadable_folders"],
            report_file,
        )
    return 0


def _add_precision_argument(parser: argparse.ArgumentParser) -> None:
    from clip.search.encoder import INDEX_PRECISIONS

    parser.add_argument(
        "--precision",
        choices=INDEX_PRECISIONS,
        default=None,
        help="how images are embedded: fp32 (exact), bf16 (CPU: bf16 weights, AVX512-BF16; GPU: autocast), fp16 "
        "(autocast), int8 (CPU only: int8 linear layers, VNNI). Recorded in the index; default: the index's "
        "own (fp32 for a new one). Not fp32: the first images are also embedded in fp32 and the agreement printed",
    )


def _print_agreement(full: dict, embedded: int) -> None:
    """The agreement with fp32 measured by this run (below fp32, when it embedded anything), once."""
    from clip.search.encoder import AGREEMENT_FLOOR

    agree = full.get("agreement_with_fp32")
    if full.get("precision", "fp32") == "fp32" or not agree or not embedded:
        return
    print_line(
        f"agreement of {agree['precision']} with fp32 on the first {agree['images']} images: min cosine "
        f"{agree['image_cosine_min']:.5f} (mean {agree['image_cosine_mean']:.5f})"
    )
    if agree["image_cosine_min"] < AGREEMENT_FLOOR:
        print_line(
            f"warning: below the expected {AGREEMENT_FLOOR} (this model loses accuracy at "
            f"{agree['precision']}); rebuild the index with --precision fp32 if search results look off"
        )


def _video_options(args: argparse.Namespace):  # -> VideoOptions
    from clip.collection.video import VideoOptions

    try:
        return VideoOptions(args.frame_interval, args.max_frames_per_video)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _is_embeddings_index(path: str) -> bool:
    from clip.search.embindex import is_embeddings_index

    return is_embeddings_index(path)


def _from_embeddings(args: argparse.Namespace) -> int:
    from clip.search.embbuild import build_from_embeddings
    from clip.search.ivf import format_bytes, parse_size

    if args.photos is not None:
        raise CLIError("give either PHOTOS_DIR or --from-embeddings DIR, not both")
    if args.precision is not None:
        raise CLIError(
            "--precision is for embedding PHOTOS_DIR; with --from-embeddings the vectors are the embed job's "
            "(set its precision with clip embed --precision)"
        )
    try:
        budget = parse_size(args.max_index_memory)
    except ValueError as err:
        raise CLIError(f"--max-index-memory: {err}") from None
    if not os.path.isdir(args.from_embeddings):
        raise FileNotFoundError(f"--from-embeddings {args.from_embeddings!r} is not a folder")
    manifest = build_from_embeddings(
        args.from_embeddings, args.index, model=args.model, device=args.device, ann=args.ann,
        max_index_memory=budget, captions=not args.no_captions,
    )  # fmt: skip
    for target, info in (manifest.get("ann") or {}).items():
        print(
            f"{target}: {info['codes']} IVF, nlist {info['nlist']}, nprobe {info['nprobe']}, recall@10 vs exact "
            f"search {info['recall']:.3f}, {format_bytes(info['bytes'])} in memory (built in "
            f"{info['build_seconds']:.1f} s)"
        )
    captions = " with their captions" if manifest["files"].get("captions") else ""
    print_line(f"index {args.index} holds {manifest['count']} embeddings{captions} from {manifest['source']}")
    if manifest["skipped_count"]:
        print_line(f"({manifest['skipped_count']} inputs were skipped by the embed job; see its report.json)")
    return 0


def _list(what: str, entries: list[dict[str, str]], report_file: str) -> None:
    """Print up to MAX_LISTED_ERRORS of `entries` ({"path", "error"}), non-UTF-8 names included."""
    if not entries:
        return
    print_line(f"{len(entries)} {what} (all listed in {report_file}):")
    for e in entries[:MAX_LISTED_ERRORS]:
        print_line(f"  {e['path']}: {e['error']}")
    if len(entries) > MAX_LISTED_ERRORS:
        print_line(f"  ... and {len(entries) - MAX_LISTED_ERRORS} more")
