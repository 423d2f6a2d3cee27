"""The main job: emoji training pairs, batch order, and the demo pipeline end to end on a slice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clip
from clip import demo_pace as pace
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


def _one_at_a_time(pairs: EmojiPairs, i: int, epoch: int) -> torch.Tensor:
    """The augmentation restated for one image, op by op (the pre-batching implementation)."""
    import math

    from PIL import Image as PILImage

    from clip.preprocess import CLIP_MEAN, CLIP_STD

    rng = np.random.default_rng([pairs.seed, epoch, i])
    image = pairs.crop(PILImage.fromarray(pairs.data.images[int(pairs.indices[i])]), rng)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    b, c, s = 1 + pairs.jitter * (2 * rng.random(3) - 1)
    m, gray = image.mean(), image.mean(dim=0, keepdim=True)
    image = m + c * (gray + s * (image - gray) - m) + (b - 1) * 2.0
    u = rng.random(2)
    if u[0] < pairs.gray_blur:
        image = image.mean(dim=0, keepdim=True).expand_as(image)
    if u[1] < pairs.gray_blur:
        image = torch.nn.functional.avg_pool2d(image[None], 3, 1, 1, count_include_pad=False)[0]
    angle, strength = (float(v) for v in rng.random(2) * np.array([2 * np.pi, pairs.shade]))
    axis = torch.linspace(-1.0, 1.0, image.shape[-1])
    ramp = 1 + strength * (math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None])
    pixels = image * std + mean
    pixels = torch.where((pixels < 0.95).any(dim=0), (pixels * ramp).clamp(0, 1), pixels)
    return (pixels - mean) / std


def test_a_batch_equals_its_samples_one_at_a_time():
    """get_batch runs the pixel work on the whole batch; each sample still depends only on (seed, epoch, index)."""
    from clip.train.data import IndexedPairs

    data = load_emoji()
    pairs = EmojiPairs(data, data.train_indices()[:300], context_length=32, seed=4, jitter=0.3, gray_blur=0.5,
                       shade=0.4)  # fmt: skip
    positions = [3, 250, 17, 99, 100, 5, 42, 211]
    images, tokens = pairs.get_batch(positions, 6)
    assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 32) and tokens.dtype == torch.int32
    for j, i in enumerate(positions):
        torch.testing.assert_close(images[j], _one_at_a_time(pairs, i, 6), rtol=0, atol=1e-5)
        alone_img, alone_tok = pairs.get(i, 6)
        torch.testing.assert_close(alone_img, images[j], rtol=0, atol=1e-6)
        assert torch.equal(alone_tok, tokens[j])
    # The DataLoader's batched fetch goes through get_batch, with the keys and order of item-by-item fetching.
    items = [(6, 0, i) for i in positions]
    view = IndexedPairs(pairs)
    for got, want in zip(view.__getitems__(items), [view[it] for it in items], strict=True):
        assert got[:3] == want[:3] and torch.equal(got[4], want[4])
        torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-6)


class _Flaky:
    """A data set whose batched path fails: the batch is retried item by item, and the bad item alone skipped."""

    def __len__(self) -> int:
        return 4

    def get(self, i: int, epoch: int):
        if i == 2:
            raise ValueError("sample 2 is unreadable")
        return torch.full((3, 2, 2), float(i)), torch.zeros(4, dtype=torch.int32)

    def get_batch(self, indices, epoch):
        raise ValueError("one of them is unreadable")


def test_cached_caption_tokens_equal_a_fresh_tokenization():
    """Each distinct caption is tokenized once per process; every batch must still get its own captions' ids."""
    from clip.data.emoji import sample_caption
    from clip.tokenizer import tokenize

    data = load_emoji()
    pairs = EmojiPairs(data, data.train_indices()[:64], context_length=32, seed=2)
    for epoch in range(4):  # later epochs mostly hit the cache; some captions are new (keyword draws)
        positions = list(range(64))
        _, tokens = pairs.get_batch(positions, epoch)
        captions = []
        for i in positions:
            rng = np.random.default_rng([pairs.seed, epoch, i])
            pairs.crop.get_params(data.size, data.size, rng)
            rng.random(3)  # the jitter's draws (gray_blur and shade are off)
            concept = data.concept(int(data.image_concept[pairs.indices[i]]))
            captions.append(sample_caption(concept, rng))
        assert torch.equal(tokens, tokenize(captions, context_length=32, truncate=True))
    assert 0 < len(pairs._token_cache) < 4 * 64  # captions repeat across epochs


