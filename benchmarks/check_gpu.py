"""Correctness checks of the CUDA code paths, for a machine with a GPU (CI has none; `benchmarks/gpu_suite.sh`
runs this first). Each check prints one JSON line with what it measured; a failed check raises.

    python benchmarks/check_gpu.py            # needs CUDA; open_clip_torch for the parity check

Checks: features vs open_clip on the GPU (fp32, and bf16 autocast vs fp32); fp16 weights
(`convert_weights`) vs fp32; the host-side text cut vs the full context on the GPU; one training step's
loss and gradients on the GPU vs the CPU; the autograd all-gather on a one-rank NCCL group.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
import torch.nn.functional as F

from clip.config import get_config
from clip.loading import model_from_state_dict
from clip.model import CLIP, convert_weights


def report(name: str, **values) -> None:
    print(json.dumps({"check": name, **values}), flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sample_inputs(model: CLIP, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from clip.tokenizer import tokenize

    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    words = ["a photo of a dog", "a red cat on a mat", "diagram", "two people riding bicycles in the rain"]
    texts = tokenize([words[i % len(words)] for i in range(n)], context_length=model.context_length)
    return images, texts.to(device)


@torch.no_grad()
def check_parity_open_clip(device: torch.device) -> None:
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32-quickgelu").eval()
    ours = model_from_state_dict(get_config("ViT-B/32"), ref.state_dict()).eval()
    ref, ours = ref.to(device), ours.to(device)
    images, texts = sample_inputs(ours, 16, device)
    errs = {
        "image_fp32": rel_err(ours.encode_image(images), ref.encode_image(images)),
        "text_fp32": rel_err(ours.encode_text(texts), ref.encode_text(texts)),
    }
    with torch.autocast("cuda", dtype=torch.bfloat16):
        errs["image_bf16_vs_open_clip_bf16"] = rel_err(ours.encode_image(images), ref.encode_image(images))
        errs["text_bf16_vs_open_clip_bf16"] = rel_err(ours.encode_text(texts), ref.encode_text(texts))
    report("parity_open_clip_vit_b32", **{k: round(v, 7) for k, v in errs.items()})
    assert errs["image_fp32"] < 1e-4 and errs["text_fp32"] < 1e-4, errs
    assert errs["image_bf16_vs_open_clip_bf16"] < 3e-2 and errs["text_bf16_vs_open_clip_bf16"] < 3e-2, errs


@torch.no_grad()
def check_fp16_weights(device: torch.device) -> None:
    torch.manual_seed(0)
    model = CLIP(get_config("ViT-B/32")).eval().to(device)
    images, texts = sample_inputs(model, 8, device)
    ref_img, ref_txt = model.encode_image(images), model.encode_text(texts)
    convert_weights(model, torch.float16)
    img, txt = model.encode_image(images), model.encode_text(texts)
    cos_img = float(F.cosine_similarity(img.float(), ref_img, dim=-1).min())
    cos_txt = float(F.cosine_similarity(txt.float(), ref_txt, dim=-1).min())
    logits, _ = model(images, texts)
    report("fp16_weights_vs_fp32", min_cosine_image=round(cos_img, 5), min_cosine_text=round(cos_txt, 5),
           logits_dtype=str(logits.dtype))  # fmt: skip
    assert cos_img > 0.999 and cos_txt > 0.999 and torch.isfinite(logits).all()


@torch.no_grad()
def check_text_cut(device: torch.device) -> None:
    torch.manual_seed(0)
    model = CLIP(get_config("ViT-B/32")).eval().to(device)
    _, texts = sample_inputs(model, 8, device)
    full = model.encode_text(texts)  # on CUDA the model itself keeps the whole context
    cut = model.trim_text(texts.cpu(), multiple=8).to(device)
    err = rel_err(model.encode_text(cut), full)
    report("text_cut_vs_full_context", kept=cut.shape[1], of=texts.shape[1], rel_err=err)
    assert err < 1e-5


def one_step_grads(model: CLIP, images, texts, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    from clip.train.data import Batch
    from clip.train.distributed import DistInfo
    from clip.train.step import ContrastiveModel, StepContext, forward_backward

    inner = ContrastiveModel(model).to(device).train()
    ctx = StepContext(inner, inner, DistInfo(device=device), len(images), contextlib.nullcontext)
    loss = forward_backward([Batch(images, texts, [], {}, 0, 0)], ctx, len(images))
    return float(loss), {n: p.grad.detach().cpu() for n, p in inner.named_parameters() if p.grad is not None}


def check_train_step_gpu_vs_cpu(device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = CLIP(get_config("ViT-Tiny/8@32px"))
    images, texts = sample_inputs(base, 16, torch.device("cpu"))
    cpu = CLIP(base.config)
    cpu.load_state_dict(base.state_dict())
    gpu = CLIP(base.config)
    gpu.load_state_dict(base.state_dict())
    loss_cpu, g_cpu = one_step_grads(cpu, images, texts, torch.device("cpu"))
    loss_gpu, g_gpu = one_step_grads(gpu, images, texts, device)
    worst = max(rel_err(g_gpu[n], g_cpu[n]) for n in g_cpu if g_cpu[n].norm() > 0)
    report("train_step_gpu_vs_cpu", loss_cpu=loss_cpu, loss_gpu=loss_gpu, worst_grad_rel_err=worst)
    assert abs(loss_cpu - loss_gpu) < 1e-4 and worst < 1e-3


def check_nccl_gather(device: torch.device) -> None:
    import torch.distributed as dist

    from clip.train.distributed import all_gather_with_grad

    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group(
            "nccl", init_method=f"file://{f.name}", rank=0, world_size=1, device_id=device
        )
        try:
            x = torch.randn(4, 8, device=device, requires_grad=True)
            y = all_gather_with_grad(x)
            (y * 2).sum().backward()
            ok = torch.equal(y.detach(), x.detach()) and torch.allclose(x.grad, torch.full_like(x, 2.0))
            report("nccl_all_gather_with_grad_one_rank", backend=dist.get_backend(), ok=ok)
            assert ok
        finally:
            dist.destroy_process_group()


def main() -> None:
    assert torch.cuda.is_available(), "this script checks the CUDA paths: run it on a machine with a GPU"
    device = torch.device("cuda")
    report("device", name=torch.cuda.get_device_name(device), torch=torch.__version__,
           cuda=torch.version.cuda, cpu_count=os.cpu_count())  # fmt: skip
    checks = [check_fp16_weights, check_text_cut, check_train_step_gpu_vs_cpu, check_nccl_gather]
    try:
        import open_clip  # noqa: F401

        checks.insert(0, check_parity_open_clip)
    except ImportError:
        report("parity_open_clip_vit_b32", skipped="open_clip_torch is not installed")
    failed = []
    for check in checks:
        try:
            check(device)
        except Exception as exc:  # report every check, then fail
            failed.append(check.__name__)
            report(check.__name__, failed=repr(exc)[:500])
    report("summary", passed=len(checks) - len(failed), failed=failed)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
