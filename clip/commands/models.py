"""`clip models`: list the registered architectures with their sizes and the pretrained weights for each."""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list available models and architectures",
        description="List every architecture `clip.load` knows: OpenAI's releases (ViT-B/32, RN50, ...), "
        "OpenCLIP's (ViT-B-32, ViT-H-14, ...) and the small CPU models, with the pretrained tags of each "
        "(load one with clip.load(ARCH, pretrained=TAG), or ARCH/TAG on the command line).",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def pretrained_tags(name: str, downloadable: set[str]) -> list[str]:
    """The weights that exist for architecture `name`: "openai" for OpenAI's releases, then OpenCLIP's tags.

    This is the one place the listing asks which weights exist; a new source of weights goes here.
    """
    from clip.pretrained import list_pretrained

    tags = ["openai"] if name in downloadable else []
    return tags + [tag for _, tag in list_pretrained(name) if tag not in tags]


def model_rows() -> list[dict[str, Any]]:
    """One row per registered architecture, in the registry's order (OpenAI, OpenCLIP, small models)."""
    from clip.config import registry
    from clip.hub import available_models

    downloadable = set(available_models())
    rows = []
    for name, cfg in registry().items():
        v = cfg.vision
        if v.kind == "vit":
            tower = f"ViT {v.layers}x{v.width} /{v.patch_size}"
        else:
            tower = f"ResNet {'-'.join(map(str, v.layers))} w{v.width}"
        rows.append({
            "name": name, "weights": name in downloadable, "pretrained": pretrained_tags(name, downloadable),
            "image_size": v.image_size, "embed_dim": cfg.embed_dim, "vision": tower,
            "text": f"{cfg.text.layers}x{cfg.text.width}", "quick_gelu": cfg.quick_gelu,
            "activation": _activation(cfg), "sigmoid": cfg.sigmoid,
        })  # fmt: skip
    return rows


def _activation(cfg: Any) -> str:
    """ "quick" (OpenAI's QuickGELU), "gelu", "tanh" (GELU's tanh approximation), or "image/text" when they differ."""
    if cfg.quick_gelu:
        return "quick"
    image, text = ("tanh" if t.gelu_approximate == "tanh" else "gelu" for t in (cfg.vision, cfg.text))
    return image if image == text else f"{image}/{text}"


def format_table(rows: list[dict[str, Any]], width: int = 120) -> list[str]:
    """Aligned lines; the tags wrap under their own column so a long tag list stays readable."""
    name_w = max(len("name"), *(len(r["name"]) for r in rows))
    tower_w = max(len("image tower"), *(len(r["vision"]) for r in rows))
    act_w = max(len("act"), *(len(r["activation"]) for r in rows))
    head = f"{'name':{name_w}} {'px':>4} {'embed':>5}  {'image tower':{tower_w}} {'text':7} {'act':{act_w}} "
    indent = " " * len(head)
    lines = [head + "pretrained"]
    for r in rows:
        left = (
            f"{r['name']:{name_w}} {r['image_size']:>4} {r['embed_dim']:>5}  {r['vision']:{tower_w}} "
            f"{r['text']:7} {r['activation']:{act_w}} "
        )
        tags = " ".join(r["pretrained"]) or "-"
        wrapped = textwrap.wrap(
            tags, max(30, width - len(indent)), break_on_hyphens=False, break_long_words=False
        ) or ["-"]
        lines.append(left + wrapped[0])
        lines += [indent + more for more in wrapped[1:]]
    return lines


def run(args: argparse.Namespace) -> int:
    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for line in format_table(rows, shutil.get_terminal_size((120, 24)).columns):
        print(line)
    print(
        "\nLoad one: clip.load('ViT-H-14', pretrained='laion2b_s32b_b79k') in Python, "
        "ViT-H-14/laion2b_s32b_b79k on the command line."
    )
    return 0