def test_a_failing_batch_falls_back_to_items():
    from clip.train.data import IndexedPairs

    out = IndexedPairs(_Flaky()).__getitems__([(0, 0, i) for i in range(4)])
    assert [len(o) for o in out] == [5, 5, 4, 5] and "unreadable" in out[2][3]
    assert float(out[3][3][0, 0, 0]) == 3.0


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
    out = tmp_path / "out"
    for name in (
        "report.md",
        "results.json",
        "curves.png",
        "examples.png",
        "retrieval.png",
        "checkpoints/latest.pt",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == results["cells"] and saved["steps"] == 200
    concept = results["cells"]["concept"]
    # Held-out concepts, never seen in training: top-1 must be several times chance.
    assert concept["top1"] > 4 * concept["chance_top1"], concept
    # Text -> image over the held-out pool: far above a random ranking too.
    ret = saved["retrieval"]["metrics"]
    assert ret["recall@5"] > 1.5 * ret["chance_recall_at_5"], ret
    assert (
        ret["queries"] == concept["classes"]
        and ret["pool_images"] == concept["images"] + saved["cells"]["both"]["images"]
    )
    for kind, cats in saved["by_category"].items():
        assert sum(c["images"] for c in cats.values()) == saved["cells"][kind]["images"]
        weighted = sum(c["top1"] * c["images"] for c in cats.values()) / saved["cells"][kind]["images"]
        assert weighted == pytest.approx(saved["cells"][kind]["top1"], abs=2e-3)
    assert len(saved["retrieval"]["examples"]) == 6
    assert saved["pace"]["threads_used"] and sum(saved["pace"]["threads_used"].values()) == 200
    report = (out / "report.md").read_text()
    for section in (
        "## The machine",
        "## By category",
        "## Text to image",
        "retrieval.png",
        "Fixed length: 200",
    ):
        assert section in report, section
    model, _ = clip.load(str(out / "checkpoints" / "latest.pt"), device="cpu")
    assert model.config == small
    # scripts/demo_probe.py on the same checkpoint: all 263 held-out concepts (the run trained on a slice).
    probe = _script("demo_probe").probe(str(out / "checkpoints" / "latest.pt"))
    assert probe["images"] == 789 and probe["classes"] == 263
    chance = 1 / 263
    assert probe["zero_shot_top1"] > 2 * chance and probe["text_to_prototype_top1"] > 2 * chance, probe
    assert set(probe["prototype_top1"]) == {"google", "twitter", "openmoji"}
    assert min(probe["prototype_top1"].values()) > 4 * chance, probe


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_cfg(tmp_path, **kw) -> DemoConfig:
    small = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig("vit", 32, 32, 1, 2, 8),
        text=TextConfig(context_length=32, width=32, heads=2, layers=1),
        quick_gelu=False,
    )
    args = dict(output_dir=str(tmp_path / "out"), model=small, batch_size=16, max_concepts=60, progress=False,
                timing_cache=str(tmp_path / "timing.json"))  # fmt: skip
    return DemoConfig(**{**args, **kw})


def _fake_calibration(busy: bool) -> pace.Calibration:
    """Injected timings (no real timing in tests): idle, or two CPU-bound processes competing."""
    if busy:
        timings = (pace.StepTiming(2, 2.0, 0.5), pace.StepTiming(1, 0.2, 0.1))
        return pace.Calibration(timings, 0.0, 0.0, competing=2.0, cpu_count=2)
    # One thread is the faster here: a tiny model, and a test must not spin two threads on a shared machine.
    timings = (pace.StepTiming(2, 0.1, 0.2), pace.StepTiming(1, 0.06, 0.06))
    return pace.Calibration(timings, 0.0, 0.0, competing=0.0, cpu_count=2)


def _loadavg(monkeypatch, load: float) -> None:
    """The load average the run sees (the real one depends on whatever else this machine runs)."""
    monkeypatch.setattr(pace, "loadavg", lambda: (load, load, load))


def test_demo_on_a_busy_machine_keeps_its_planned_steps_and_says_so(tmp_path, monkeypatch):
    import clip.demo as demo

    monkeypatch.setattr(demo, "calibrate", lambda *a: _fake_calibration(busy=True))
    _loadavg(monkeypatch, 3.0)  # two other processes beside the run's own thread
    said = []
    results = run_demo(_tiny_cfg(tmp_path, minutes=0.06), say=said.append)
    pace_ = results["pace"]
    assert results["steps"] == results["planned_steps"] >= 10 and not results["stopped_early"]
    assert (
        pace_["busy"]
        and pace_["plan_source"] == "cpu-time"
        and "waited for a core" in pace_["calibration_busy"]
    )
    assert any("the machine is busy" in line and "will take longer" in line for line in said)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**The machine was busy**" in report and f"kept the {results['steps']:,} planned steps" in report
    assert not (tmp_path / "timing.json").exists()  # a busy calibration is never remembered as idle


