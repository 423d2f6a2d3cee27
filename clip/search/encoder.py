"""The model side of an index: encode images and texts to unit vectors, and name the model by its content.

An index must never mix embeddings of two models, or of one model under two preprocessings.  `model_identity`
is a SHA-256 over everything that changes the vectors: the config JSON, every tensor of the state dict and the
preprocessing parameters (plus this module's image-loading policy, EXIF orientation applied).  Tensors
are hashed after a cast to float16, so the same weights loaded in fp32 on a CPU or in fp16 on a GPU (as
`clip.load` does there) get the same identity, while any real change of the weights (fine-tuning, another
checkpoint) does not.

Precision (`Encoder(..., precision=...)`, `clip index --precision`): one of `INDEX_PRECISIONS`, the names
`clip.runtime` (autocast: fp32 / bf16 / fp16) and `clip.cpu_inference` (fp32 / bf16 / int8) define. On the CPU
fp32, bf16 and int8 run the model prepared by `clip.optimize_for_cpu`, as `clip embed` does (fp32 there is the
same arithmetic through oneDNN); elsewhere bf16 / fp16 are autocast around the model. The identity names the
weights, not the precision: an index records its precision apart (`check_precision`), and the agreement with
fp32 measured on the first `AGREEMENT_IMAGES` images it embeds (`Encoder.agreement`).
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

from clip.cpu_inference import cosine_agreement, optimize_for_cpu
from clip.model import CLIP
from clip.runtime import CPU_PRECISIONS, INFERENCE_PRECISIONS, autocast, resolve_device

# Bumped whenever the way images are read or vectors are computed changes: old indexes then refuse to mix.
IDENTITY_VERSION = "clip-search-identity-v1"
LOAD_POLICY = "load_image(exif=True)"
# The precisions an index can be built at: clip.runtime's autocast names and clip.cpu_inference's CPU ones.
INDEX_PRECISIONS = INFERENCE_PRECISIONS  # the names `clip embed` takes (`clip.runtime`)
AGREEMENT_IMAGES = 16  # images embedded a second time in fp32, to measure a precision's agreement
# The per-image cosine with fp32 a lower precision is expected to keep (ViT-B/32 measures >= 0.9999 at bf16
# and int8, see README "CPU precision"); `clip index` says so when a run measures less.
AGREEMENT_FLOOR = 0.99


class PrecisionMismatchError(ValueError):
    """The precision asked for is not the one the index's vectors were computed at."""


