"""clip.hf_tokenizer against open_clip's HFTokenizer and transformers' fast tokenizers, no download.

Each tokenizer.json is trained here with the `tokenizers` library (tiny WordPiece / Unigram / BPE vocabularies)
and saved with the side files a Hub repo carries, in the layouts of the repos OpenCLIP's configs name:
BERT (CLIPA, `strip_sep_token`, no special tokens listed: the class defaults apply), T5 as SigLIP ships it
(pad = eos = `</s>`, `clean="canonicalize"`), XLM-R (`-worldwide`) and a generic byte-level BPE whose pad
token is only in tokenizer.json's padding section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from clip import hf_tokenizer
from clip.hf_tokenizer import HFTokenizer, TokenizerSpec, clean_text, get_tokenizer

TRAIN = [
    "a photo of a dog", "a photo of a cat", "the quick brown fox jumps over the lazy dog",
    "an image of a red car on the street", "Two people walking on the beach at sunset",
    "un chien sur la plage", "ein Hund im Park", "東京の夜景", "一只猫坐在沙发上", "강아지 사진",
    "emoji 😀 🐶 🎉", "café crème brûlée", "numbers 12345 and 3.14", "hello_world snake_case",
]  # fmt: skip

NASTY = [
    "",
    " ",
    "   \t\n  \r\n ",
    "a photo of a dog",
    "A  Photo\tOF\na   DOG.",
    "Fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;amp; &#39;quoted&#39; &quot;x&quot; &nbsp;nb",
    "mojibake: Ã©tÃ© â€™quotesâ€™ donâ€™t SchrÃ¶dinger",
    "emoji 😀🐶🎉 family 👨‍👩‍👧‍👦 skin 👍🏽 flag 🇯🇵 keycap 1️⃣",
    "東京の夜景と一只猫坐在沙发上, 강아지 사진",
    "Arabic مرحبا بالعالم and Hebrew שלום",
    "combining e\u0301 vs \u00e9, ligature \ufb01 and full-width ＡＢＣ１２３",
    "nbsp\u00a0here, ideographic\u3000space, line\u2028separator, zero\u200bwidth",
    "snake_case_words and __dunder__ and trailing_",
    "punctuation!!! ?? ... --- ;;; 'quotes' \"double\" (parens) [brackets] {braces} <angle> @#$%^&*",
    "special tokens written out: [SEP] [CLS] [PAD] </s> <s> <pad> <unk>",
    "control\x00chars\x07and\x1bescape\x1c\x1d\x1e\x1f",
    "UPPER lower MiXeD 123 4.56 7,890",
    "word " * 400,
    "supercalifragilisticexpialidocious" * 8,
    "日本語" * 200,
]


def _train(tok: Tokenizer, trainer: object) -> None:
    tok.train_from_iterator(TRAIN * 3, trainer=trainer)


def _write(folder: Path, tok: Tokenizer, **side_files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, content in side_files.items():
        (folder / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return folder


def bert_folder(root: Path) -> Path:
    """bert-base-uncased's layout: WordPiece, BertNormalizer; tokenizer_config lists no special tokens."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    _train(tok, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _write(
        root / "bert",
        tok,
        tokenizer_config={"do_lower_case": True, "model_max_length": 512},
        config={"model_type": "bert"},
    )


def t5_folder(root: Path, padding_side: str | None = None) -> Path:
    """SigLIP's T5 layout as OpenCLIP pushes it: Unigram + Metaspace, `$A </s>`, pad = eos = `</s>`."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    _train(tok, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    config: dict = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 64}
    if padding_side:
        config["padding_side"] = config["truncation_side"] = padding_side
    special = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    return _write(root / f"t5-{padding_side}", tok, tokenizer_config=config, special_tokens_map=special)


def xlmr_folder(root: Path) -> Path:
    """XLM-R's layout (facebook/xlm-v-base): `<s> $A </s>`, special tokens as AddedToken dicts."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("``", '"')])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    _train(tok, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    added = {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return _write(
        root / "xlmr",
        tok,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "sep_token": "</s>"},
        special_tokens_map={"pad_token": added, "unk_token": "<unk>"},
    )


