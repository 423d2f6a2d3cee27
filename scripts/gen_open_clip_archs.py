"""Regenerate clip/data/open_clip_archs.json from an installed open_clip (its model_configs/*.json).

Keeps the configs whose towers are OpenCLIP's own ViT / ModifiedResNet / text Transformer (no timm or
HF towers, no multimodal decoder), as published by OpenCLIP (MIT License; see NOTICE).  The numbers are
facts about the published architectures; `clip.registry` turns each into a `CLIPConfig`.

    .venv/bin/python scripts/gen_open_clip_archs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip


def main() -> None:
    src = Path(open_clip.__file__).parent / "model_configs"
    out: dict[str, dict] = {}
    for path in sorted(src.glob("*.json")):
        cfg = json.loads(path.read_text())
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg")
        if text is None or "timm_model_name" in vision or "hf_model_name" in text or "multimodal_cfg" in cfg:
            continue
        out[path.stem] = cfg
    dest = Path(__file__).resolve().parent.parent / "clip" / "data" / "open_clip_archs.json"
    payload = {"source": f"open_clip {open_clip.__version__} model_configs", "configs": out}
    dest.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} configs -> {dest}")


if __name__ == "__main__":
    main()