def test_demo_remembers_an_idle_machine_and_plans_its_length_when_busy(tmp_path, monkeypatch):
    import clip.demo as demo

    monkeypatch.setattr(demo, "calibrate", lambda *a: _fake_calibration(busy=False))
    run_demo(_tiny_cfg(tmp_path, minutes=0.06), say=lambda m: None)
    cache = json.loads((tmp_path / "timing.json").read_text())
    (entry,) = cache.values()
    assert entry["idle_step_s"] == {"2": 0.1, "1": 0.06}
    ratio = entry.get("loop_ratio", pace.DEFAULT_LOOP_RATIO)  # learnt only if the run stayed idle
    monkeypatch.setattr(demo, "calibrate", lambda *a: _fake_calibration(busy=True))
    _loadavg(monkeypatch, 3.0)
    busy = run_demo(_tiny_cfg(tmp_path, minutes=0.06, output_dir=str(tmp_path / "busy")), say=lambda m: None)
    assert busy["pace"]["plan_source"] == "remembered" and busy["machine"]["cpu_threads"] == 1
    assert busy["pace"]["planned_steps_per_s"] == pytest.approx(1 / (0.06 * ratio), rel=1e-3)
    assert busy["steps"] == busy["planned_steps"] >= 10


def test_demo_replans_an_idle_run_whose_loop_is_slower_than_its_calibration(tmp_path, monkeypatch):
    import functools

    import clip.demo as demo

    # Calibration says 1 ms a step, thousands of steps for the budget; the real steps are several times slower.
    # The keeper checks early in that plan (its default first check, at 10%, would come after this budget).
    fast = pace.Calibration((pace.StepTiming(1, 1e-3, 1e-3),), 0.0, 0.0, 0.0, 1)
    monkeypatch.setattr(demo, "calibrate", lambda *a: fast)
    monkeypatch.setattr(pace, "available_cpus", lambda: 1)  # one thread count: no governor trials
    monkeypatch.setattr(pace, "LengthKeeper", functools.partial(pace.LengthKeeper, checks=(0.002, 0.3)))
    _loadavg(monkeypatch, 1.0)  # idle: the run's own thread
    monkeypatch.setattr(pace, "runnable_others", lambda: 0.0)  # and nothing else runnable at the checks
    results = run_demo(_tiny_cfg(tmp_path, minutes=0.08), say=lambda m: None)
    pace_ = results["pace"]
    (replan,) = pace_["replans"]
    assert results["steps"] == replan["new"] < replan["old"] == results["planned_steps"]
    assert replan["projected_s"] > 3 * replan["budget_s"] and not pace_["busy"]
    assert pace_["train_loop_seconds"] < 1.1 * replan["budget_s"]  # ended near its budget, not minutes later
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"shortened the run to {replan['new']:,} steps" in report and "The machine was not busy" in report


def test_loop_ratio_is_learnt_only_from_a_run_that_stayed_idle(tmp_path):
    import clip.demo as demo

    plan = pace.Plan(steps=1000, run_threads=2, plan_threads=2, step_s=0.22, source="measured", busy=None)
    pacing = demo.Pacing(plan, now_step_s=0.2, loop_ratio=1.1, cache=tmp_path / "t.json", key="k")
    verdict = {"busy": False, "train_loop_seconds": 240.0, "steps": 1000}
    demo._learn_loop_ratio(pacing, {**verdict, "busy": True}, stopped_early=False)
    demo._learn_loop_ratio(pacing, verdict, stopped_early=True)
    assert not (tmp_path / "t.json").exists()
    demo._learn_loop_ratio(pacing, verdict, stopped_early=False)
    # bare step 0.22 / 1.1 = 0.2 s; the loop took 0.24 s a step: ratio 1.2
    assert pace.read_remembered(tmp_path / "t.json", "k") == (None, pytest.approx(1.2))


def test_demo_strict_time_stops_at_the_budget_and_says_the_scores_are_lower(tmp_path, monkeypatch):
    import clip.demo as demo

    fast = pace.Calibration(
        (pace.StepTiming(2, 1e-4, 2e-4), pace.StepTiming(1, 1e-4, 1e-4)), 0.0, 0.0, 0.0, 2
    )
    monkeypatch.setattr(demo, "calibrate", lambda *a: fast)  # plans thousands of steps for a few seconds
    results = run_demo(_tiny_cfg(tmp_path, minutes=0.05, strict_time=True), say=lambda m: None)
    assert results["stopped_early"] and results["steps"] < results["planned_steps"]
    assert "stopped at the budget" in (tmp_path / "out" / "report.md").read_text()


