"""`clip classify IMAGE... --labels "a dog,a cat" --model M`: each image's most likely labels.

Labels are used as written unless --templates is given, in which case each label is put into every
template ("a photo of a {}.") and the prompts are ensembled (`clip.zero_shot_classifier`). Probabilities
are the softmax of the model's scaled cosine similarities over the labels; for a SigLIP model, each label's
own sigmoid (`clip.zeroshot.zero_shot_probabilities`).
"""

from __future__ import annotations

import argparse
import json
import time

from clip.commands.common import CLIError, add_model_args, encode_options, load_model
from clip.commands.output import print_line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="zero-shot classify images against a list of labels",
        description="Print each image's top labels with probabilities (zero-shot, no training).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "a dog,a cat,a diagram"')
    labels.add_argument("--labels-file", help="file with one label per line (labels may contain commas)")
    parser.add_argument(
        "--templates",
        default=None,
        help="template set NAME (imagenet, imagenet-7, cifar10, cifar100, simple), a FILE with one template "
        'per line, or one template such as "a photo of a {}." (default: the labels as written)',
    )
    parser.add_argument("--top", type=int, default=5, help="labels shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_model_args(parser)
    parser.set_defaults(func=run)


def _labels(args: argparse.Namespace) -> list[str]:
    from clip.evaluation.datasets import read_classnames

    if args.labels_file:
        return read_classnames(args.labels_file)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise CLIError('--labels is empty; give comma-separated labels such as "a dog,a cat"')
    if len(set(labels)) != len(labels):
        raise CLIError("--labels lists a label more than once")
    return labels


def run(args: argparse.Namespace) -> int:
    from clip.data.templates import resolve_templates
    from clip.zeroshot import classify_images

    start = time.perf_counter()
    labels = _labels(args)
    templates = resolve_templates(args.templates, default=["{}"])
    if args.top < 1:
        raise CLIError("--top must be >= 1")
    model, preprocess, device = load_model(args)
    out = {"model": args.model, **classify_images(model, preprocess, args.images, labels, templates, args.top,
                                                  encode_options(args, device))}  # fmt: skip
    if args.json:
        out["seconds"] = round(time.perf_counter() - start, 3)
        print_line(json.dumps(out, indent=2))  # ASCII: non-UTF-8 names are escaped
        return 0
    lines = []
    for r in out["results"]:
        lines.append(r["image"])
        lines += [f"  {p['probability']:7.2%}  {p['label']}" for p in r["predictions"]]
    for s in out["skipped"]:
        lines.append(f"skipped {s['image']}: {s['error']}")
    if out["n_skipped"]:
        lines.append(f"{out['n_skipped']} unreadable image(s) skipped")
    print_line("\n".join(lines))
    return 0
