"""`clip serve IDX [--host 127.0.0.1 --port 8000]`: a search page and JSON API over an index."""

from __future__ import annotations

import argparse
import sys

from clip.commands.common import CLIError
from clip.commands.search_args import add_index_model_args

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a search page for an index (localhost only by default)",
        description=(
            "Serve a web page to search IDX by text or by a dropped image, with a JSON API (/api/search, "
            "POST /api/search/image, described at /openapi.json), and clip-retrieval's back-end protocol "
            "(POST /knn-service, POST /metadata, GET /indices-list) for its ClipClient and front end. Video "
            "hits play from their frame's time (/api/video, with HTTP Range); an index with captions gets a "
            "caption-search toggle (target=captions). Only indexed files are ever served."
        ),
    )
    parser.add_argument("index", metavar="IDX", help="index folder made by `clip index`")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest query image accepted (MB)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for host NAME (repeatable). By default only IP addresses, localhost and "
        "the --host name are answered, so a web page cannot reach the server through DNS rebinding",
    )
    parser.add_argument(
        "--index-name",
        metavar="NAME",
        help="the index's name in clip-retrieval's API (/indices-list, indice_name; default: IDX's folder name)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages of ORIGIN (e.g. http://localhost:1235, where clip-retrieval's front end runs) call the "
        "API from the browser (repeatable). None by default: other sites' pages cannot read the index",
    )
    add_index_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from clip.search.server import ServerLimits, serve
    except ImportError as err:
        raise CLIError(
            f"clip serve needs starlette and uvicorn: pip install 'clipforge[search]' ({err})"
        ) from None
    from clip.search.index import Index

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: serving on {args.host}: anyone who can reach port {args.port} can search and view "
            "the indexed images",
            file=sys.stderr,
        )
    idx = Index.open(args.index, model=args.model, device=args.device, create=False)
    # Load the model, tokenizer and vectors now: a bad model fails here, and the first query is not slow.
    if len(idx):
        idx.search_text("warm up", k=1)
    else:
        _ = idx.encoder
    print(f"serving {len(idx)} images from {args.index} at http://{args.host}:{args.port}/", flush=True)
    limits = ServerLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    serve(idx, args.host, args.port, limits, allowed_hosts=args.allowed_host, index_name=args.index_name,
          cors_origins=args.cors_origin)  # fmt: skip
    return 0
