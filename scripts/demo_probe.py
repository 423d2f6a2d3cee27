"""Which tower limits a demo model on held-out concepts?  python scripts/demo_probe.py demo-out/checkpoints/latest.pt

Prints one JSON line for the held-out concepts drawn in the training styles (the "concept" cell):
- zero_shot_top1: images classified by the canonical captions (what the report's table says);
- prototype_top1: per training style, images classified by image prototypes of each concept built from the other
  styles' images (no text: how well the image tower clusters a concept it never saw);
- text_to_prototype_top1: each caption's nearest prototype (all styles) is its own concept's.
A prototype score far above the zero-shot one means the images of a new concept cluster and the text tower is
what misplaces its unseen name.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F


def prototypes(features: torch.Tensor, labels: np.ndarray, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature per class, normalised: [K, D], and which classes had any image: bool [K]."""
    sums = torch.zeros(classes, features.shape[1]).index_add_(0, torch.as_tensor(labels), features)
    counts = torch.bincount(torch.as_tensor(labels), minlength=classes)
    return F.normalize(sums, dim=-1), counts > 0


def probe(checkpoint: str) -> dict:
    import clip
    from clip.data.emoji import load_emoji
    from clip.data.emoji_train import eval_images
    from clip.tokenizer import tokenize

    model, _ = clip.load(checkpoint, device="cpu")
    model.eval()
    data = load_emoji()
    cell = data.cell("concept")
    k = len(cell.class_concepts)
    with torch.no_grad():
        img = F.normalize(model.encode_image(eval_images(data, cell.indices)), dim=-1)
        tokens = tokenize(list(cell.captions), context_length=model.context_length, truncate=True)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
    out = {"checkpoint": checkpoint, "images": len(cell.indices), "classes": k}
    out["zero_shot_top1"] = float(((img @ txt.T).argmax(1).numpy() == cell.labels).mean())
    styles = data.image_style[cell.indices]
    out["prototype_top1"] = {}
    for s in np.unique(styles):
        test = styles == s
        protos, present = prototypes(img[~test], cell.labels[~test], k)
        sims = (img[test] @ protos.T).masked_fill(~present, -2.0)
        out["prototype_top1"][data.style_names[s]] = float(
            (sims.argmax(1).numpy() == cell.labels[test]).mean()
        )
    protos, _ = prototypes(img, cell.labels, k)
    out["text_to_prototype_top1"] = float(((txt @ protos.T).argmax(1) == torch.arange(k)).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a demo run's checkpoints/latest.pt")
    print(json.dumps(probe(parser.parse_args().checkpoint)))


if __name__ == "__main__":
    main()
