"""CLIPScore / RefCLIPScore: the paper's formula on hand-made features, torchmetrics' `clip_score` on this
project's HF export of a random model (same pixels, same ids: equal up to the constant w), and `clip score`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clip
from clip.cli import main
from clip.loading import save_hf_folder
from clip.score import (
    PAPER_PREFIX,
    TORCHMETRICS_W,
    clip_score_from_features,
    encode_captions,
    encode_image_inputs,
    ref_clip_score_from_features,
    with_prefix,
)

CAPTIONS = ["a red square", "a blue circle on grass", "two dogs", "an empty room", "a green field", "text"]


def test_formula_on_hand_made_features():
    # cosines 0.8, 0, -0.6 and 1 (the norm of a feature does not matter)
    img = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 2.0]])
    txt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 7.0], [0.0, -0.6, 0.8], [0.0, 0.0, 0.5]])
    torch.testing.assert_close(clip_score_from_features(img, txt), torch.tensor([2.0, 0.0, 0.0, 2.5]))
    torch.testing.assert_close(clip_score_from_features(img, txt, w=100.0), torch.tensor([80.0, 0, 0, 100.0]))
    # references: best cosine 0.6 / none positive / 0.8 / 1
    refs = [
        torch.tensor([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 0.0, -1.0]]),
        torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 3.0]]),
    ]
    s = torch.tensor([2.0, 0.0, 0.0, 2.5])
    r = torch.tensor([0.6, 0.0, 0.8, 1.0])
    expected = torch.tensor([2 * 2.0 * 0.6 / 2.6, 0.0, 0.0, 2 * 2.5 * 1.0 / 3.5])
    got = ref_clip_score_from_features(img, txt, refs)
    torch.testing.assert_close(got, expected)
    assert torch.all(got <= torch.maximum(s, r))  # a harmonic mean never exceeds the larger term
    assert with_prefix(["a dog"], PAPER_PREFIX) == ["A photo depicts a dog"]
    assert with_prefix(["a dog"], "Prefix: ") == ["Prefix: a dog"]


def test_function_takes_features_or_inputs(tiny_model):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = CAPTIONS[:3]
    img = encode_image_inputs(tiny_model, pixels)
    txt = encode_captions(tiny_model, captions, PAPER_PREFIX)
    from_inputs = clip.clip_score(tiny_model, pixels, captions, [["a thing"], ["x", "y"], CAPTIONS[3:]],
                                  prefix=PAPER_PREFIX)  # fmt: skip
    from_feats = clip.clip_score(image_features=img, text_features=txt,
                                 reference_features=[encode_captions(tiny_model, r, PAPER_PREFIX)
                                                     for r in (["a thing"], ["x", "y"], CAPTIONS[3:])])  # fmt: skip
    torch.testing.assert_close(from_inputs.clip_score, from_feats.clip_score)
    torch.testing.assert_close(from_inputs.ref_clip_score, from_feats.ref_clip_score)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(from_inputs.clip_score, 2.5 * cos.clamp(min=0))
    no_prefix = clip.clip_score(tiny_model, pixels, captions)
    assert no_prefix.ref_clip_score is None
    assert not torch.allclose(no_prefix.clip_score, from_inputs.clip_score)
    with pytest.raises(ValueError, match="exactly one of images"):
        clip.clip_score(tiny_model, pixels, captions, image_features=img)


# ------------------------------------------------------------------------------------------- torchmetrics


class _HFFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns ModelOutputs."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = hf.config

    def get_image_features(self, pixel_values):
        return self.hf.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.hf.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _SamePixelsSameIds:
    """A processor that hands torchmetrics our preprocessed pixels and OpenAI-tokenizer ids unchanged."""

    def __init__(self, context_length):
        self.context_length = context_length

    def __call__(self, images=None, text=None, **_):
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = clip.tokenize(text, context_length=self.context_length, truncate=True)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_equals_torchmetrics_up_to_w(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    from clip.config import get_config
    from clip.model import CLIP

    torch.manual_seed(3)
    model = CLIP(get_config("ViT-Tiny/8@32px")).eval()
    save_hf_folder(model.config, model.state_dict(), tmp_path / "hf")
    hf = _HFFeatures(transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval())
    processor = _SamePixelsSameIds(model.context_length)
    pixels = torch.stack([clip.image_transform(32)(im) for im in _images(len(CAPTIONS))])

    ours = clip.clip_score(model, pixels, CAPTIONS).clip_score
    with torch.no_grad():
        theirs = torch.stack(
            [tm_clip_score(pixels[i], CAPTIONS[i], lambda: (hf, processor)) for i in range(len(CAPTIONS))]
        )
    assert (ours > 0).sum() >= 2, "the check needs pairs with a positive cosine"
    torch.testing.assert_close(theirs, ours * (TORCHMETRICS_W / 2.5), rtol=1e-4, atol=1e-4)
    # On a batch torchmetrics clamps the mean cosine, not each pair.
    img = encode_image_inputs(model, pixels)
    txt = encode_captions(model, CAPTIONS)
    with torch.no_grad():
        batch = tm_clip_score(list(pixels), CAPTIONS, lambda: (hf, processor))
    torch.testing.assert_close(batch, (100 * (img * txt).sum(-1).mean()).clamp(min=0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the CLI


def _folder(tmp_path):
    root = tmp_path / "gen"
    root.mkdir()
    for i, im in enumerate(_images(4)):
        im.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(CAPTIONS[i] + "\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "broken.txt").write_text("a broken image")
    _images(1, seed=5)[0].save(root / "nocaption.jpg")
    return root


def test_cli_scores_a_folder(tmp_path, tiny_model, tiny_checkpoint, capsys):
    root = _folder(tmp_path)
    refs = {f"img{i}.png": [CAPTIONS[(i + 1) % 6], CAPTIONS[5]] for i in range(4)}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "scores.json"
    argv = ["score", str(root), "--model", str(tiny_checkpoint), "--references", str(tmp_path / "refs.json"),
            "--prefix", "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["key"] for r in report["images"]] == [f"img{i}.png" for i in range(4)]
    assert {e["key"] for e in report["errors"]} == {"broken.png", "nocaption.jpg"}
    assert "nocaption.txt" in next(e["error"] for e in report["errors"] if e["key"] == "nocaption.jpg")
    assert report["prefix"] == PAPER_PREFIX and report["w"] == 2.5 and report["count"] == 4

    expected = clip.clip_score(
        tiny_model, [root / f"img{i}.png" for i in range(4)], CAPTIONS[:4],
        [refs[f"img{i}.png"] for i in range(4)], prefix=PAPER_PREFIX,
    )  # fmt: skip
    got = torch.tensor([r["clip_score"] for r in report["images"]])
    torch.testing.assert_close(got, expected.clip_score)
    torch.testing.assert_close(
        torch.tensor([r["ref_clip_score"] for r in report["images"]]), expected.ref_clip_score
    )
    assert report["mean_clip_score"] == pytest.approx(float(expected.clip_score.mean()), abs=1e-6)
    assert "broken.png" in capsys.readouterr().err


def test_cli_reads_a_csv_and_prints_json(tmp_path, tiny_model, tiny_checkpoint, capsys):
    root = _folder(tmp_path)
    table = root / "prompts.csv"
    table.write_text('filepath,caption\nimg1.png,a cat\nimg0.png,"a dog, sleeping"\nmissing.png,x\n')
    assert main(["score", str(table), "--model", str(tiny_checkpoint), "--no-progress", "--w", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in report["images"]] == ["img1.png", "img0.png"]
    assert [e["key"] for e in report["errors"]] == ["missing.png"]
    expected = clip.clip_score(tiny_model, [root / "img1.png", root / "img0.png"], ["a cat", "a dog, sleeping"],
                               w=100.0).clip_score  # fmt: skip
    torch.testing.assert_close(torch.tensor([r["clip_score"] for r in report["images"]]), expected)


def test_cli_bad_input_is_one_line(tmp_path, tiny_checkpoint, capsys):
    assert main(["score", str(tmp_path / "nope"), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a folder nor a file" in err[0]
