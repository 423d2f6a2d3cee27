"""Zero-shot classifier weights from class names and prompt templates (CLIP's prompt ensemble).

For each class c and template t the text ``t.replace("{}", c)`` is embedded; the class weight is the
normalised mean of the normalised template embeddings (Radford et al., 2021, section 3.1.4), exactly as
OpenAI's "Prompt Engineering for ImageNet" notebook computes it.

Two things make 1,000 classes x 80 templates fast without changing the result:

* all class x template texts are encoded together in large batches, sorted by token count so that a batch
  holds texts of similar length, and summed per class with `index_add_` (no per-class loop);
* the text Transformer is causal and pools at the end-of-text token, so the features of a text depend only
  on the tokens up to its end-of-text token: each batch is cut to its longest text (prompts are ~10 of 77
  positions) on the CPU, before it goes to the device, so no host sync is needed on an accelerator either.
  This holds for this project's `clip.model.CLIP` with a causal text tower; SigLIP's bidirectional tower, and
  any other model (anything with `encode_text`), gets the full context length.

The default tokenizer is the model's own (`clip.get_tokenizer`: SigLIP's and CLIPA's are Hugging Face
tokenizers), OpenAI's BPE for every other model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip.data.templates import check_templates, format_prompts


def _trim(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cut a batch of ids [B, context_length] after its longest text, for this project's causal CLIP only."""
    from clip.model import CLIP

    if not isinstance(model, CLIP):
        return tokens  # other libraries' models (e.g. OpenCLIP's) get the full length
    return model.trim_text(tokens)


def _default_tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    from clip.loading import get_tokenizer

    return get_tokenizer(model)  # OpenAI's BPE, or the HF tokenizer its config names (SigLIP, CLIPA, ...)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
    device: str | torch.device | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Zero-shot classifier weights: float32 [embed_dim, n_classes], each column of unit norm.

    model: a CLIP (anything with `encode_text`; put it in eval mode first). classnames: C names.
    templates: T strings with ``{}`` (e.g. ``clip.data.templates.templates("imagenet")``). `batch_size`
    texts are encoded at a time; `device` defaults to the model's. `tokenizer` maps a list of texts to
    ids [N, context_length] (default: the model's own, truncating at its context length).
    Image features [N, D] (normalised) @ the result gives cosine logits [N, C].
    """
    classnames = list(classnames)
    if not classnames:
        raise ValueError("zero_shot_classifier needs at least one class name")
    templates = check_templates(list(templates), "the templates given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    tokenizer = tokenizer or _default_tokenizer(model)

    # Class-major order: text i belongs to class i // T.
    texts = [p for c in classnames for p in format_prompts(c, templates)]
    tokens = tokenizer(texts)  # [C*T, context_length]
    owner = torch.arange(len(classnames)).repeat_interleave(len(templates))  # [C*T] class of each text
    # Longest first: similar lengths share a batch (less padding) and the first batch shows the memory peak.
    order = torch.argsort(tokens.argmax(dim=-1), descending=True, stable=True)
    sums: torch.Tensor | None = None
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="class prompts", unit="batch", leave=False)
    for start in starts:
        idx = order[start : start + batch_size]
        feats = model.encode_text(_trim(model, tokens[idx]).to(device))  # cut on the CPU: no device sync
        feats = F.normalize(feats.float(), dim=-1)  # [B, D]
        if sums is None:
            sums = torch.zeros(len(classnames), feats.shape[1], device=device)
        sums.index_add_(0, owner[idx].to(device), feats)
    # The mean of the T unit vectors, renormalised; dividing by T first would not change the direction.
    return F.normalize(sums, dim=-1).t().contiguous()


def zero_shot_probabilities(
    model: nn.Module, image_features: torch.Tensor, classifier: torch.Tensor
) -> torch.Tensor:
    """L2-normalised image features [N, D] and `zero_shot_classifier` weights [D, C] -> probabilities [N, C].

    A sigmoid model (SigLIP: `model.config.sigmoid`) scores every label on its own, sigmoid(scale * cos +
    bias): its own logits (`CLIP.logits`) through a sigmoid, as SigLIP defines them (Zhai et al., 2023), so
    a row need not sum to 1.  Any other model: the softmax over the labels of its learned scale times the
    cosines, the scale clamped at 100 as OpenAI clamps it in training (100 for a model without one).
    """
    cos = image_features.float() @ classifier.to(image_features.device).float()  # [N, C]
    if getattr(getattr(model, "config", None), "sigmoid", False):
        scale = model.logit_scale.detach().float().exp().to(cos.device)
        return torch.sigmoid(scale * cos + model.logit_bias.detach().float().to(cos.device))
    scale = model.logit_scale.detach().exp().clamp(max=100.0) if hasattr(model, "logit_scale") else 100.0
    return (float(scale) * cos).softmax(dim=-1)


def classify_images(
    model: nn.Module, preprocess: Callable[[Any], torch.Tensor], images: Sequence[str], labels: Sequence[str],
    templates: Sequence[str] = ("{}",), top: int = 5, options: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Zero-shot classify image files against `labels` (prompt-ensembled over `templates`).

    Returns {"labels", "n_templates", "results": [{"image", "predictions": [{"label", "probability"}]}],
    "n_skipped", "skipped"}; unreadable images are skipped and listed.  Probabilities are softmaxes over
    the labels, or per-label sigmoids for SigLIP models (`zero_shot_probabilities`).
    """
    from clip.evaluation.features import DEFAULT_OPTIONS, describe_failures, encode_images
    from clip.runtime import autocast

    options = options or DEFAULT_OPTIONS
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    with autocast(options.device, options.precision):
        classifier = zero_shot_classifier(
            model, list(labels), list(templates), device=options.device
        )  # [D, K]
    enc = encode_images(model.encode_image, list(images), preprocess, options)
    probs = zero_shot_probabilities(model, enc.features, classifier.cpu())  # [N_ok, K]
    best = probs.topk(min(top, len(labels)), dim=-1)
    results = [
        {
            "image": images[int(i)],
            "predictions": [
                {"label": labels[int(j)], "probability": round(float(p), 6)} for p, j in zip(values, indices)
            ],
        }
        for i, values, indices in zip(enc.index, best.values, best.indices)
    ]
    return {
        "labels": list(labels),
        "n_templates": len(templates),
        "results": results,
        "n_skipped": enc.n_skipped,
        "skipped": describe_failures(list(images), enc.failed, limit=len(enc.failed)),
    }
