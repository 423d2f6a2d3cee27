"""`clip convert --to hf` writes a complete HF folder: CLIPModel, CLIPTokenizer and CLIPImageProcessor files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch.testing import assert_close

import clip
from clip.cli import main
from clip.preprocess import to_tensor_normalized


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny model (32 px, 32 text positions) converted through the command line."""
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    root = tmp_path_factory.mktemp("hfexport")
    torch.manual_seed(0)
    model = CLIP(get_config("ViT-Tiny/8@32px")).eval()
    save_model(model, root / "tiny.pt")
    assert main(["convert", str(root / "tiny.pt"), str(root / "hf"), "--to", "hf"]) == 0
    return model, root / "hf"


def test_folder_is_complete_and_transformers_reads_it(hf_dir):
    model, folder = hf_dir
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                     "special_tokens_map.json", "preprocessor_config.json"}  # fmt: skip
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["a</w>"] == 320
    assert len((folder / "merges.txt").read_text().splitlines()) == 1 + 48894
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    inputs = processor(text=["a photo of a cat", "a dog"], images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf(**inputs)
        ours = model.encode_text(clip.tokenize(["a photo of a cat", "a dog"], context_length=32))
    assert_close(out.text_embeds, torch.nn.functional.normalize(ours, dim=-1))
    assert processor.tokenizer.model_max_length == 32


def caption(rng: random.Random) -> str:
    words = ["A", "dog", "cat's", "running", "on", "the", "beach,", "2", "people", "(in", "red)", "jumping!",
             "over", "a", "FENCE.", "it's", "3:45pm", "and", "they're", "happy?", "a-b", "x/y", "100%", "#1"]  # fmt: skip
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))


def test_tokenizer_gives_clip_tokenize_ids_on_plain_ascii(hf_dir):
    """Same ids on plain ASCII text; HF pads with <|endoftext|> where clip.tokenize pads with 0, which gives
    the same features (the tower pools at the first end-of-text token)."""
    model, folder = hf_dir
    tok = transformers.CLIPProcessor.from_pretrained(folder).tokenizer
    rng = random.Random(0)
    texts = [caption(rng) for _ in range(300)]
    ours = clip.tokenize(texts, context_length=32, truncate=True).long()
    theirs = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    used = ours != 0
    assert torch.equal(theirs[used], ours[used])
    assert (theirs[~used] == 49407).all()
    with torch.no_grad():
        assert_close(model.encode_text(theirs[:20]), model.encode_text(ours[:20]))


def image(shape: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(
        mode
    )


@pytest.mark.parametrize("shape", [(40, 57), (57, 40), (32, 32), (500, 333), (20, 30), (64, 200)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_image_processor_gives_our_pixels_with_the_pil_backend(hf_dir, shape, mode):
    _, folder = hf_dir
    _, preprocess = clip.load(str(folder), device="cpu")
    img = image(shape, mode)
    processor = transformers.CLIPProcessor.from_pretrained(folder, backend="pil")
    assert_close(processor(images=img, return_tensors="pt").pixel_values[0], preprocess(img))


def test_image_processor_differences_are_the_known_ones(hf_dir):
    """Where HF's processor itself differs: its centre crop floors an odd half-overhang that OpenAI's
    (torchvision's) rounds half to even, a one-pixel shift; its default tensor backend resizes differently."""
    _, folder = hf_dir
    _, preprocess = clip.load(str(folder), device="cpu")
    pil = transformers.CLIPProcessor.from_pretrained(folder, backend="pil")
    img = image((40, 59))  # resized to 32 x 47: 15 columns to drop, 7.5 per side
    resized = img.resize((47, 32), Image.Resampling.BICUBIC)
    floored = to_tensor_normalized(np.asarray(resized)[:, 7 : 7 + 32], preprocess.mean, preprocess.std)
    ours = preprocess(img)
    assert torch.equal(
        ours, to_tensor_normalized(np.asarray(resized)[:, 8 : 8 + 32], preprocess.mean, preprocess.std)
    )
    assert_close(pil(images=img, return_tensors="pt").pixel_values[0], floored)
    default = transformers.CLIPProcessor.from_pretrained(folder)(
        images=image((300, 120)), return_tensors="pt"
    )
    gap = (default.pixel_values[0] - preprocess(image((300, 120)))).abs().max()
    assert 0 < gap < 0.2  # a few grey levels (std ~0.27) on random noise, the worst case for resampling


def test_preprocessor_config_follows_the_model(tmp_path, tiny_model):
    from clip.hf_export import preprocessor_config

    cfg = tiny_model.config.replace(vision={"image_size": 64}, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pre = preprocessor_config(cfg)
    assert pre["size"] == {"shortest_edge": 64} and pre["crop_size"] == {"height": 64, "width": 64}
    assert pre["image_mean"] == [0.5] * 3 and pre["resample"] == 3
    squash = preprocessor_config(cfg.replace(resize_mode="squash", interpolation="bilinear"))
    assert squash["size"] == {"height": 64, "width": 64} and squash["resample"] == 2
