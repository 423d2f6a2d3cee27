"""One small reader per weights format, each a pure function of the path it claims.

A reader recognises its format from file names and content (never from the model's name) and
returns a `Reading`: the state dict in this project's (OpenAI's) layout, the config when the file
says what it is, the preprocessing it needs, and where its tokenizer files lie.  `read` picks the one
reader that claims the input; none, or two, is a clear error.  Pickles are read with
`torch.load(weights_only=True)`, so nothing in a weights file can run Python code; TorchScript
archives are read by the TorchScript loader, which executes no Python.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip.config import CLIPConfig
from clip.convert import (
    StateDict,
    hf_config_to_config,
    hf_to_openai,
    is_hf_state_dict,
    normalize_openai_state_dict,
)
from clip.longclip import LONGCLIP_FORMAT
from clip.siglip import read_hf_siglip_folder, siglip_to_ours

SAFETENSORS_CONFIG_KEY = "clip_config"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class Reading:
    """What a reader found.  `config` is None when the file does not say which architecture it holds;
    `quick_gelu_known` says whether it states its activation (OpenAI's TorchScript releases do)."""

    format: str
    state_dict: StateDict
    config: CLIPConfig | None = None
    quick_gelu_known: bool = False
    tokenizer_dir: Path | None = None
    open_clip_config: dict[str, Any] | None = None  # an OpenCLIP config found beside the weights


def torch_load(path: Path) -> Any:
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


def read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}; it may be truncated") from None
    return sd, meta


def _config_from_json(text: str, where: str) -> CLIPConfig:
    try:
        return CLIPConfig.from_json(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: the model config is not valid JSON ({err}); re-export the file") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad model config: {err}") from None


def is_safetensors(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _to_our_layout(sd: StateDict) -> StateDict:
    siglip = siglip_to_ours(normalize_openai_state_dict(sd))  # OpenCLIP timm-tower or HF SigLIP keys
    if siglip is not None:
        return siglip
    return _own_text_tower(normalize_openai_state_dict(hf_to_openai(sd) if is_hf_state_dict(sd) else sd))


def _own_text_tower(sd: StateDict) -> StateDict:
    """OpenCLIP's CustomTextCLIP (`custom_text`, training's --force-custom-text) keeps its own text
    Transformer under `text.`, with our (OpenAI's) names below that prefix."""
    if not any(k.startswith("text.") for k in sd) or any(k.startswith("transformer.") for k in sd):
        return sd
    return {k.removeprefix("text."): v for k, v in sd.items()}


def _beside(path: Path) -> dict[str, Any] | None:
    """An OpenCLIP config next to a weights file (a downloaded Hub folder), if there is one."""
    cfg = path.parent / OPEN_CLIP_CONFIG
    if not cfg.is_file():
        return None
    return _read_json(cfg)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------------------------------------- readers
# Each takes a path and returns a Reading, or None when the path is not its format.


def read_torchscript(path: Path) -> Reading | None:
    if not path.is_file() or not is_torchscript(path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": OpenAI's files need it
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    # OpenAI published its TorchScript releases only: QuickGELU, shapes of its nine models.
    return Reading("OpenAI TorchScript archive", normalize_openai_state_dict(sd), quick_gelu_known=True)


def read_safetensors_file(path: Path) -> Reading | None:
    if not path.is_file() or not is_safetensors(path):
        return None
    sd, meta = read_safetensors(path)
    cfg = (
        _config_from_json(meta[SAFETENSORS_CONFIG_KEY], str(path)) if SAFETENSORS_CONFIG_KEY in meta else None
    )
    return Reading("safetensors", _to_our_layout(sd), cfg, cfg is not None, open_clip_config=_beside(path))


def read_pickle(path: Path) -> Reading | None:
    """OpenAI / OpenCLIP state dicts, bare or in a training checkpoint, and this project's checkpoints."""
    if not path.is_file() or is_torchscript(path) or is_safetensors(path):
        return None
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    cfg = None
    if "config" in obj:
        if not isinstance(obj["config"], dict):
            raise ValueError(f"{path}: its 'config' entry is not a model config; re-export the checkpoint")
        cfg = _config_from_json(json.dumps(obj["config"]), str(path))
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    else:
        if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(
                f"{path} is a dict without tensors or a 'state_dict' entry; not a CLIP checkpoint"
            )
        sd = obj
    fmt = "clipforge checkpoint" if cfg is not None else "OpenAI/OpenCLIP state dict"
    # Long-CLIP fine-tunes OpenAI's models, so it runs QuickGELU; its two position tables fold into one.
    longclip = cfg is None and any(k.endswith("positional_embedding_res") for k in sd)
    fmt = LONGCLIP_FORMAT if longclip else fmt
    return Reading(fmt, _to_our_layout(sd), cfg, cfg is not None or longclip, open_clip_config=_beside(path))


def read_hf_clip_folder(path: Path) -> Reading | None:
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        return None
    hf = _read_json(cfg_path)
    if not isinstance(hf, dict) or hf.get("model_type") not in (None, "clip"):
        return None
    cfg = hf_config_to_config(hf)
    sd = _folder_weights(path, ("model.safetensors", "pytorch_model.bin"))
    return Reading("Hugging Face CLIPModel folder", hf_to_openai(sd), cfg, True, tokenizer_dir=path)


def read_open_clip_folder(path: Path) -> Reading | None:
    """OpenCLIP's Hub layout: open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin."""
    if not path.is_dir() or not (path / OPEN_CLIP_CONFIG).is_file():
        return None
    from clip.registry import from_open_clip_hub

    raw = _read_json(path / OPEN_CLIP_CONFIG)
    cfg = from_open_clip_hub(raw, str(path / OPEN_CLIP_CONFIG))
    sd = _folder_weights(path, OPEN_CLIP_WEIGHTS)
    return Reading(
        "OpenCLIP Hub folder", _to_our_layout(sd), cfg, True, tokenizer_dir=path, open_clip_config=raw
    )


def _folder_weights(folder: Path, names: tuple[str, ...]) -> StateDict:
    for name in names:
        file = folder / name
        if file.is_file():
            if name.endswith(".safetensors"):
                return read_safetensors(file)[0]
            obj = torch_load(file)
            return obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    raise FileNotFoundError(f"{folder} has a config but none of the weight files {', '.join(names)}")


READERS: tuple[Callable[[Path], Reading | None], ...] = (
    read_torchscript,
    read_safetensors_file,
    read_pickle,
    read_hf_clip_folder,
    read_open_clip_folder,
    read_hf_siglip_folder,
)


def read(path: Path, readers: tuple[Callable[[Path], Reading | None], ...] = READERS) -> Reading:
    """The one reader that claims `path`; none or several is a clear error."""
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
    claims = [r for r in (reader(path) for reader in readers) if r is not None]
    if not claims:
        what = "folder" if path.is_dir() else "file"
        raise ValueError(
            f"{path}: not a weights {what} this library reads (OpenAI .pt, OpenCLIP/HF state dicts, "
            "safetensors, a Hugging Face CLIP/SigLIP folder, an OpenCLIP Hub folder)"
        )
    if len(claims) > 1:
        raise ValueError(f"{path} looks like several formats at once ({', '.join(c.format for c in claims)})")
    return claims[0]
