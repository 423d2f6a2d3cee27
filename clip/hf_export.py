"""The processor half of a Hugging Face folder: tokenizer files and `preprocessor_config.json`.

`clip convert --to hf` writes these beside `config.json` + `model.safetensors`, so that
`transformers.CLIPProcessor.from_pretrained(folder)` (and pipelines built on it) accept the folder:

- OpenAI's BPE as `CLIPTokenizer` files: `vocab.json` (symbol -> id, the 49,408 entries in
  `clip.tokenizer`'s order) and `merges.txt` (the 48,894 merges, ranked), built from the packaged
  `bpe_simple_vocab_16e6.txt.gz`, plus `tokenizer_config.json` / `special_tokens_map.json` as in
  OpenAI's own HF repositories (padding with `<|endoftext|>`; `clip.tokenize` pads with 0, which gives
  the same features: the tower pools at the first end-of-text token).  A model trained with another
  tokenizer (`hf_tokenizer_name`) gets the tokenizer files that came with its weights, copied.
- `preprocessor_config.json` for `CLIPImageProcessor`: resize the short side (or squash), centre crop,
  rescale, normalise with the model's mean and std.  transformers 4.x runs it with Pillow, as `clip`'s
  preprocess does; transformers 5.x defaults to a torchvision tensor backend whose antialiased resize
  differs by a few grey levels; `CLIPProcessor.from_pretrained(folder, backend="pil")` gives our numbers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from clip.config import CLIPConfig
from clip.io import atomic_path, atomic_write_json, atomic_write_text

SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>"}  # fmt: skip
_RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL's codes, as transformers stores them
_COPIED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                           "merges.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.txt")  # fmt: skip


def openai_bpe_files() -> tuple[dict[str, int], str]:
    """(vocab.json's mapping, merges.txt's text) of OpenAI's BPE, from the packaged vocabulary."""
    from clip.tokenizer import default_tokenizer

    tok = default_tokenizer()
    ranked = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranked)
    return dict(tok.encoder), merges


def tokenizer_config(context_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor", "model_max_length": context_length,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **SPECIAL,
    }  # fmt: skip


def preprocessor_config(config: CLIPConfig) -> dict[str, Any]:
    """`CLIPImageProcessor` settings equal to `clip.preprocess.image_transform` for this model."""
    size = config.vision.image_size
    resize = {"shortest_edge": size} if config.resize_mode == "shortest" else {"height": size, "width": size}
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": resize, "resample": _RESAMPLE[config.interpolation],
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(config.mean), "image_std": list(config.std), "do_convert_rgb": True,
    }  # fmt: skip


def write_processor_files(
    config: CLIPConfig, folder: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> list[str]:
    """Write the tokenizer files and `preprocessor_config.json` into `folder`, each atomically.

    Returns the names written.  A model with an HF tokenizer (`hf_tokenizer_name`) gets the files of
    `tokenizer_dir` copied; without them its folder has no tokenizer (the caller says so).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if config.text.hf_tokenizer_name is None:
        vocab, merges = openai_bpe_files()
        atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(folder / "merges.txt", merges)
        atomic_write_json(folder / "tokenizer_config.json", tokenizer_config(config.text.context_length))
        atomic_write_json(folder / "special_tokens_map.json", SPECIAL)
        written += ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    elif tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        for name in _COPIED_TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (folder / name).resolve():
                with atomic_path(folder / name) as tmp:
                    shutil.copyfile(src, tmp)
                written.append(name)
    atomic_write_json(folder / "preprocessor_config.json", preprocessor_config(config))
    return written + ["preprocessor_config.json"]
