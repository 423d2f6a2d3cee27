"""The zero-shot classifier builder against OpenAI's per-class loop, and the shipped prompt data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip.data import templates as prompt_data
from clip.tokenizer import tokenize
from clip.zeroshot import zero_shot_classifier

CLASSES = [
    "dog",
    "cat",
    "golden retriever",
    "a very long class name with many words in it",
    "x",
    "t-shirt",
    "ox",
]
TEMPLATES = [
    "a photo of a {}.",
    "{}",
    "a blurry photo of the {}, seen from far away.",
    "itap of a {}.",
    "{} {}",
]


@torch.no_grad()
def per_class_loop(model, classnames, templates):
    """OpenAI's notebook: one class at a time, full-length tokens, mean of normalised embeddings."""
    weights = []
    for c in classnames:
        tokens = tokenize(
            [t.replace("{}", c) for t in templates], context_length=model.context_length, truncate=True
        )
        emb = F.normalize(model.encode_text(tokens), dim=-1)
        weights.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(weights, dim=1)


@pytest.mark.parametrize("batch_size", [1, 3, 512])
def test_classifier_matches_per_class_loop(tiny_model, batch_size):
    ref = per_class_loop(tiny_model, CLASSES, TEMPLATES)
    got = zero_shot_classifier(tiny_model, CLASSES, TEMPLATES, batch_size=batch_size)
    assert got.shape == (tiny_model.config.embed_dim, len(CLASSES))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(len(CLASSES)))


def test_classifier_full_length_path_for_other_models(tiny_model):
    """A model that is not clip.model.CLIP gets untrimmed tokens and the same answer."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.context_length = inner.context_length
            self.lengths = set()

        def encode_text(self, tokens):
            self.lengths.add(tokens.shape[1])
            return self.inner.encode_text(tokens)

    wrapped = Wrapper(tiny_model)
    got = zero_shot_classifier(wrapped, CLASSES, TEMPLATES, batch_size=4)
    assert wrapped.lengths == {tiny_model.context_length}
    torch.testing.assert_close(got, per_class_loop(tiny_model, CLASSES, TEMPLATES), atol=2e-6, rtol=1e-5)


def test_classifier_trims_batches_for_clip(tiny_model, monkeypatch):
    seen = []
    original = type(tiny_model).encode_text
    monkeypatch.setattr(
        type(tiny_model), "encode_text", lambda self, t: seen.append(t.shape[1]) or original(self, t)
    )
    zero_shot_classifier(tiny_model, ["dog", "cat"], ["a photo of a {}."], batch_size=8)
    # "a photo of a dog." is 8 ids with <sot> and <eot>, far below the context length of 32
    assert seen and max(seen) < 12


def test_classifier_input_errors(tiny_model):
    with pytest.raises(ValueError, match="at least one class"):
        zero_shot_classifier(tiny_model, [], TEMPLATES)
    with pytest.raises(ValueError, match="has no"):
        zero_shot_classifier(tiny_model, CLASSES, ["a photo of a dog"])
    with pytest.raises(ValueError, match="no templates"):
        zero_shot_classifier(tiny_model, CLASSES, [])


def test_classifier_is_exported_and_classifies_its_own_prompts(tiny_model):
    """Text features of the prompt itself score highest against their own class (single template)."""
    w = zero_shot_classifier(tiny_model, CLASSES, ["{}"])
    with torch.no_grad():
        feats = F.normalize(tiny_model.encode_text(tokenize(CLASSES, context_length=32)), dim=-1)
    assert (feats @ w).argmax(dim=1).tolist() == list(range(len(CLASSES)))


def test_shipped_prompt_data():
    assert len(prompt_data.classnames("imagenet")) == 1000
    assert len(prompt_data.templates("imagenet")) == 80
    assert prompt_data.classnames("imagenet")[:3] == ["tench", "goldfish", "great white shark"]
    assert prompt_data.classnames("imagenet")[-1] == "toilet paper"
    assert prompt_data.templates("imagenet")[0] == "a bad photo of a {}."
    assert len(prompt_data.templates("imagenet-7")) == 7
    assert set(prompt_data.templates("imagenet-7")) <= set(prompt_data.templates("imagenet"))
    assert prompt_data.classnames("cifar10")[0] == "airplane" and len(prompt_data.classnames("cifar10")) == 10
    assert (
        len(prompt_data.classnames("cifar100")) == 100
        and prompt_data.classnames("cifar100")[1] == "aquarium fish"
    )
    assert len(prompt_data.templates("cifar100")) == 18
    assert prompt_data.templates("simple") == ["a photo of a {}."]
    for name in prompt_data.template_names():
        assert all("{}" in t for t in prompt_data.templates(name))
    prompt_data.classnames("imagenet").append("mutated")  # callers get copies
    assert len(prompt_data.classnames("imagenet")) == 1000


def test_resolve_templates(tmp_path):
    assert prompt_data.resolve_templates(None) == ["a photo of a {}."]
    assert prompt_data.resolve_templates(None, default=["{}"]) == ["{}"]
    assert prompt_data.resolve_templates("itap of a {}.") == ["itap of a {}."]
    assert len(prompt_data.resolve_templates("cifar10")) == 18
    f = tmp_path / "t.txt"
    f.write_text("# my templates\na {} photo.\n\nart of the {}.\n")
    assert prompt_data.resolve_templates(str(f)) == ["a {} photo.", "art of the {}."]
    with pytest.raises(ValueError, match="unknown template set 'imagenett'.*imagenet, cifar10"):
        prompt_data.resolve_templates("imagenett")
    f.write_text("no placeholder here\n")
    with pytest.raises(ValueError, match="has no"):
        prompt_data.resolve_templates(str(f))


def test_classify_images_is_a_typed_library_call(tmp_path, tiny_model):
    """`clip classify`'s core takes typed arguments: model, preprocess, paths, labels, templates, top, options."""
    from PIL import Image

    from clip.evaluation.features import EncodeOptions
    from clip.preprocess import image_transform
    from clip.zeroshot import classify_images

    paths = []
    for i, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 36), colour).save(paths[-1])
    (tmp_path / "bad.png").write_text("not an image")
    out = classify_images(tiny_model, image_transform(32), [*paths, str(tmp_path / "bad.png")],
                          ["a red square", "a blue square", "a cat"], ["a photo of {}."], top=2,
                          options=EncodeOptions(progress=False))  # fmt: skip
    assert [r["image"] for r in out["results"]] == paths and out["n_skipped"] == 1
    assert all(len(r["predictions"]) == 2 for r in out["results"]) and out["n_templates"] == 1
    probs = [p["probability"] for p in out["results"][0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
