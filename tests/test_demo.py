"""The main job: emoji training pairs, batch order, and the demo pipeline end to end on a slice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clip
from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.data.emoji import load_emoji
from clip.data.emoji_train import EmojiPairs, concept_balanced_order, subset_concepts
from clip.demo import DemoConfig, run_demo


def test_concept_balanced_order_has_distinct_concepts_per_batch():
    rng = np.random.default_rng(0)
    concepts = rng.integers(0, 40, size=300)
    order = concept_balanced_order(concepts, batch_size=16, seed=3)
    for epoch in (0, 1):
        idx = order(epoch)
        assert len(idx) % 16 == 0 and len(idx) > 0.8 * len(concepts)
        assert len(set(idx.tolist())) == len(idx), "a sample appears twice in one epoch"
        for b in idx.reshape(-1, 16):
            assert len(set(concepts[b].tolist())) == 16
    assert not np.array_equal(order(0), order(1))
    assert np.array_equal(order(1), concept_balanced_order(concepts, 16, 3)(1))


def test_emoji_pairs_are_a_function_of_seed_epoch_index():
    data = load_emoji()
    pairs = EmojiPairs(data, data.train_indices()[:50], context_length=32, seed=5)
    a_img, a_tok = pairs.get(7, 2)
    b_img, b_tok = pairs.get(7, 2)
    assert a_img.shape == (3, 32, 32) and a_tok.shape == (32,)
    assert torch.equal(a_img, b_img) and torch.equal(a_tok, b_tok)
    c_img, _ = pairs.get(7, 3)
    assert not torch.equal(a_img, c_img)
    assert int(a_tok.max()) == 49407


def test_subset_concepts_keeps_images_with_their_concepts():
    data = load_emoji()
    keep = np.array([5, 100, 900])
    sub = subset_concepts(data, keep)
    assert sub.num_concepts == 3
    assert list(sub.names) == [str(data.names[c]) for c in keep]
    for new, old in enumerate(keep):
        n_old = int((data.image_concept == old).sum())
        assert int((sub.image_concept == new).sum()) == n_old
        assert np.array_equal(sub.images[sub.image_concept == new], data.images[data.image_concept == old])


def test_demo_end_to_end_beats_chance_on_held_out_concepts(tmp_path):
    small = CLIPConfig(
        embed_dim=64,
        vision=VisionConfig("vit", 32, 64, 2, 2, 8),
        text=TextConfig(context_length=32, width=64, heads=2, layers=2),
        quick_gelu=False,
    )
    # 200 steps: the light regularisation suits so short a run (the defaults are tuned for ~1,800 steps)
    cfg = DemoConfig(
        output_dir=str(tmp_path / "out"), steps=200, model=small, batch_size=48, lr=1e-3, max_concepts=240,
        wd=0.1, gray_blur=0.3, shade=0.0, progress=False,
    )  # fmt: skip
    results = run_demo(cfg)
    for name in ("report.md", "results.json", "curves.png", "examples.png", "checkpoints/latest.pt"):
        assert (tmp_path / "out" / name).is_file(), name
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cells"] == results["cells"] and saved["steps"] == 200
    concept = results["cells"]["concept"]
    # Held-out concepts, never seen in training: top-1 must be several times chance.
    assert concept["top1"] > 4 * concept["chance_top1"], concept
    model, _ = clip.load(str(tmp_path / "out" / "checkpoints" / "latest.pt"), device="cpu")
    assert model.config == small


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_demo_rejects_a_bad_budget(minutes, capsys):
    from clip.cli import main

    assert main(["demo", "--minutes", minutes]) == 2
    assert "--minutes" in capsys.readouterr().err


def test_gray_blur_augmentation_removes_colour_and_smooths():
    data = load_emoji()
    rows = data.train_indices()[:20]
    plain = EmojiPairs(data, rows, context_length=32, seed=1, crop_scale=(1.0, 1.0), jitter=0.0)
    gray = EmojiPairs(data, rows, context_length=32, seed=1, crop_scale=(1.0, 1.0), jitter=0.0, gray_blur=1.0)
    a, _ = plain.get(3, 0)
    b, _ = gray.get(3, 0)
    assert torch.equal(b[0], b[1]) and torch.equal(b[1], b[2])
    # a 3x3 box blur lowers the mean absolute difference between neighbouring pixels
    tv = lambda x: (x[:, 1:] - x[:, :-1]).abs().mean()  # noqa: E731
    assert tv(b) < tv(a.mean(dim=0, keepdim=True))


def _white() -> torch.Tensor:
    from clip.preprocess import CLIP_MEAN, CLIP_STD

    return ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None]


def test_shade_augmentation_darkens_one_side_and_keeps_the_background():
    data = load_emoji()
    rows = data.train_indices()[:20]
    kw = dict(context_length=32, seed=3, crop_scale=(1.0, 1.0), jitter=0.0)
    plain, lit = EmojiPairs(data, rows, **kw), EmojiPairs(data, rows, shade=0.5, **kw)
    a, b = plain.get(5, 0)[0], lit.get(5, 0)[0]
    background = (a - _white()).abs().amax(dim=0) < 1e-4
    assert background.any() and torch.allclose(a[:, background], b[:, background])
    assert not torch.allclose(a, b)