def bpe_folder(root: Path) -> Path:
    """A generic byte-level BPE whose only pad token is the padding section of tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    _train(
        tok,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", 1), ("<|eos|>", 2)]
    )
    tok.enable_padding(pad_id=0, pad_token="<|pad|>")
    return _write(root / "bpe", tok, tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bert": bert_folder(root),
        "t5": t5_folder(root),
        "t5-left": t5_folder(root, "left"),
        "xlmr": xlmr_folder(root),
        "bpe": bpe_folder(root),
    }


# (folder, context_length, OpenCLIP tokenizer kwargs): the combinations OpenCLIP's configs use, and more.
CASES = [
    ("bert", 32, {"strip_sep_token": True}),
    ("bert", 77, {}),
    ("bert", 16, {"clean": "lower", "strip_sep_token": True}),
    ("t5", 64, {"clean": "canonicalize"}),
    ("t5", 16, {"clean": "canonicalize"}),
    ("t5-left", 24, {"clean": "canonicalize"}),
    ("xlmr", 77, {}),
    ("xlmr", 20, {"clean": "lower"}),
    ("bpe", 40, {"clean": "whitespace"}),
    ("bpe", 12, {"clean": "canonicalize"}),
]


@pytest.mark.parametrize(("name", "context_length", "kwargs"), CASES)
def test_matches_open_clip_hf_tokenizer(
    folders: dict[str, Path], name: str, context_length: int, kwargs: dict
) -> None:
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    ours = HFTokenizer.from_file(folders[name], context_length, **kwargs)
    reference = OpenClipHFTokenizer(str(folders[name]), context_length=context_length, **kwargs)
    got = ours(NASTY)
    assert got.dtype == torch.long and got.shape == (len(NASTY), context_length)
    torch.testing.assert_close(got, reference(NASTY), rtol=0, atol=0)
    # One text at a time, and a per-call context length, give the same rows.
    torch.testing.assert_close(ours(NASTY[5]), reference(NASTY[5]), rtol=0, atol=0)
    torch.testing.assert_close(
        ours(NASTY, context_length=48), reference(NASTY, context_length=48), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["bert", "t5", "t5-left", "xlmr", "bpe"])
def test_matches_transformers_fast_tokenizer(folders: dict[str, Path], name: str) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(folders[name]))
    assert reference.is_fast
    ours = HFTokenizer.from_file(folders[name], 30)
    assert ours.pad_token_id == reference.pad_token_id
    assert ours.sep_token_id == reference.sep_token_id
    assert (ours.padding_side, ours.truncation_side) == (reference.padding_side, reference.truncation_side)
    cleaned = [clean_text(t, "whitespace") for t in NASTY]
    expected = reference(cleaned, max_length=30, padding="max_length", truncation=True, return_tensors="pt")
    torch.testing.assert_close(ours(NASTY), expected.input_ids, rtol=0, atol=0)
    for text in NASTY[3:8]:
        assert (
            ours.encode(text) == reference(clean_text(text, "whitespace"), add_special_tokens=False).input_ids
        )


def test_layout_facts(folders: dict[str, Path]) -> None:
    """The ids at the edges of a row, written out: what each layout's rows look like."""
    bert = HFTokenizer.from_file(folders["bert"], 8, strip_sep_token=True)
    row = bert("a photo of a dog")[0].tolist()
    cls_id = bert._backend.token_to_id("[CLS]")
    assert row[0] == cls_id and bert.sep_token_id not in row and row[-2:] == [0, 0]
    long_row = bert("a photo of a dog " * 10)[0].tolist()
    assert long_row[0] == cls_id and long_row[-1] == 0  # the sep that ended the cut row became 0
    t5 = HFTokenizer.from_file(folders["t5"], 6, clean="canonicalize")
    eos = t5._backend.token_to_id("</s>")
    assert t5.pad_token_id == eos  # SigLIP pads with </s>
    assert t5("")[0].tolist() == [eos] * 6
    assert t5("a photo of a dog " * 10)[0, -1].item() == eos  # truncation keeps </s>
    left = HFTokenizer.from_file(folders["t5-left"], 6)
    assert left("dog")[0, 0].item() == eos and left("dog")[0, -1].item() == eos  # padded on the left
    assert HFTokenizer.from_file(folders["bpe"], 5).pad_token_id == 0