def check_precision_name(precision: str, device: torch.device) -> str:
    """`precision` if it is an index precision that runs on `device`; otherwise one clear error."""
    if precision not in INDEX_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use --precision {' / '.join(INDEX_PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"--precision int8 is a CPU precision; on {device} use bf16 or fp16 (or --device cpu)"
        )
    return precision


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
    `precision` (see the module docstring) is how vectors are computed; `model` stays the fp32 model (the
    identity, the tokenizer and the agreement's reference).
    """

    def __init__(
        self,
        model: CLIP,
        preprocess: Callable[[Image.Image], torch.Tensor],
        spec: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.spec = spec
        self.device = resolve_device(device)  # "auto": CUDA when available (clip.runtime's one rule)
        self.precision = check_precision_name(precision, self.device)
        # {"precision", "images", "image_cosine_mean", "image_cosine_min"}: set by measure_agreement
        self.agreement: dict[str, Any] | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (fp32, this precision) vectors measured

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu", precision: str = "fp32") -> Encoder:
        """Load a model name (`ViT-B/32`) or checkpoint path with `clip.load`; paths are stored absolute."""
        from clip.loading import load

        if not spec:
            raise ValueError("no model given: pass a model name (e.g. ViT-B/32) or a checkpoint path")
        check_precision_name(precision, resolve_device(device))  # before the (slow) load
        model, preprocess = load(spec, device=resolve_device(device))
        stored = os.path.abspath(spec) if os.path.exists(spec) else spec
        return cls(model, preprocess, stored, device, precision)

    def with_precision(self, precision: str) -> Encoder:
        """This model and preprocessing at another precision (the identity is kept, not hashed again)."""
        if precision == self.precision:
            return self
        other = Encoder(self.model, self.preprocess, self.spec, self.device, precision)
        if "identity" in self.__dict__:
            other.identity = self.identity
        return other

    @functools.cached_property
    def identity(self) -> str:
        return model_identity(self.model, self.preprocess)

    @functools.cached_property
    def _runner(self) -> tuple[Any, str]:
        """(the module that encodes, the autocast precision around it), prepared on first use."""
        if self.device.type == "cpu" and self.precision in CPU_PRECISIONS:
            # clip embed's CPU route: oneDNN matmuls, bf16 weights or int8 linears; no autocast around it.
            return optimize_for_cpu(self.model, self.precision), "fp32"
        return self.model, self.precision

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
        net, amp = self._runner
        with autocast(self.device, amp):
            feats = net.encode_image(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.inference_mode()
    def measure_agreement(self, pixels: torch.Tensor, vectors: torch.Tensor) -> None:
        """Below fp32: embed the first `AGREEMENT_IMAGES` images seen (over calls) with the fp32 model too and
        record the cosine agreement with `vectors` (`encode_pixels(pixels)`, [N, D]) in `self.agreement`."""
        seen = sum(len(a) for a, _ in self._pairs)
        if self.precision == "fp32" or seen >= AGREEMENT_IMAGES:
            return
        n = min(AGREEMENT_IMAGES - seen, len(pixels))
        ref = F.normalize(self.model.encode_image(pixels[:n].to(self.device)).float(), dim=-1).cpu()
        self._pairs.append((ref, vectors[:n].float().cpu()))
        ref_all, ours = (torch.cat(t) for t in zip(*self._pairs, strict=True))
        cos = cosine_agreement(ref_all, ours)
        self.agreement = {"precision": self.precision, "images": len(ref_all),
                          "image_cosine_mean": cos["mean"], "image_cosine_min": cos["min"]}  # fmt: skip

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
        net, amp = self._runner
        with autocast(self.device, amp):
            feats = net.encode_text(tokens.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()


def recorded_precision(store: Any) -> str | None:
    """The precision an index's vectors were computed at: its recorded one, fp32 for an index from before
    precisions were recorded, None for an index with no model yet. `store` has `get_meta` (clip.search.store)."""
    if store.get_meta("model_identity") is None:
        return None
    return store.get_meta("precision") or "fp32"


def adopt_precision(encoder: Encoder, store: Any, requested: str | None) -> Encoder:
    """`encoder` at the precision of the index in `store`: its recorded one when none is `requested`."""
    built = recorded_precision(store)
    if requested is None and built is not None:
        return encoder.with_precision(built)
    check_precision(store, requested or encoder.precision)
    return encoder


def check_precision(store: Any, precision: str) -> None:
    """Refuse `precision` for an index whose vectors were computed at another (they would be mixed)."""
    built = recorded_precision(store)
    if built is not None and built != precision:
        raise PrecisionMismatchError(
            f"index {str(store.root)!r} was built with --precision {built}, not {precision}: its vectors "
            f"cannot be mixed; rerun with --precision {built} (or leave --precision out), or use a new --index"
        )


def as_encoder(model: Any, device: str | torch.device = "cpu", precision: str | None = None) -> Encoder:
    """Accept an `Encoder`, a `(model, preprocess)` pair or a model spec string (at `precision`, default fp32;
    an `Encoder` keeps its own, at another `precision` only through `Encoder.with_precision`)."""
    if isinstance(model, Encoder):
        return model if precision is None else model.with_precision(precision)
    if isinstance(model, (str, os.PathLike)):
        return Encoder.load(os.fspath(model), device, precision or "fp32")
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], CLIP):
        net, preprocess = model
        return Encoder(net, preprocess, None, next(net.parameters()).device, precision or "fp32")
    raise TypeError(
        "model must be a name, a checkpoint path, a (CLIP, preprocess) pair or an Encoder; "
        f"got {type(model).__name__}"
    )
