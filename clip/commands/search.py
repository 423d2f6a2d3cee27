"""`clip search IDX "a dog on a beach" -k 10` or `clip search IDX --image query.jpg`: query an index."""

from __future__ import annotations

import argparse
import sys

from clip.commands.common import CLIError
from clip.commands.output import json_line, print_line
from clip.commands.search_args import add_index_model_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search an index by text or by image",
        description=(
            "Print the k indexed images closest to each query, one 'path<TAB>score' line each (score: cosine "
            "similarity), best first, ties ordered by path; a video frame prints as 'path#t=SECONDS' (with "
            "--json: path and time). Several queries run as one batch."
        ),
    )
    parser.add_argument("index", metavar="IDX", help="index folder made by `clip index`")
    parser.add_argument("text", nargs="*", metavar="QUERY", help="text queries")
    parser.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="query by image (repeatable)"
    )
    parser.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per query")
    parser.add_argument(
        "--captions",
        action="store_true",
        help="search the captions instead of the images (text-to-text, image-to-caption); for an index "
        "built with --from-embeddings from a `clip embed --text` job. Lines then end with the caption",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ann", action="store_true", help="use the approximate FAISS index (built if missing)")
    mode.add_argument(
        "--exact", action="store_true", help="exact search even where an approximate index exists"
    )
    add_index_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.search.index import Index

    if args.k < 1:
        raise CLIError(f"-k must be at least 1, got {args.k}")
    if not args.text and not args.image:
        raise CLIError('give a text query (clip search IDX "a dog") or --image FILE')
    ann = True if args.ann else False if args.exact else None
    with Index.open(args.index, model=args.model, device=args.device, create=False) as idx:
        if args.captions and not idx.has_captions:
            raise CLIError(
                f"index {args.index!r} holds no captions: build it with `clip index --from-embeddings DIR` "
                "from a `clip embed --text` job"
            )
        target = {"target": "captions"} if args.captions else {}
        if ann and not idx.ann_status()["built"]:
            info = idx.build_ann()
            print(
                f"built the approximate index: nprobe {info['nprobe']}, recall@10 vs exact {info['recall']:.3f}",
                file=sys.stderr,
            )
        results = []
        if args.text:
            results += zip(args.text, idx.search_text(args.text, args.k, ann=ann, **target), strict=True)
        if args.image:
            results += zip(args.image, idx.search_image(args.image, args.k, ann=ann, **target), strict=True)
    for query, hits in results:
        if args.json:
            print_line(json_line({"query": query, "results": [h.to_dict() for h in hits]}))
            continue
        if len(results) > 1:
            print_line(f"# {query}")
        for h in hits:
            print_line(f"{h.label}\t{h.score:.4f}" + (f"\t{h.caption}" if args.captions else ""))
    return 0