def test_clean_modes_match_open_clip() -> None:
    from open_clip.tokenizer import get_clean_fn

    for mode in hf_tokenizer.CLEAN_MODES:
        reference = get_clean_fn(mode)
        for text in NASTY:
            assert clean_text(text, mode) == reference(text), (mode, text)
    assert clean_text("Hello_World, it's  A&amp;B!", "canonicalize") == "hello world its ab"
    with pytest.raises(ValueError, match="clean='upper'.*canonicalize"):
        clean_text("x", "upper")


def test_spec_round_trip_and_open_clip_configs(folders: dict[str, Path]) -> None:
    import open_clip

    specs = {
        "ViT-L-14-CLIPA": TokenizerSpec("hf", 32, "bert-base-uncased", None, True),
        "ViT-B-16-SigLIP": TokenizerSpec("hf", 64, "timm/ViT-B-16-SigLIP", "canonicalize"),
        "ViT-H-14-worldwide": TokenizerSpec("hf", 77, "facebook/xlm-v-base"),
        "ViT-B-32": TokenizerSpec("openai", 77),
    }
    for name, expected in specs.items():
        spec = TokenizerSpec.from_open_clip_text_cfg(open_clip.get_model_config(name)["text_cfg"])
        assert spec == expected, name
        assert TokenizerSpec.from_json(spec.to_json()) == spec
        assert TokenizerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert specs["ViT-H-14-worldwide"].clean_mode == "whitespace"
    assert specs["ViT-B-32"].clean_mode == "lower"
    tok = get_tokenizer(specs["ViT-L-14-CLIPA"], folders["bert"])
    assert isinstance(tok, HFTokenizer) and tok.context_length == 32 and tok.strip_sep_token
    assert tok("a dog").shape == (1, 32)


def test_openai_kind_matches_open_clip_simple_tokenizer() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tok = get_tokenizer(TokenizerSpec("openai", 16))
    reference = SimpleTokenizer(context_length=16)
    texts = [t for t in NASTY if "</s>" not in t]  # open_clip spells literal special tokens differently
    got = tok(texts)
    assert got.dtype == torch.long and got.shape == (len(texts), 16)
    torch.testing.assert_close(got, reference(texts), rtol=0, atol=0)
    assert tok("a dog", context_length=5).shape == (1, 5)


def test_bad_specs_and_inputs_have_clear_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer spec keys \\['clena'\\]"):
        TokenizerSpec.from_dict({"kind": "hf", "clena": "lower"})
    with pytest.raises(ValueError, match="kind 'sentencepiece'"):
        TokenizerSpec("sentencepiece")
    with pytest.raises(ValueError, match="only context_length"):
        TokenizerSpec("openai", clean="canonicalize")
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        TokenizerSpec("hf", 0, "x/y")
    with pytest.raises(ValueError, match="language"):
        TokenizerSpec.from_open_clip_text_cfg(
            {"hf_tokenizer_name": "x", "tokenizer_kwargs": {"language": "en"}}
        )
    with pytest.raises(ValueError, match="download_tokenizer\\('bert-base-uncased'\\)"):
        TokenizerSpec("hf", 32, "bert-base-uncased").build()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        HFTokenizer.from_file(tmp_path)
    nopad = tmp_path / "nopad"
    tok = Tokenizer.from_file(str(folders["t5"] / "tokenizer.json"))
    _write(nopad, tok, tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"})
    with pytest.raises(ValueError, match="names no pad token"):
        HFTokenizer.from_file(nopad)
    with pytest.raises(ValueError, match="no sep token"):
        HFTokenizer.from_file(nopad, pad_token="<pad>", strip_sep_token=True)
    bert = HFTokenizer.from_file(folders["bert"], 8)
    with pytest.raises(ValueError, match="context_length=1 cannot hold the 2 special tokens"):
        bert("a dog", context_length=1)
    with pytest.raises(TypeError, match="texts\\[1\\] is a int"):
        bert(["a", 3])  # type: ignore[list-item]
    assert bert([]).shape == (0, 8)


def test_missing_tokenizers_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]
) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"clipforge\[hf\]"):
        HFTokenizer.from_file(folders["bert"])
