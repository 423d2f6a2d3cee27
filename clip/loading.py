"""`clip.load` and the model-file API: resolve a name or path, read it, build the model, save it.

Where the architecture comes from, in order (never a silent guess):
  1. `arch=NAME` given by the caller (a registry name: OpenAI's, OpenCLIP's, ours);
  2. the file's own metadata (this project's checkpoints and safetensors, Hugging Face and OpenCLIP
     Hub folders), or an OpenCLIP `open_clip_config.json` beside the weights;
  3. tensor shapes, only where they decide it: OpenAI's nine architectures (OpenAI's TorchScript
     releases say QuickGELU; a bare state dict needs `quick_gelu=` since shapes cannot tell).
Anything else is an error that says which of these to supply.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip.config import CLIPConfig
from clip.convert import StateDict, config_to_hf_config, infer_config, openai_to_hf
from clip.formats import SAFETENSORS_CONFIG_KEY, Reading, read
from clip.io import atomic_path, atomic_torch_save, atomic_write_json
from clip.longclip import LONGCLIP_FORMAT, stretch_state_dict
from clip.model import CLIP, convert_weights, interpolate_positions


@dataclass
class Resolved:
    """A weights file or folder, understood: config, our-layout state dict, where its tokenizer lies."""

    config: CLIPConfig
    state_dict: StateDict
    format: str
    tokenizer_dir: Path | None = None


def _shape_config(reading: Reading, path: Path, quick_gelu: bool | None) -> CLIPConfig:
    from clip.registry import OPENAI_NAMES, get

    if "visual.head.probe" in reading.state_dict:  # SigLIP: many architectures share its tensor shapes
        raise ValueError(
            f"{path} ({reading.format}) is a SigLIP state dict that does not record its architecture: pass "
            "arch=NAME (e.g. arch='ViT-B-16-SigLIP'; `clip models` lists them), or keep OpenCLIP's "
            "open_clip_config.json beside it"
        )
    try:
        candidate = infer_config(reading.state_dict, quick_gelu=True)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    # The context length is read from the shapes too (a stretched OpenAI model, Long-CLIP's 248).
    ctx = {"context_length": candidate.text.context_length}
    openai = [n for n in OPENAI_NAMES if get(n).replace(quick_gelu=True, text=ctx) == candidate]
    hint = "pass arch=NAME (`clip models` lists them; e.g. arch='ViT-H-14'), or keep OpenCLIP's open_clip_config.json beside it"
    if not openai:
        raise ValueError(
            f"{path} ({reading.format}) does not record its architecture, and its tensor shapes do not decide it "
            f"(head count, options): {hint}"
        )
    if quick_gelu is None and not reading.quick_gelu_known:
        raise ValueError(
            f"{path} ({reading.format}) has the shapes of OpenAI's {openai[0]} but does not say whether it runs "
            "QuickGELU (OpenAI's weights, OpenCLIP '-quickgelu' models) or exact GELU (other OpenCLIP models): "
            "pass quick_gelu=True or False (clip convert --quick-gelu yes|no), or arch=NAME"
        )
    return candidate.replace(quick_gelu=True if quick_gelu is None else quick_gelu)


def resolve(path: str | os.PathLike, arch: str | None = None, quick_gelu: bool | None = None) -> Resolved:
    """Read any supported weights file or folder and decide its config (see the module docstring)."""
    from clip.registry import from_open_clip_hub, get

    path = Path(path)
    reading = read(path)
    if arch is not None:
        cfg = get(arch)
    elif reading.config is not None:
        cfg = reading.config
    elif reading.open_clip_config is not None:
        cfg = from_open_clip_hub(reading.open_clip_config, str(path.parent / "open_clip_config.json"))
    else:
        cfg = _shape_config(reading, path, quick_gelu)
    rows = reading.state_dict.get("positional_embedding")
    if reading.format == LONGCLIP_FORMAT and rows is not None and rows.shape[0] != cfg.text.context_length:
        cfg = cfg.replace(text={"context_length": rows.shape[0]})  # arch=NAME of the model it stretched
    if quick_gelu is not None and quick_gelu != cfg.quick_gelu:
        cfg = cfg.replace(quick_gelu=quick_gelu)
    tok_dir = reading.tokenizer_dir or (path.parent if reading.open_clip_config is not None else None)
    return Resolved(cfg, reading.state_dict, reading.format, tok_dir)


def read_checkpoint(
    path: str | os.PathLike, quick_gelu: bool | None = None, arch: str | None = None
) -> tuple[CLIPConfig, StateDict]:
    """Read any supported weights file or folder -> (config, OpenAI-layout state dict)."""
    r = resolve(path, arch=arch, quick_gelu=quick_gelu)
    return r.config, r.state_dict


def model_from_state_dict(config: CLIPConfig, state_dict: StateDict, source: str = "state dict") -> CLIP:
    """Build a CLIP from `config` and load `state_dict` strictly (fp32, CPU, eval mode).

    The module is built on the meta device and the tensors are assigned, so no time is spent on a
    random initialisation that would be overwritten at once.
    """
    with torch.device("meta"):
        model = CLIP(config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    expected = model.state_dict()
    # BatchNorm's step counter is not a weight and some exporters drop it.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = [f"{what} {_preview(keys)}" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]  # fmt: skip
        raise ValueError(
            f"{source} does not match the model architecture: " + "; ".join(parts)
            + ". Is this a CLIP checkpoint of that architecture? (arch= chooses another)"
        )  # fmt: skip
    model.load_state_dict(sd, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and module.num_batches_tracked.is_meta:
            module.num_batches_tracked = torch.zeros((), dtype=torch.long)
    return model.eval()


def _preview(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def resize_image_size(config: CLIPConfig, sd: StateDict, image_size: int) -> tuple[CLIPConfig, StateDict]:
    """Another input resolution for a ViT: position embeddings resampled bicubically (OpenCLIP's force_image_size).

    Antialiased as OpenCLIP's `resize_pos_embed`, so every size gives OpenCLIP's numbers.  Run-time
    `interpolate_pos_encoding=True` follows Hugging Face, which does not antialias; PyTorch's antialiased
    bicubic has another cubic kernel, so the two differ when enlarging too.
    """
    v = config.vision
    if image_size == v.image_size:
        return config, sd
    if v.kind != "vit":
        raise ValueError(
            "image_size= changes the resolution of ViT models only; a ResNet's attention pool is fixed"
        )
    new = config.replace(vision={"image_size": image_size})
    pos = sd["visual.positional_embedding"]
    prefix = 1 if v.class_token else 0
    resized = interpolate_positions(pos, prefix, (new.vision.grid,) * 2, antialias=True)
    sd = {**sd, "visual.positional_embedding": resized}
    return new, sd


def apply_pretrained_cfg(config: CLIPConfig, tag: Any) -> CLIPConfig:
    """A pretrained tag's activation and preprocessing (`clip.pretrained.PretrainedCfg`) onto its config."""
    from clip.registry import apply_preprocess_cfg

    pre = tag.preprocess
    if pre.size != config.vision.image_size:
        raise ValueError(
            f"{tag.name}: its weights expect {pre.size} px but {tag.arch} is {config.vision.image_size} px"
        )
    config = apply_preprocess_cfg(config, {"mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation,
                                           "resize_mode": pre.resize_mode})  # fmt: skip
    return config.replace(quick_gelu=True) if tag.quick_gelu else config


def get_tokenizer(model: CLIP, download_root: str | None = None) -> Any:
    """The tokenizer a model was trained with: ids [N, context_length] from a text or a list of texts.

    OpenAI's BPE (`clip.tokenize`, padded to the model's context length) unless the config names a
    Hugging Face tokenizer (CLIPA, `-worldwide`, SigLIP), which is read from the `tokenizer.json` that
    came with the weights, or fetched from the Hub into the cache when the weights came without it.
    """
    from clip.hf_tokenizer import OpenAITokenizer, TokenizerSpec

    if not isinstance(getattr(model, "config", None), CLIPConfig):  # another library's model: OpenAI's BPE
        return OpenAITokenizer(int(getattr(model, "context_length", 77)))
    t = model.config.text
    spec = TokenizerSpec.from_open_clip_text_cfg(
        {"context_length": t.context_length, "hf_tokenizer_name": t.hf_tokenizer_name,
         "tokenizer_kwargs": t.tokenizer_kwargs}
    )  # fmt: skip
    if spec.kind == "openai":
        return spec.build()
    folder = getattr(model, "tokenizer_dir", None)
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        from clip.hub import download_tokenizer

        folder = download_tokenizer(t.hf_tokenizer_name, download_root)
    return spec.build(folder)


def _resolve_name(
    name: str, pretrained: str | None, download_root: str | None
) -> tuple[Path, str | None, Any]:
    """A model name, 'arch/tag', 'hf-hub:org/repo' or a path -> (local path, arch, tag config)."""
    from clip import hub
    from clip.registry import all_configs

    if name.startswith("hf-hub:"):
        return hub.download_hf_hub(name[len("hf-hub:") :], download_root), None, None
    if name in hub.available_models() and pretrained in (None, "openai"):
        return hub.download(name, download_root), None, None
    if pretrained is None and "/" in name and name.rsplit("/", 1)[0] in all_configs():
        name, pretrained = name.rsplit("/", 1)
    if pretrained is not None:
        from clip.pretrained import get_pretrained_cfg

        tag = get_pretrained_cfg(name, pretrained)
        return hub.download_pretrained(name, pretrained, download_root), name, tag
    if os.path.exists(name):
        return Path(name), None, None
    if name in all_configs():
        raise ValueError(
            f"{name!r} is an architecture without weights of its own: pass pretrained=TAG "
            "(`clip models` lists the tags), a checkpoint path, or build it untrained with clip.CLIP(clip.get_config(name))"
        )
    raise ValueError(
        f"model {name!r} is neither a known model nor an existing path; available models: "
        f"{', '.join(hub.available_models())} (and OpenCLIP names with pretrained=TAG; see `clip models`)"
    )


def load(
    name: str,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | None = None,
    *,
    arch: str | None = None,
    pretrained: str | None = None,
    quick_gelu: bool | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
) -> tuple[CLIP, Any]:
    """openai/CLIP's `clip.load`: a model name or a path -> (model in eval mode, preprocess).

    Also: `pretrained=TAG` with an OpenCLIP architecture name (or "ARCH/TAG"), "hf-hub:org/repo",
    `arch=` for files that do not record their architecture, `quick_gelu=` for bare state dicts,
    `image_size=` to run a ViT at another resolution, `context_length=` (e.g. 248) to stretch the
    text positions as Long-CLIP does (`clip.longclip`).  On CUDA the weights are cast to fp16 as
    openai/CLIP does (LayerNorm still computes in fp32); on CPU they stay fp32.  `jit=True` is
    accepted for compatibility and returns the eager model.
    """
    from clip.preprocess import preprocess_for
    from clip.runtime import resolve_device

    device = resolve_device(device)  # None / "auto": CUDA when available, as openai/CLIP
    if jit:
        warnings.warn("jit=True is not supported; returning the eager model (same outputs)", stacklevel=2)
    path, tag_arch, tag = _resolve_name(name, pretrained, download_root)
    r = resolve(path, arch=arch or tag_arch, quick_gelu=quick_gelu)
    cfg, sd = r.config, r.state_dict
    if tag is not None:
        cfg = apply_pretrained_cfg(cfg, tag)
    if image_size is not None:
        cfg, sd = resize_image_size(cfg, sd, image_size)
    if context_length is not None:
        cfg, sd = stretch_state_dict(cfg, sd, context_length)
    model = model_from_state_dict(cfg, sd, source=str(path)).to(device)
    model.tokenizer_dir = r.tokenizer_dir
    if torch.device(device).type == "cuda":
        convert_weights(model, torch.float16)
    return model, preprocess_for(cfg)


def save_model(model: CLIP, path: str | os.PathLike) -> None:
    """Save weights + config: `.safetensors` (config in the metadata) or a torch pickle, atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_state_dict(model.config, sd, path)


def save_state_dict(config: CLIPConfig, sd: StateDict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata={SAFETENSORS_CONFIG_KEY: config.to_json(), "format": "pt"})
    else:
        atomic_torch_save({"config": config.to_dict(), "state_dict": sd}, path)


def save_hf_folder(
    config: CLIPConfig,
    sd: StateDict,
    folder: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Write a Hugging Face `CLIPModel` folder, each file atomically; returns the file names.

    config.json + model.safetensors, plus the tokenizer files and preprocessor_config.json that
    `CLIPProcessor.from_pretrained` reads (`clip.hf_export`; `tokenizer_dir`: where the files of a
    model's own HF tokenizer lie).
    """
    from safetensors.torch import save_file

    from clip.hf_export import write_processor_files

    folder = Path(folder)
    hf_sd = openai_to_hf(sd)
    hf_cfg = config_to_hf_config(config, float(sd["logit_scale"]))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp), metadata={"format": "pt"})
    written = write_processor_files(config, folder, tokenizer_dir)
    atomic_write_json(folder / "config.json", hf_cfg)  # written last: a folder with it is complete
    return ["config.json", "model.safetensors", *written]
