"""CLIPScore and RefCLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", arXiv:2104.08718): how well a caption (or a generation prompt) matches an image.

    CLIP-S(c, v)       = w * max(cos(c, v), 0)                                   w = 2.5
    RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))

c, v and r are CLIP's text, image and reference-caption features. The paper's w = 2.5 stretches the scores of
ViT-B/32 (cosines mostly in 0..0.4) toward 0..1. Following the paper and its reference code, only the
image-text term carries w; the text-text term is the plain clipped cosine. The harmonic mean of two zeros is
defined as 0 here (the reference code would divide by zero). The paper prefixes each caption with
"A photo depicts" (`prefix=PAPER_PREFIX`), for candidates and references alike; here it is off by default.

torchmetrics' `clip_score` is `max(100 * mean_i cos_i, 0)`: w = 100, no prefix, and the clamp at 0 applies to
the *mean* over the batch, not to each pair. Per pair (a batch of one) it is exactly `100 / w` times CLIP-S;
with negative cosines in a batch its mean is lower than 100 / w times the mean CLIP-S reported here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PAPER_W = 2.5
PAPER_PREFIX = "A photo depicts"
TORCHMETRICS_W = 100.0


def with_prefix(captions: Sequence[str], prefix: str | None) -> list[str]:
    """`prefix + " " + caption` for each caption (a space is added if the prefix lacks one, as in the paper)."""
    if not prefix:
        return list(captions)
    sep = "" if prefix.endswith(" ") else " "
    return [f"{prefix}{sep}{c}" for c in captions]


def clip_score_from_features(
    image_features: torch.Tensor, text_features: torch.Tensor, w: float = PAPER_W
) -> torch.Tensor:
    """CLIP-S of matching rows: image_features [N, D], text_features [N, D] (any norm) -> [N] float32."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must both be [N, D], got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    cos = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)
    return w * cos.clamp(min=0)


def reference_similarity(
    text_features: torch.Tensor, reference_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """max(max_r cos(c_i, r), 0) for each candidate: text_features [N, D], reference_features N x [R_i, D] -> [N]."""
    if len(reference_features) != len(text_features):
        raise ValueError(f"{len(text_features)} captions but references for {len(reference_features)}")
    cand = F.normalize(text_features.float(), dim=-1)
    out = torch.empty(len(cand))
    for i, refs in enumerate(reference_features):
        if refs.ndim != 2 or len(refs) == 0:
            raise ValueError(
                f"caption {i}: references must be a non-empty [R, D] tensor, got {tuple(refs.shape)}"
            )
        out[i] = (F.normalize(refs.float(), dim=-1) @ cand[i]).max().clamp(min=0)
    return out


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b) element-wise for a, b >= 0; 0 where both are 0."""
    total = a + b
    return torch.where(
        total > 0, 2 * a * b / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(a)
    )


def ref_clip_score_from_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    reference_features: Sequence[torch.Tensor],
    w: float = PAPER_W,
) -> torch.Tensor:
    """RefCLIP-S: image_features [N, D], text_features [N, D], reference_features N x [R_i, D] -> [N]."""
    return harmonic_mean(
        clip_score_from_features(image_features, text_features, w),
        reference_similarity(text_features, reference_features),
    )


@dataclass(frozen=True)
class Scores:
    """Per-pair scores: clip_score [N]; ref_clip_score [N] when references were given, else None."""

    clip_score: torch.Tensor
    ref_clip_score: torch.Tensor | None = None

    def mean(self) -> dict[str, float | None]:
        """{'clip_score': mean CLIP-S, 'ref_clip_score': mean RefCLIP-S or None}."""
        ref = None if self.ref_clip_score is None else float(self.ref_clip_score.mean())
        return {"clip_score": float(self.clip_score.mean()), "ref_clip_score": ref}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _default_preprocess(model: Any) -> Any:
    from clip.preprocess import preprocess_for

    return preprocess_for(model.config)


def encode_captions(
    model: Any, captions: Sequence[str], prefix: str | None = None, *, batch_size: int = 256,
    precision: str = "fp32", progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Unit-norm text features [N, D] of `captions` (prefixed, with the model's tokenizer, truncated)."""
    from clip.evaluation.features import EncodeOptions, encode_texts
    from clip.loading import get_tokenizer

    tokens = get_tokenizer(model)(with_prefix(captions, prefix))
    return encode_texts(
        model.encode_text, tokens, EncodeOptions(batch_size, 0, _device_of(model), precision, progress)
    )


