"""`clip export MODEL OUT/ --format onnx`: image and text graphs, checked with onnxruntime."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export the image and text towers as ONNX graphs (dynamic batch and text length)",
        description=(
            "Writes OUT/image.onnx, OUT/text.onnx and OUT/export.json, runs onnxruntime on random inputs and "
            "prints the parity it measured against PyTorch. Needs: pip install 'clipforge[export]'."
        ),
    )
    p.add_argument("model", help="anything clip.load reads: a model name, a checkpoint file or a folder")
    p.add_argument("output", help="output folder")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="graph format (default onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--arch", help="architecture of a file that does not record it (see `clip models`)")
    p.add_argument("--image-size", type=int, help="export the image graph at another resolution")
    p.add_argument("--context-length", type=int, help="stretch the text positions first (Long-CLIP: 248)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted (1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import clip
    from clip.export import export_onnx

    model, _ = clip.load(
        args.model,
        device="cpu",
        arch=args.arch,
        image_size=args.image_size,
        context_length=args.context_length,
    )
    result = export_onnx(model, args.output, opset=args.opset, check=not args.no_check)
    length = "dynamic (cut after the last end-of-text token)" if result.dynamic_text_length else "fixed"
    print(f"wrote {', '.join(result.files)} to {args.output}; text length {length}")
    for p in result.parity:
        where = f"batch {p.batch}" + (f", length {p.length}" if p.length is not None else "")
        print(f"  {p.graph:5s} {where:22s} max abs {p.max_abs:.2e}  rel {p.rel:.2e}")
    if result.parity and result.worst_rel > args.tolerance:
        print(
            f"clip export: parity {result.worst_rel:.2e} exceeds --tolerance {args.tolerance:g}",
            file=sys.stderr,
        )
        return 1
    return 0
