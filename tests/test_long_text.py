"""Long text: Long-CLIP's knowledge-preserving stretch (77 -> 248), its checkpoints, 248-token tokenization,
and a 248-position model equal to an HF `CLIPModel` with `max_position_embeddings=248` on the same weights."""

from __future__ import annotations

import open_clip
import pytest
import torch
import transformers
from torch.testing import assert_close

import clip
from clip.formats import Reading
from clip.loading import _shape_config, save_hf_folder
from clip.longclip import (
    LONGCLIP_FORMAT,
    freeze_kept_positions,
    stretch_context,
    stretch_positions,
    stretched_length,
)


def longclip_stretch_reference(pos: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's stretch restated row by row from its formula (keep 20, 4 new rows per old one)."""
    length, dim = pos.shape
    keep = 20
    new = torch.zeros(4 * length - 3 * keep, dim)
    for i in range(keep):
        new[i] = pos[i]
    for i in range(length - 1 - keep):
        for j in range(4):
            new[keep + 4 * i + j] = (4 - j) * pos[keep + i] / 4 + j * pos[keep + i + 1] / 4
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = pos[length - 1] + j * (pos[length - 1] - pos[length - 2]) / 4
    return new


def test_stretch_is_long_clips_formula():
    torch.manual_seed(0)
    pos = torch.randn(77, 24)
    out = stretch_positions(pos, 248)
    assert stretched_length(77) == 248 and out.shape == (248, 24)
    assert torch.equal(out, longclip_stretch_reference(pos))
    assert torch.equal(out[:20], pos[:20])  # knowledge preserved: the first 20 rows are untouched
    assert torch.equal(out[20::4][:56], pos[20:76])  # every 4th row past them is an old row
    assert stretch_positions(pos, 77) is pos
    half = stretch_positions(pos.half(), 248)
    assert half.dtype == torch.float16
    assert_close(half.float(), out, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "length,match", [(200, "use one of 134, 191, 248, 305"), (64, "not a Long-CLIP stretch")]
)
def test_other_lengths_are_refused_with_the_valid_ones(length, match):
    with pytest.raises(ValueError, match=match):
        stretch_positions(torch.zeros(77, 8), length)


def long_captions() -> list[str]:
    words = "a small red house with a green door stands beside a quiet river under tall old trees".split()
    return [" ".join(words[: 5 + 3 * i] * (1 + i * 3)) for i in range(4)]  # about 7 to 170 tokens


def test_tokenize_248_equals_open_clip():
    texts = long_captions()
    ours = clip.tokenize(texts, context_length=248)
    assert ours.shape == (4, 248) and ours.dtype == torch.int32
    assert (ours.argmax(dim=-1) > 77).any()  # some captions only fit because of the longer context
    assert torch.equal(ours.long(), open_clip.tokenize(texts, context_length=248))
    with pytest.raises(RuntimeError, match="too long"):
        clip.tokenize(" ".join(["house"] * 300), context_length=248)
    cut = clip.tokenize(" ".join(["house"] * 300), context_length=248, truncate=True)
    assert cut[0, -1] == 49407


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny 77-position HF CLIPModel folder (the base model Long-CLIP stretches)."""
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                bos_token_id=49406, eos_token_id=49407)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16, projection_dim=32)  # fmt: skip
    hf = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    folder = tmp_path_factory.mktemp("hf77")
    hf.eval().save_pretrained(folder)
    return folder


def test_248_tokens_equal_hugging_face_with_248_positions(hf_folder, tmp_path):
    model, _ = clip.load(str(hf_folder), device="cpu", context_length=248)
    assert model.context_length == 248 and model.config.text.context_length == 248
    assert model.transformer.resblocks[0].attn_mask.shape == (248, 248)
    save_hf_folder(model.config, model.state_dict(), tmp_path / "hf248")
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf248").eval()
    assert ref.config.text_config.max_position_embeddings == 248
    ids = clip.tokenize(long_captions(), context_length=248).long()
    with torch.no_grad():
        expected = ref.get_text_features(input_ids=ids).pooler_output
        hidden = ref.text_model(input_ids=ids, output_hidden_states=True).hidden_states
        ours = model.encode_text(ids)
        inter = model.text_intermediates(ids)["text_intermediates"]
    assert_close(ours, expected)
    assert_close(inter[-1], hidden[-1])
    # the stretched table is the one HF ran: positions past 77 were really used
    hf_pos = ref.text_model.embeddings.position_embedding.weight
    assert torch.equal(hf_pos, model.positional_embedding)


def test_stretch_context_in_place_equals_load_time(hf_folder):
    loaded, _ = clip.load(str(hf_folder), device="cpu", context_length=248)
    model, _ = clip.load(str(hf_folder), device="cpu")
    assert stretch_context(model, 248) is model
    assert model.config == loaded.config
    assert model.transformer.resblocks[1].attn_mask.shape == (248, 248)
    ids = clip.tokenize(long_captions(), context_length=248)
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))


def test_freeze_kept_positions_zeroes_their_gradient(hf_folder):
    model, _ = clip.load(str(hf_folder), device="cpu", context_length=248)
    handle = freeze_kept_positions(model)
    model.encode_text(clip.tokenize(long_captions(), context_length=248)).sum().backward()
    grad = model.positional_embedding.grad
    assert grad[:20].abs().max() == 0 and grad[20:].abs().max() > 0
    handle.remove()


def longclip_encode_text(model, pos, res, ids):
    """Long-CLIP's encode_text restated: both tables under their 0/1 row masks, full length, argmax pooling."""
    mask1 = torch.zeros(pos.shape[0], 1)
    mask1[:20] = 1
    x = model.token_embedding(ids) + pos * mask1 + res * (1 - mask1)
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection


def test_long_clip_checkpoint_loads_into_our_layout(tmp_path, tiny_model):
    """A Long-CLIP state dict (two position tables) of the tiny architecture: 32 positions -> 68."""
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    torch.manual_seed(3)
    length = stretched_length(32)
    pos = stretch_positions(sd["positional_embedding"], length)
    res = pos + 0.01 * torch.randn_like(pos)  # as fine-tuned: the trained table moved, the frozen one not
    sd["positional_embedding"], sd["positional_embedding_res"] = pos, res
    torch.save(sd, tmp_path / "longclip.pt")
    model, _ = clip.load(str(tmp_path / "longclip.pt"), device="cpu", arch="ViT-Tiny/8@32px")
    assert model.config.text.context_length == length == 68
    assert "positional_embedding_res" not in model.state_dict()
    assert torch.equal(model.positional_embedding[:20], pos[:20])
    assert torch.equal(model.positional_embedding[20:], res[20:])
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(3, length, dtype=torch.long)
    for i, n in enumerate((5, 40, 66)):
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = 49406, torch.randint(1, 49406, (n,), generator=g), 49407
    with torch.no_grad():
        assert_close(model.encode_text(ids), longclip_encode_text(model, pos, res, ids))


def test_long_clip_shapes_of_openai_models_are_recognised():
    """Long-CLIP-B: ViT-B/16 with 248 positions, QuickGELU; read from shapes alone (no download)."""
    with torch.device("meta"):
        sd = clip.CLIP(clip.get_config("ViT-B/16")).state_dict()
    sd["positional_embedding"] = torch.empty(248, 512, device="meta")
    reading = Reading(LONGCLIP_FORMAT, sd, quick_gelu_known=True)
    cfg = _shape_config(reading, "longclip-B.pt", None)  # type: ignore[arg-type]
    assert cfg == clip.get_config("ViT-B/16").replace(text={"context_length": 248})
    assert cfg.quick_gelu


def test_clip_train_context_length_fine_tunes_the_stretched_model(tmp_path, tiny_checkpoint, capsys):
    """`clip train --pretrained P --context-length N`: stretched at the start, trained on captions past 32 tokens."""
    import numpy as np
    from PIL import Image

    from clip.cli import main

    data = tmp_path / "pairs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(" ".join(["picture", "number", str(i)] * 15))  # ~47 tokens
    out = tmp_path / "run"
    args = ["train", "--train-data", str(data), "--pretrained", str(tiny_checkpoint), "--context-length", "68",
            "--output-dir", str(out), "--steps", "2", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
            "--warmup", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    tuned, _ = clip.load(capsys.readouterr().out.strip().splitlines()[-1], device="cpu")
    start, _ = clip.load(str(tiny_checkpoint), device="cpu", context_length=68)
    assert tuned.config.text.context_length == 68
    moved = (tuned.positional_embedding[40] - start.positional_embedding[40]).abs().max()
    assert moved > 0  # trained past 32 positions
    assert main(args[:3] + args[5:]) == 2  # --context-length without --pretrained is refused
    assert "give --pretrained" in capsys.readouterr().err
