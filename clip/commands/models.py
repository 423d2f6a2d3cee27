"""`clip models`: list the downloadable OpenAI checkpoints and the registered architectures."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list available models and architectures")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.config import registry
    from clip.hub import available_models

    downloadable = set(available_models())
    rows = []
    for name, cfg in registry().items():
        v = cfg.vision
        tower = (
            f"ViT {v.layers}x{v.width} /{v.patch_size}"
            if v.kind == "vit"
            else f"ResNet {v.layers} w{v.width}"
        )
        rows.append({
            "name": name, "weights": name in downloadable, "image_size": v.image_size,
            "embed_dim": cfg.embed_dim, "vision": tower, "text": f"{cfg.text.layers}x{cfg.text.width}",
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':18} {'weights':8} {'px':>4} {'embed':>5}  {'image tower':24} text")
    for r in rows:
        w = "openai" if r["weights"] else "-"
        print(f"{r['name']:18} {w:8} {r['image_size']:>4} {r['embed_dim']:>5}  {r['vision']:24} {r['text']}")
    return 0
