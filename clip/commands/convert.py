"""`clip convert SRC DST --to {openai,hf,safetensors}`: lossless conversion between layouts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert weights between OpenAI/OpenCLIP, Hugging Face and safetensors layouts",
        description="Reads anything clip.load reads; writes DST in the chosen layout, keeping dtypes (lossless).",
    )
    p.add_argument("src", help="checkpoint file or Hugging Face folder")
    p.add_argument("dst", help="output file (openai, safetensors) or folder (hf)")
    p.add_argument("--to", required=True, choices=("openai", "hf", "safetensors"), help="output layout")
    p.add_argument("--quick-gelu", choices=("yes", "no"), help="override the activation when SRC lacks it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.loading import resolve, save_hf_folder, save_state_dict

    quick = None if args.quick_gelu is None else args.quick_gelu == "yes"
    r = resolve(args.src, quick_gelu=quick)
    cfg, sd = r.config, r.state_dict
    dst = Path(args.dst)
    if args.to == "hf":
        files = save_hf_folder(cfg, sd, dst, tokenizer_dir=r.tokenizer_dir)
        if not any(f in files for f in ("vocab.json", "tokenizer.json")):
            print(f"note: {cfg.text.hf_tokenizer_name}'s tokenizer files did not come with {args.src}; "
                  "add them to the folder (e.g. AutoTokenizer.from_pretrained(name).save_pretrained(DST))")  # fmt: skip
    elif args.to == "safetensors":
        if dst.suffix != ".safetensors":
            raise ValueError(f"--to safetensors needs a DST ending in .safetensors, got {dst}")
        save_state_dict(cfg, sd, dst)
    else:
        if dst.suffix == ".safetensors":
            raise ValueError(f"--to openai writes a torch pickle; use a .pt DST, not {dst}")
        save_state_dict(cfg, sd, dst)
    print(f"wrote {dst} ({args.to}, {len(sd)} tensors)")
    return 0