def encode_image_inputs(
    model: Any, images: torch.Tensor | Sequence[Any], preprocess: Any = None, *, batch_size: int = 64,
    workers: int = 0, precision: str = "fp32", progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Unit-norm image features [N, D] of preprocessed pixels [N, 3, H, W], or of paths / PIL images.

    Raises ValueError naming the first unreadable file (the `clip score` command skips them instead).
    """
    from PIL import Image

    from clip.evaluation.features import EncodeOptions, autocast, encode_images

    device = _device_of(model)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image pixels must be [N, 3, H, W], got {tuple(images.shape)}")
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                with autocast(device, precision):
                    feats = model.encode_image(images[start : start + batch_size].to(device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)
    preprocess = preprocess or _default_preprocess(model)
    if all(isinstance(x, Image.Image) for x in images):
        return encode_image_inputs(model, torch.stack([preprocess(x) for x in images]), batch_size=batch_size,
                                   precision=precision)  # fmt: skip
    paths = [str(x) for x in images]
    enc = encode_images(
        model.encode_image, paths, preprocess, EncodeOptions(batch_size, workers, device, precision, progress)
    )
    if enc.failed:
        i, message = enc.failed[0]
        raise ValueError(f"cannot score image {paths[i]!r}: {message}")
    return enc.features


def clip_score(
    model: Any = None,
    images: torch.Tensor | Sequence[Any] | None = None,
    captions: Sequence[str] | None = None,
    references: Sequence[Sequence[str]] | None = None,
    *,
    image_features: torch.Tensor | None = None,
    text_features: torch.Tensor | None = None,
    reference_features: Sequence[torch.Tensor] | None = None,
    w: float = PAPER_W,
    prefix: str | None = None,
    preprocess: Any = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> Scores:
    """CLIPScore (and RefCLIPScore when references are given) of N image-caption pairs.

    Give each side either as inputs for `model` (a `clip.load` model) or as features:
    images: pixels [N, 3, H, W] already preprocessed, or N image paths / PIL images (preprocessed with
    `preprocess`, default the model's own transform); or image_features [N, D].
    captions: N strings (the `prefix`, e.g. `PAPER_PREFIX`, is put before each); or text_features [N, D].
    references: N lists of reference captions (prefixed the same way); or reference_features N x [R_i, D].
    Returns `Scores` with per-pair tensors [N]; `Scores.mean()` gives the means.
    """
    if (images is None) == (image_features is None):
        raise ValueError("pass exactly one of images= or image_features=")
    if (captions is None) == (text_features is None):
        raise ValueError("pass exactly one of captions= or text_features=")
    if references is not None and reference_features is not None:
        raise ValueError("pass at most one of references= or reference_features=")
    needs_model = images is not None or captions is not None or references is not None
    if needs_model and model is None:
        raise ValueError("images, captions or references given as inputs need a model (clip.load(...))")
    if image_features is None:
        image_features = encode_image_inputs(
            model, images, preprocess, batch_size=batch_size, precision=precision
        )
    if text_features is None:
        text_features = encode_captions(model, list(captions), prefix, precision=precision)
    if len(image_features) != len(text_features):
        raise ValueError(f"{len(image_features)} images but {len(text_features)} captions")
    if references is not None:
        flat = [r for refs in references for r in refs]
        if len(references) != len(text_features) or any(len(r) == 0 for r in references):
            raise ValueError("references must hold a non-empty list of captions for every image")
        feats = encode_captions(model, flat, prefix, precision=precision)
        bounds = [0, *itertools.accumulate(len(r) for r in references)]
        reference_features = [feats[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    scores = clip_score_from_features(image_features, text_features, w)
    ref = None
    if reference_features is not None:
        ref = harmonic_mean(scores, reference_similarity(text_features, reference_features))
    return Scores(scores, ref)


# ---------------------------------------------------------------------------------------- a folder of pairs


def read_references(path: str) -> dict[str, list[str]]:
    """A JSON object {image key: [reference caption, ...]} (keys as `clip score` lists them: relative paths)."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(r, str) for r in v) for v in data.values()
    ):
        raise ValueError(f"{path}: expected a JSON object mapping each image to a non-empty list of captions")
    return data


def score_collection(
    model: Any, preprocess: Any, collection: Any, references: dict[str, list[str]] | None = None, *,
    w: float = PAPER_W, prefix: str | None = None, batch_size: int = 64, workers: int = 0,
    precision: str = "fp32", progress: bool = True,
) -> dict:  # fmt: skip
    """Score every pair of a `clip.collection.sources.Collection` (folder or table); bad pairs are skipped.

    Returns the JSON report: settings, `count`, means, `images` (key, caption, clip_score and, with references,
    ref_clip_score per scored image, in input order) and `errors` (key, error) for the pairs left out.
    """
    from clip.collection.sources import read_caption
    from clip.evaluation.features import EncodeOptions, encode_images

    if collection.kind == "tar":
        raise ValueError("clip score reads a folder of images or a CSV/TSV/Parquet table, not tar shards")
    samples = [s for unit in collection.units(max(1, len(collection))) for s in collection.samples(unit)]
    errors: list[dict] = []
    usable = []
    for s in samples:
        caption = read_caption(s)
        if not caption.strip():
            hint = f"write {s.caption_path}" if s.caption_path else "fill its caption column"
            errors.append({"key": s.key, "error": f"no caption for {s.key!r}: {hint}"})
        elif references is not None and s.key not in references:
            errors.append({"key": s.key, "error": f"no references for {s.key!r} in the references file"})
        else:
            usable.append((s, caption))
    if not usable:
        first = f"; first: {errors[0]['error']}" if errors else ""
        raise ValueError(f"none of the {len(samples)} pairs can be scored{first}")
    device = _device_of(model)
    options = EncodeOptions(batch_size, workers, device, precision, progress)
    enc = encode_images(
        model.encode_image, [s.path or "" for s, _ in usable], preprocess, options, desc="images"
    )
    errors += [{"key": usable[i][0].key, "error": message} for i, message in enc.failed]
    kept = [usable[i] for i in enc.index.tolist()]
    refs = [references[s.key] for s, _ in kept] if references is not None else None
    scores = clip_score(model, image_features=enc.features, captions=[c for _, c in kept], references=refs,
                        w=w, prefix=prefix, precision=precision)  # fmt: skip
    rows = []
    for k, (s, caption) in enumerate(kept):
        row = {"key": s.key, "caption": caption, "clip_score": float(scores.clip_score[k])}
        if scores.ref_clip_score is not None:
            row["ref_clip_score"] = float(scores.ref_clip_score[k])
        rows.append(row)
    means = scores.mean()
    return {
        "w": w,
        "prefix": prefix,
        "count": len(rows),
        "mean_clip_score": means["clip_score"],
        "mean_ref_clip_score": means["ref_clip_score"],
        "images": rows,
        "errors": errors,
    }
