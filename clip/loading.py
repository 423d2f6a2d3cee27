"""Reading and writing weights in every supported format, and `clip.load`.

Formats read (recognised from content and key patterns, never from a file name):
  * OpenAI TorchScript archives (the released `*.pt` files);
  * OpenAI-layout / OpenCLIP state dicts, bare or inside a training checkpoint
    (`{"state_dict": ...}`, `module.` prefixes), as `.pt`/`.bin` pickles or `.safetensors`;
  * Hugging Face `CLIPModel` folders (`config.json` + `model.safetensors` or `pytorch_model.bin`);
  * this project's checkpoints (`{"config": ..., "state_dict": ...}`, or safetensors with the
    config in its metadata).
Pickles are read with `torch.load(weights_only=True)`, so nothing in a weights file can run
Python code.  TorchScript archives are read by the TorchScript loader, which executes no Python.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from clip.config import CLIPConfig
from clip.convert import (
    StateDict,
    config_to_hf_config,
    hf_config_to_config,
    hf_to_openai,
    infer_config,
    is_hf_state_dict,
    normalize_openai_state_dict,
    openai_to_hf,
)
from clip.io import atomic_path, atomic_torch_save, atomic_write_json
from clip.model import CLIP, convert_weights_to_lp

SAFETENSORS_CONFIG_KEY = "clip_config"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; report them as one
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "Weights only load failed" in str(err):
            msg = "it holds Python objects other than tensors and plain containers, refused for safety"
        raise ValueError(
            f"cannot read checkpoint {path}: {msg}. The file may be truncated or not a PyTorch checkpoint; "
            "re-download or re-export it"
        ) from None


def _read_safetensors(path: Path) -> tuple[StateDict, CLIPConfig | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}; it may be truncated") from None
    cfg = CLIPConfig.from_json(meta[SAFETENSORS_CONFIG_KEY]) if SAFETENSORS_CONFIG_KEY in meta else None
    return sd, cfg


def _read_hf_folder(folder: Path) -> tuple[StateDict, CLIPConfig]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{folder} is a folder but has no config.json; expected a Hugging Face CLIPModel"
        )
    cfg = hf_config_to_config(json.loads(cfg_path.read_text()))
    if (folder / "model.safetensors").is_file():
        sd, _ = _read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        sd = _torch_load(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(
            f"{folder} has config.json but neither model.safetensors nor pytorch_model.bin"
        )
    return hf_to_openai(sd), cfg


def _unwrap(obj: Any, path: Path) -> tuple[StateDict, CLIPConfig | None]:
    """Find the state dict (and our config, if present) inside a loaded pickle."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    cfg = CLIPConfig.from_dict(obj["config"]) if isinstance(obj.get("config"), dict) else None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], cfg
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, cfg
    raise ValueError(f"{path} is a dict without tensors or a 'state_dict' entry; not a CLIP checkpoint")


def read_checkpoint(path: str | os.PathLike, quick_gelu: bool | None = None) -> tuple[CLIPConfig, StateDict]:
    """Read any supported weights file or folder -> (config, OpenAI-layout state dict).

    `quick_gelu` overrides the activation for files that do not record it (bare OpenCLIP state
    dicts trained with exact GELU need `quick_gelu=False`); it defaults to OpenAI's QuickGELU.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
    cfg: CLIPConfig | None = None
    if path.is_dir():
        sd, cfg = _read_hf_folder(path)
    elif _looks_like_safetensors(path):
        sd, cfg = _read_safetensors(path)
    elif _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # "torch.jit is deprecated": OpenAI's files need it
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd, cfg = _unwrap(_torch_load(path), path)
    if is_hf_state_dict(sd):
        sd = hf_to_openai(sd)
    sd = normalize_openai_state_dict(sd)
    if cfg is None:
        cfg = infer_config(sd, quick_gelu=True if quick_gelu is None else quick_gelu)
    elif quick_gelu is not None and quick_gelu != cfg.quick_gelu:
        cfg = CLIPConfig.from_dict({**cfg.to_dict(), "quick_gelu": quick_gelu})
    return cfg, sd


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def build_model(config: CLIPConfig, state_dict: StateDict) -> CLIP:
    """Build a CLIP from `config` and load `state_dict` strictly (fp32, CPU, eval mode).

    The module is built on the meta device and the tensors are assigned, so no time is spent
    on a random initialisation that would be overwritten at once.
    """
    with torch.device("meta"):
        model = CLIP(config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # BatchNorm's step counter is not a weight and some exporters drop it.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise ValueError(
            "state dict does not match the model architecture: "
            + "; ".join(parts)
            + ". Is this a CLIP checkpoint?"
        )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and module.num_batches_tracked.is_meta:
            module.num_batches_tracked = torch.zeros((), dtype=torch.long)
    return model.eval()


def _preview(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def load(
    name: str,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | None = None,
    *,
    quick_gelu: bool | None = None,
) -> tuple[CLIP, Any]:
    """openai/CLIP's `clip.load`: a model name or a path -> (model in eval mode, preprocess).

    On CUDA the weights are cast to fp16 as openai/CLIP does (LayerNorm still computes in fp32);
    on CPU they stay fp32.  `jit=True` is accepted for compatibility and returns the eager model.
    """
    from clip import hub
    from clip.preprocess import image_transform

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if jit:
        warnings.warn("jit=True is not supported; returning the eager model (same outputs)", stacklevel=2)
    if name in hub.available_models():
        path = hub.download(name, download_root)
    elif os.path.exists(name):
        path = Path(name)
    else:
        raise ValueError(
            f"model {name!r} is neither a known model nor an existing path; available models: "
            f"{', '.join(hub.available_models())}"
        )
    cfg, sd = read_checkpoint(path, quick_gelu=quick_gelu)
    model = build_model(cfg, sd).to(device)
    if torch.device(device).type == "cuda":
        convert_weights_to_lp(model, torch.float16)
    return model, image_transform(cfg.vision.image_size, mean=cfg.mean, std=cfg.std)


def save_checkpoint(model: CLIP, path: str | os.PathLike) -> None:
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


def save_hf_folder(config: CLIPConfig, sd: StateDict, folder: str | os.PathLike) -> None:
    """Write a Hugging Face `CLIPModel` folder (config.json + model.safetensors), each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    hf_sd = openai_to_hf(sd)
    hf_cfg = config_to_hf_config(config, float(sd["logit_scale"]))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", hf_cfg)  # written last: a folder with it is complete
