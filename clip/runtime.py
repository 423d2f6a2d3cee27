"""One vocabulary for where and how models run: device names and precision names, with their rules.

- Devices: "auto" (the default everywhere: this process's GPU when CUDA is available, else the CPU),
  "cpu", "cuda", "cuda:N".  `resolve_device` is the one rule; every command's `--device` goes through it.
- Precisions: inference autocast is "fp32" / "bf16" / "fp16"; training also takes OpenCLIP's spellings
  "amp_bf16" / "amp_fp16" (and "auto": bf16 autocast on GPUs, fp32 on the CPU).  `autocast_dtype` is the
  one mapping to a torch dtype, `autocast` the one context manager.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# Inference on the CPU through `clip.optimize_for_cpu` (int8: dynamically quantised linear layers, CPU only).
CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
# What `clip embed` / `clip index --precision` take: autocast names on a GPU, plus int8 on the CPU.
INFERENCE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
TRAIN_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "amp_bf16", "amp_fp16")
_DTYPES = {
    "bf16": torch.bfloat16,
    "amp_bf16": torch.bfloat16,
    "fp16": torch.float16,
    "amp_fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """`device` as a torch.device; "auto" / None -> CUDA when available (GPU `local_rank` under torchrun)."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for but CUDA is not available; use --device cpu (or auto)"
            )
        if name == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32); unknown names are a clear error."""
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on `device`'s type: off for fp32, bf16 or fp16 autocast otherwise (weights stay put)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
