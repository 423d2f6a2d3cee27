"""The model side of an index: encode images and texts to unit vectors, and name the model by its content.

An index must never mix embeddings of two models, or of one model under two preprocessings.  `model_identity`
is a SHA-256 over everything that changes the vectors: the config JSON, every tensor of the state dict and the
preprocessing parameters (plus this module's image-loading policy, EXIF orientation applied).  Tensors
are hashed after a cast to float16, so the same weights loaded in fp32 on a CPU or in fp16 on a GPU (as
`clip.load` does there) get the same identity, while any real change of the weights (fine-tuning, another
checkpoint) does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from clip.model import CLIP
from clip.runtime import resolve_device

# Bumped whenever the way images are read or vectors are computed changes: old indexes then refuse to mix.
IDENTITY_VERSION = "clip-search-identity-v1"
LOAD_POLICY = "load_image(exif=True)"


def preprocess_params(preprocess: Callable[[Image.Image], torch.Tensor]) -> str:
    """A stable text description of a preprocessing transform (its class and every parameter)."""
    kind = f"{type(preprocess).__module__}.{type(preprocess).__qualname__}"
    if dataclasses.is_dataclass(preprocess) and not isinstance(preprocess, type):
        fields = dataclasses.asdict(preprocess)
        return f"{kind}{sorted(fields.items())}"
    # Other callables (a torchvision Compose, say) print their parameters in their repr.
    return f"{kind}:{preprocess!r}"


def model_identity(model: CLIP, preprocess: Callable[[Image.Image], torch.Tensor]) -> str:
    """SHA-256 hex digest naming `model`'s weights and config together with `preprocess`."""
    h = hashlib.sha256()
    for part in (IDENTITY_VERSION, LOAD_POLICY, model.config.to_json(), preprocess_params(preprocess)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu")
        t = t.to(torch.float16) if t.is_floating_point() else t
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # view(uint8) gives the raw bytes for every dtype (numpy has no bfloat16).
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class Encoder:
    """A CLIP model, its preprocessing and how to load it again (`spec`: a model name or checkpoint path).

    `spec` is None for a model built in memory; an index made with one needs the model passed again to search.
    """

    def __init__(
        self,
        model: CLIP,
        preprocess: Callable[[Image.Image], torch.Tensor],
        spec: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.spec = spec
        self.device = resolve_device(device)  # "auto": CUDA when available (clip.runtime's one rule)

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu") -> Encoder:
        """Load a model name (`ViT-B/32`) or checkpoint path with `clip.load`; paths are stored absolute."""
        from clip.loading import load

        if not spec:
            raise ValueError("no model given: pass a model name (e.g. ViT-B/32) or a checkpoint path")
        model, preprocess = load(spec, device=resolve_device(device))
        stored = os.path.abspath(spec) if os.path.exists(spec) else spec
        return cls(model, preprocess, stored, device)

    @functools.cached_property
    def identity(self) -> str:
        return model_identity(self.model, self.preprocess)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)

    @property
    def resolution(self) -> int:
        return int(self.model.config.vision.image_size)

    def describe(self) -> str:
        return self.spec or "<model in memory>"

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: float32 [N, 3, H, W] (preprocessed) -> unit vectors float32 [N, D] on the CPU."""
        feats = self.model.encode_image(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> unit vectors float32 [N, D]."""
        if not images:
            return torch.empty(0, self.embed_dim)
        return self.encode_pixels(torch.stack([self.preprocess(img) for img in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> unit vectors float32 [N, D]; texts longer than the context are truncated."""
        from clip.loading import get_tokenizer

        if not texts:
            return torch.empty(0, self.embed_dim)
        tokens = get_tokenizer(self.model)(list(texts))  # the model's own (SigLIP, CLIPA, ...), truncating
        feats = self.model.encode_text(tokens.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()


def as_encoder(model: Any, device: str | torch.device = "cpu") -> Encoder:
    """Accept an `Encoder`, a `(model, preprocess)` pair or a model spec string."""
    if isinstance(model, Encoder):
        return model
    if isinstance(model, (str, os.PathLike)):
        return Encoder.load(os.fspath(model), device)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], CLIP):
        net, preprocess = model
        return Encoder(net, preprocess, None, next(net.parameters()).device)
    raise TypeError(
        "model must be a name, a checkpoint path, a (CLIP, preprocess) pair or an Encoder; "
        f"got {type(model).__name__}"
    )
