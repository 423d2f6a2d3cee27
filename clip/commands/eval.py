"""`clip eval {zeroshot,retrieval,linear-probe}`: evaluate a model on local data and write results JSON.

    clip eval zeroshot --model M --data DIR_OR_CSV_OR_CIFAR [--classnames FILE] [--templates T] --output r.json
    clip eval retrieval --model M --data pairs.csv --output r.json
    clip eval linear-probe --model M --train DIR --test DIR --output r.json

Every subcommand prints a one-screen summary; --output writes the full results as JSON (and, for zero-shot
with at most 100 classes, a confusion-matrix PNG beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clip.commands.common import CLIError, add_model_args, encode_options, load_model
from clip.io import atomic_write_json, check_output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot, retrieval and linear-probe evaluation on local data",
        description="Evaluate a CLIP model on local data. See `clip eval TASK --help`.",
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    zs = tasks.add_parser("zeroshot", help="zero-shot classification: top-1/top-5, mean per-class recall")
    add_model_args(zs)
    zs.add_argument(
        "--data", required=True, help="image folder DIR/<class>/*.jpg, CSV filepath,label, or CIFAR"
    )
    zs.add_argument("--classnames", default=None, help="file of class names, one per line, in label order")
    zs.add_argument(
        "--templates",
        default=None,
        help="template set NAME (imagenet, imagenet-7, cifar10, cifar100, simple), a FILE with one template per "
        'line, or one template such as "a photo of a {}." (default: the data set\'s own, else simple)',
    )
    zs.add_argument("--split", default="test", choices=("test", "train"), help="CIFAR split (default test)")
    zs.add_argument("--output", default=None, help="results JSON path (a confusion PNG is written beside it)")
    zs.set_defaults(func=run_zeroshot)

    rt = tasks.add_parser("retrieval", help="image<->text recall@1/5/10 and median rank")
    add_model_args(rt)
    rt.add_argument("--data", required=True, help="CSV with columns filepath,caption (one row per caption)")
    rt.add_argument("--output", default=None, help="results JSON path")
    rt.set_defaults(func=run_retrieval)

    lp = tasks.add_parser("linear-probe", help="logistic regression on frozen image features")
    add_model_args(lp)
    lp.add_argument("--train", required=True, help="training images: folder, CSV or CIFAR (train split)")
    lp.add_argument("--test", required=True, help="test images: folder, CSV or CIFAR (test split)")
    lp.add_argument("--classnames", default=None, help="file of class names (for CSVs with numeric labels)")
    lp.add_argument("--val-fraction", type=float, default=0.2, help="training share held out to choose C")
    lp.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    lp.add_argument("--output", default=None, help="results JSON path")
    lp.set_defaults(func=run_linear_probe)


def _check_output(args: argparse.Namespace) -> None:
    """Refuse a bad --output (a folder, a path under a file) before any model is loaded or image read."""
    if args.output:
        check_output_file(args.output, "--output")


def _unreadable_folders(summary: list[str], *datasets: Any) -> list[dict[str, str]]:
    """Report entries for the folders that could not be listed (their images were never seen)."""
    entries = [e for ds in datasets for e in ds.unreadable]
    if entries:
        summary.append(
            f"{len(entries)} unreadable folder(s) left out, e.g. {entries[0]['folder']} ({entries[0]['error']})"
        )
    return entries


def _finish(args: argparse.Namespace, results: dict[str, Any], summary: list[str]) -> int:
    if args.output:
        atomic_write_json(args.output, results)
        summary.append(f"results: {args.output}")
    print("\n".join(summary), flush=True)
    return 0


def _header(args: argparse.Namespace, task: str, device: str, start: float) -> dict[str, Any]:
    return {
        "task": task,
        "model": args.model,
        "device": device,
        "precision": args.precision,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _confusion_png(args: argparse.Namespace, result: Any, classnames: list[str]) -> str | None:
    from clip.evaluation.plots import MAX_PLOT_CLASSES, save_confusion_matrix_png

    if not args.output or len(classnames) > MAX_PLOT_CLASSES:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "confusion-matrix PNG skipped: it needs matplotlib, which the evaluation extra installs: "
            "pip install 'clipforge[eval]'",
            file=sys.stderr,
        )
        return None
    out = Path(args.output)
    png = out.with_name(out.stem + "_confusion.png")
    save_confusion_matrix_png(
        result.confusion, classnames, png, title=f"Zero-shot confusion: {Path(args.data).name}"
    )
    return str(png)


def run_zeroshot(args: argparse.Namespace) -> int:
    from clip.data.templates import resolve_templates
    from clip.evaluation.datasets import load_labeled_images, read_classnames
    from clip.evaluation.features import autocast, describe_failures
    from clip.evaluation.zeroshot_eval import evaluate_zeroshot
    from clip.zeroshot import zero_shot_classifier

    start = time.perf_counter()
    _check_output(args)
    classnames = read_classnames(args.classnames) if args.classnames else None
    dataset = load_labeled_images(args.data, classnames, split=args.split)
    templates = resolve_templates(args.templates, default=dataset.templates or "simple")
    model, preprocess, device = load_model(args)
    progress = not args.no_progress
    with autocast(device, args.precision):
        classifier = zero_shot_classifier(
            model,
            dataset.classnames,
            templates,
            batch_size=max(args.batch_size, 256),
            device=device,
            progress=progress,
        )
    result = evaluate_zeroshot(
        model.encode_image, dataset, classifier, preprocess, encode_options(args, device)
    )
    png = _confusion_png(args, result, dataset.classnames)
    results = {
        **_header(args, "zeroshot", device, start),
        "data": str(args.data),
        "dataset": dataset.description,
        "templates": args.templates or ("dataset default" if dataset.templates else "simple"),
        "n_templates": len(templates),
        "classnames": dataset.classnames,
        **result.to_dict(),
        "confusion_matrix_png": png,
        "skipped": describe_failures(dataset.sources, result.failed),
    }
    summary = [
        f"zero-shot on {dataset.description}: {result.n_images} images, {len(dataset.classnames)} classes, "
        f"{len(templates)} templates, {result.n_skipped} unreadable images skipped",
        f"top-1 {result.topk[1]:.4f}  top-5 {result.topk[5]:.4f}  "
        f"mean per-class recall {result.mean_per_class_recall:.4f}",
    ]
    results["unreadable_folders"] = _unreadable_folders(summary, dataset)
    if png:
        summary.append(f"confusion matrix: {png}")
    return _finish(args, results, summary)


def run_retrieval(args: argparse.Namespace) -> int:
    from clip.evaluation.datasets import load_caption_csv
    from clip.evaluation.retrieval_eval import evaluate_retrieval
    from clip.loading import get_tokenizer

    start = time.perf_counter()
    _check_output(args)
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no such caption CSV: {args.data}")
    pairs = load_caption_csv(args.data)
    model, preprocess, device = load_model(args)
    metrics = evaluate_retrieval(
        model.encode_image,
        model.encode_text,
        get_tokenizer(model),
        pairs,
        preprocess,
        encode_options(args, device),
    )
    results = {**_header(args, "retrieval", device, start), "data": str(args.data), **metrics}
    summary = [
        f"retrieval on {pairs.description}: {metrics['n_images']} images, {metrics['n_captions']} captions, "
        f"{metrics['n_skipped']} unreadable images skipped",
        "image->text R@1 {image_to_text_R@1:.4f} R@5 {image_to_text_R@5:.4f} R@10 {image_to_text_R@10:.4f} "
        "median rank {image_to_text_median_rank:g}".format(**metrics),
        "text->image R@1 {text_to_image_R@1:.4f} R@5 {text_to_image_R@5:.4f} R@10 {text_to_image_R@10:.4f} "
        "median rank {text_to_image_median_rank:g}".format(**metrics),
    ]
    return _finish(args, results, summary)


def run_linear_probe(args: argparse.Namespace) -> int:
    from clip.evaluation.datasets import load_labeled_images, read_classnames
    from clip.evaluation.features import describe_failures, encode_images
    from clip.evaluation.linear_probe import linear_probe

    start = time.perf_counter()
    _check_output(args)
    classnames = read_classnames(args.classnames) if args.classnames else None
    train = load_labeled_images(args.train, classnames, split="train")
    test = load_labeled_images(args.test, classnames, split="test")
    if train.classnames != test.classnames:
        raise CLIError(
            f"train and test classes differ ({len(train.classnames)} vs {len(test.classnames)} classes); "
            "give both the same class folders or --classnames"
        )
    model, preprocess, device = load_model(args)
    feats = {}
    for name, ds in (("train", train), ("test", test)):
        feats[name] = encode_images(
            model.encode_image, ds.sources, preprocess, encode_options(args, device), desc=f"{name} images"
        )
    labels = {
        name: torch.tensor(ds.labels)[feats[name].index] for name, ds in (("train", train), ("test", test))
    }
    result = linear_probe(
        feats["train"].features,
        labels["train"],
        feats["test"].features,
        labels["test"],
        len(train.classnames),
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    n_skipped = feats["train"].n_skipped + feats["test"].n_skipped
    results = {
        **_header(args, "linear-probe", device, start),
        "train": str(args.train),
        "test": str(args.test),
        **result.to_dict(),
        "n_skipped": n_skipped,
        "skipped": describe_failures(train.sources, feats["train"].failed)
        + describe_failures(test.sources, feats["test"].failed),
    }
    summary = [
        f"linear probe: {result.n_train} training and {result.n_test} test images, {len(train.classnames)} "
        f"classes, {n_skipped} unreadable images skipped",
        f"top-1 {result.top1:.4f}  (C = {result.c:.3g}, chosen on a {args.val_fraction:.0%} validation split)",
    ]
    results["unreadable_folders"] = _unreadable_folders(summary, train, test)
    return _finish(args, results, summary)
