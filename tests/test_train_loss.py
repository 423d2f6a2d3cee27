"""The contrastive losses against naive per-row loops, and the gathered loss of 2 gloo processes x batch B
against one process with batch 2B (loss, feature gradients, and a DDP step's parameter gradients)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.train.loss import clip_loss, siglip_loss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine (OpenMP threads spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def naive_clip_loss(img, txt, scale, all_img, all_txt, labels, mask=None) -> torch.Tensor:
    """Row by row: -log softmax of the positive among the unmasked columns, both directions, averaged."""
    losses = []
    for i in range(img.shape[0]):
        cols = [j for j in range(all_txt.shape[0]) if mask is None or mask[j]]
        li = [float(scale * img[i] @ all_txt[j]) for j in cols]
        lt = [float(scale * txt[i] @ all_img[j]) for j in cols]
        pos = cols.index(int(labels[i]))
        ce_i = -(li[pos] - math.log(sum(math.exp(v) for v in li)))
        ce_t = -(lt[pos] - math.log(sum(math.exp(v) for v in lt)))
        losses.append(0.5 * (ce_i + ce_t))
    return torch.tensor(losses, dtype=torch.float64)


def naive_siglip_loss(img, scale, bias, all_txt, labels, mask=None) -> torch.Tensor:
    losses = []
    for i in range(img.shape[0]):
        total = 0.0
        for j in range(all_txt.shape[0]):
            if mask is not None and not mask[j]:
                continue
            z = 1.0 if j == int(labels[i]) else -1.0
            logit = float(scale * img[i] @ all_txt[j] + bias)
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
        losses.append(total)
    return torch.tensor(losses, dtype=torch.float64)


def test_clip_loss_matches_naive_loop():
    img, txt = _features(7, 5, 0)
    scale = torch.tensor(14.3, dtype=torch.float64)
    got = clip_loss(img, txt, scale, reduction="none")
    want = naive_clip_loss(img, txt, scale, img, txt, torch.arange(7))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(clip_loss(img, txt, scale), want.mean())


def test_clip_loss_rows_against_gathered_columns_with_mask():
    all_img, all_txt = _features(10, 4, 1)
    mask = torch.tensor([True] * 8 + [False] * 2)  # two padding columns
    rows = torch.tensor([5, 6, 7])  # this "rank" owns rows 5..7
    scale = torch.tensor(3.0, dtype=torch.float64)
    got = clip_loss(all_img[rows], all_txt[rows], scale, all_image_features=all_img, all_text_features=all_txt,
                    labels=rows, column_mask=mask, reduction="none")  # fmt: skip
    want = naive_clip_loss(all_img[rows], all_txt[rows], scale, all_img, all_txt, rows, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def naive_smoothed_clip_loss(img, txt, scale, all_img, all_txt, labels, eps, mask=None) -> torch.Tensor:
    """Row by row: cross-entropy against 1 - eps on the positive + eps spread evenly over the unmasked columns."""
    losses = []
    for i in range(img.shape[0]):
        cols = [j for j in range(all_txt.shape[0]) if mask is None or mask[j]]
        row = []
        for logits in ([float(scale * img[i] @ all_txt[j]) for j in cols],
                       [float(scale * txt[i] @ all_img[j]) for j in cols]):  # fmt: skip
            log_z = math.log(sum(math.exp(v) for v in logits))
            target = [eps / len(cols) + (1 - eps) * (j == int(labels[i])) for j in cols]
            row.append(-sum(t * (v - log_z) for t, v in zip(target, logits)))
        losses.append(0.5 * sum(row))
    return torch.tensor(losses, dtype=torch.float64)


def test_clip_loss_label_smoothing_matches_torch_and_leaves_padding_columns_out():
    img, txt = _features(7, 5, 4)
    scale = torch.tensor(9.0, dtype=torch.float64)
    got = clip_loss(img, txt, scale, reduction="none", label_smoothing=0.1)
    logits = scale * img @ txt.T
    labels = torch.arange(7)
    want = 0.5 * (F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
                  + F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=0.1))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, naive_smoothed_clip_loss(img, txt, scale, img, txt, labels, 0.1))
    assert (got > clip_loss(img, txt, scale, reduction="none")).any()  # smoothing changes the loss
    # A padded (gathered) batch: torch's smoothing would spread eps over the -inf padding columns (inf loss).
    all_img, all_txt = _features(10, 4, 5)
    mask = torch.tensor([True] * 7 + [False] * 3)
    rows = torch.tensor([2, 4, 6])
    got = clip_loss(all_img[rows], all_txt[rows], scale, all_image_features=all_img, all_text_features=all_txt,
                    labels=rows, column_mask=mask, reduction="none", label_smoothing=0.2)  # fmt: skip
    want = naive_smoothed_clip_loss(all_img[rows], all_txt[rows], scale, all_img, all_txt, rows, 0.2, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_siglip_loss_matches_naive_loop():
    all_img, all_txt = _features(6, 4, 2)
    mask = torch.tensor([True, True, True, True, True, False])
    rows = torch.tensor([1, 3])
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    got = siglip_loss(all_img[rows], all_txt[rows], scale, bias, all_text_features=all_txt, labels=rows,
                      column_mask=mask, reduction="none")  # fmt: skip
    want = naive_siglip_loss(all_img[rows], scale, bias, all_txt, rows, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    full = siglip_loss(all_img, all_txt, scale, bias)
    torch.testing.assert_close(full, naive_siglip_loss(all_img, scale, bias, all_txt, torch.arange(6)).mean())


def test_perfect_alignment_gives_small_loss():
    img, _ = _features(8, 16, 3)
    assert clip_loss(img, img, torch.tensor(100.0, dtype=torch.float64)) < 0.05
    assert clip_loss(img, img.roll(1, 0), torch.tensor(100.0, dtype=torch.float64)) > 10


# ------------------------------------------------------------------------------------- 2 processes (gloo)

B, D, WORLD = 4, 6, 2


def _tiny_clip():
    from clip.config import CLIPConfig, TextConfig, VisionConfig
    from clip.model import CLIP

    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig("vit", image_size=16, width=16, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
    )
    return CLIP(cfg)


def _inputs(n: int):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(n, 3, 16, 16, generator=g)
    texts = torch.randint(1, 98, (n, 8), generator=g)
    texts[:, 5] = 99  # end-of-text (highest id) pools here
    return images, texts


def _batch(images, texts):
    from clip.train.data import Batch

    return Batch(images, texts, [str(i) for i in range(len(images))], {}, 0, 0)


def _step_grads(rank: int, world: int, loss: str, accum: int, micro: int):
    """Gradients of one forward_backward over this rank's share (as the training loop computes them)."""
    from clip.train.distributed import DistInfo, wrap_ddp
    from clip.train.optim import autocast_factory
    from clip.train.step import ContrastiveModel, StepContext, forward_backward

    info = DistInfo(rank, world, 0, torch.device("cpu"))
    inner = ContrastiveModel(_tiny_clip(), loss)
    model = wrap_ddp(inner, info)
    ctx = StepContext(model, inner, info, micro, autocast_factory("fp32", info.device))
    images, texts = _inputs(2 * B)
    per_rank = len(images) // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    imgs, txts = images[mine], texts[mine]
    batches = [
        _batch(imgs[j * micro : (j + 1) * micro], txts[j * micro : (j + 1) * micro]) for j in range(accum)
    ]
    loss_share = forward_backward(batches, ctx, n_valid_global=len(images))
    return loss_share, {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from clip.train.distributed import all_gather_with_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    # 1) the gathered loss on fixed features
    img_all, txt_all = _features(WORLD * B, D, 7)
    img = img_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    txt = txt_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    g_img, g_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
    labels = torch.arange(B) + rank * B
    loss = clip_loss(img, txt, scale, all_image_features=g_img, all_text_features=g_txt, labels=labels,
                     reduction="sum") / (WORLD * B)  # fmt: skip
    loss.backward()
    results["features"] = (loss.detach(), img.grad, txt.grad, scale.grad)
    # 2) a DDP step of a tiny CLIP, plain, with feature-cached accumulation, and with the sigmoid loss
    results["step"] = _step_grads(rank, WORLD, "clip", 1, B)
    results["accum"] = _step_grads(rank, WORLD, "clip", 2, B // 2)
    results["siglip"] = _step_grads(rank, WORLD, "siglip", 1, B)
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.start_processes(_worker, args=(init_file, out), nprocs=WORLD, join=True, start_method="spawn")
        yield [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def test_gathered_loss_and_feature_grads_equal_one_process(gloo_results):
    img_all, txt_all = _features(WORLD * B, D, 7)
    img, txt = img_all.clone().requires_grad_(True), txt_all.clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    ranks = [r["features"] for r in gloo_results]
    torch.testing.assert_close(sum(r[0] for r in ranks), loss.detach(), rtol=1e-12, atol=1e-12)
    # Rank r's features feed every rank's loss: the all-gather backward must sum those contributions.
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), img.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]), txt.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r[3] for r in ranks), scale.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "case,loss,accum", [("step", "clip", 1), ("accum", "clip", 2), ("siglip", "siglip", 1)]
)
def test_ddp_step_gradients_equal_one_process_with_twice_the_batch(gloo_results, case, loss, accum):
    ref_loss, ref = _step_grads(0, 1, loss, accum, 2 * B // accum)
    shares = [r[case][0] for r in gloo_results]
    # Each rank's share is sum(own rows) * world / N: their mean is the global-batch loss.
    torch.testing.assert_close(sum(shares) / WORLD, ref_loss, rtol=1e-5, atol=1e-6)
    for rank_result in gloo_results:
        grads = rank_result[case][1]  # DDP has averaged them: the same on both ranks
        assert set(grads) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{case}: {name}")
    assert ref["clip.logit_scale"].abs() > 0


def test_accumulation_equals_one_big_batch_in_one_process():
    loss_big, big = _step_grads(0, 1, "clip", 1, 2 * B)
    loss_acc, acc = _step_grads(0, 1, "clip", 4, 2 * B // 4)
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-5, atol=1e-6)
    for name, g in big.items():
        # the temperature's gradient is taken once, not once per micro-batch
        torch.testing.assert_close(acc[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_trim_text_cuts_after_last_end_of_text_exactly(tiny_model, monkeypatch):
    """The host-side cut keeps each caption's feature (causal attention) and rounds to a multiple of 8."""
    from clip.tokenizer import tokenize

    trim_text = tiny_model.trim_text
    ctx = tiny_model.context_length
    tokens = tokenize(["a dog", "a photo of a small red cat on a mat"], context_length=ctx)
    last = int(tokens.argmax(dim=-1).max()) + 1
    cut = trim_text(tokens, multiple=8)
    assert cut.shape[1] % 8 == 0 and last <= cut.shape[1] < last + 8
    assert torch.equal(cut, tokens[:, : cut.shape[1]])
    assert trim_text(tokens, multiple=ctx + 5).shape[1] == ctx  # never longer than the context
    # Run the full length (as on a GPU, where the model itself does not cut) and compare.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        full, trimmed = tiny_model.encode_text(tokens), tiny_model.encode_text(cut)
    assert full.shape == trimmed.shape
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_trim_text_keeps_the_eos_token_of_eos_pooled_towers(monkeypatch):
    """OpenCLIP's eos pooling (-worldwide: eos_id 2, below most ids): the cut keeps each row's eos token,
    not the position of the row maximum, so features stay exact; bidirectional towers are never cut."""
    from clip.config import get_config
    from clip.model import CLIP

    torch.manual_seed(0)
    cfg = get_config("ViT-Tiny/8@32px").replace(text={"pool_type": "eos", "eos_id": 2})
    model = CLIP(cfg).eval()
    tokens = torch.ones(2, 32, dtype=torch.long)  # pad id 1, as XLM-R's tokenizer
    tokens[0, :12] = torch.tensor([0, 900, 7, 8, 9, 10, 11, 12, 13, 14, 15, 2])  # eos at 11, max at 1
    tokens[1, :3] = torch.tensor([0, 40000, 2])
    cut = model.trim_text(tokens, multiple=8)
    assert cut.shape[1] == 16
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the full length, as on a GPU
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(cut), model.encode_text(tokens), rtol=1e-5, atol=1e-6)
    bidirectional = CLIP(cfg.replace(text={"no_causal_mask": True}))
    assert bidirectional.trim_text(tokens) is tokens