def test_demo_cli_refuses_strict_time_with_fixed_steps(capsys):
    from clip.cli import main

    assert main(["demo", "--strict-time", "--steps", "5"]) == 2
    assert "--strict-time" in capsys.readouterr().err


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


def test_box_blur_equals_average_pooling_without_the_padding():
    from clip.data.emoji_train import box_blur3

    torch.manual_seed(0)
    for shape in [(4, 3, 32, 32), (2, 1, 5, 2), (1, 3, 1, 1), (3, 2, 7, 9)]:
        x = torch.randn(shape)
        want = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        torch.testing.assert_close(box_blur3(x), want, rtol=0, atol=1e-6)


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


def _scores_from_features(data, feature_of_concept):
    """CellScores whose image and class features are given per concept (unit vectors [D])."""
    import torch.nn.functional as F

    from clip.demo_report import CellScores

    out = {}
    for kind in ("style", "concept", "both"):
        cell = data.cell(kind)
        img = F.normalize(
            torch.stack([feature_of_concept(int(c)) for c in data.image_concept[cell.indices]]), dim=-1
        )
        cls = F.normalize(torch.stack([feature_of_concept(int(c)) for c in cell.class_concepts]), dim=-1).T
        out[kind] = CellScores(cell, img, cls, img @ cls, torch.as_tensor(cell.labels))
    return out


def test_retrieval_counts_ties_against_and_finds_perfect_matches():
    from clip.demo_report import category_breakdown, evaluate_cells, retrieval

    data = subset_concepts(load_emoji(), np.arange(0, 1636, 7))
    perfect = _scores_from_features(
        data, lambda c: torch.nn.functional.one_hot(torch.tensor(c), data.num_concepts).float()
    )
    metrics, examples = retrieval(data, perfect, n_examples=4)
    assert metrics["recall@1"] == 1.0 and metrics["queries"] == int(data.held_out.sum())
    assert all(ex.true[0] and ex.first_true_rank == 1 for ex in examples)
    assert len({ex.category for ex in examples}) == 4  # one query per category first
    constant = _scores_from_features(data, lambda c: torch.ones(8))
    metrics, examples = retrieval(data, constant, n_examples=4)
    assert metrics["recall@1"] == 0.0 and metrics["recall@10"] == 0.0  # a collapsed model finds nothing
    assert all(ex.first_true_rank > metrics["pool_images"] - 4 for ex in examples)  # after every false image
    assert 0 < metrics["chance_recall_at_5"] < 0.2
    # per category: top-1 from a direct count over the cell's images
    rng = torch.Generator().manual_seed(0)
    noisy = _scores_from_features(data, lambda c: torch.randn(16, generator=rng))
    by_cat = category_breakdown(noisy, data)
    cell = noisy["concept"]
    hits = (cell.logits.argmax(dim=1) == cell.labels).numpy()
    cats = data.categories[data.image_concept[cell.cell.indices]]
    for cat, r in by_cat["concept"].items():
        assert r["images"] == int((cats == cat).sum()) and r["top1"] == pytest.approx(
            hits[cats == cat].mean(), abs=1e-4
        )
    assert list(by_cat["concept"])[0] == "Smileys & Emotion"  # Unicode's order
    assert evaluate_cells(perfect)["style"]["top1"] == 1.0


def test_calibration_times_the_runs_loss_with_its_label_smoothing(tmp_path, monkeypatch):
    import clip.demo as demo
    import clip.train.loss as loss_module

    seen = []
    real = loss_module.clip_loss

    def recording(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "clip_loss", recording)
    monkeypatch.setattr(pace, "available_cpus", lambda: 1)  # one thread count: a few steps only
    cfg = _tiny_cfg(tmp_path, label_smoothing=0.3)
    _, pairs = demo._train_data(cfg)
    demo._plan(cfg, demo.CLIP(cfg.model), pairs, cfg.batch_size, lambda: 60.0)
    assert seen and set(seen) == {0.3}


def test_report_names_the_image_towers_mlp_width_when_it_is_not_clips():
    import dataclasses

    from clip.demo import DEMO_MODEL
    from clip.demo_report import describe_model

    assert "MLP 256" in describe_model(DEMO_MODEL.to_dict())  # width 128 x ratio 2
    clips = dataclasses.replace(DEMO_MODEL, vision=dataclasses.replace(DEMO_MODEL.vision, mlp_ratio=4.0))
    assert "MLP" not in describe_model(clips.to_dict())
