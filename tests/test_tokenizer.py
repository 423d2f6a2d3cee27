"""clip.tokenizer against open_clip's `tokenize` (OpenAI's algorithm) and against its own exact path.

open_clip names its special tokens "<start_of_text>"/"<end_of_text>" where openai/CLIP matches the literal
"<|startoftext|>"/"<|endoftext|>" in text, so the generated corpus avoids both spellings; the openai behaviour
has its own hand-computed test.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
import random
import re
import string

import open_clip
import pytest
import regex
import torch

from clip import tokenizer as tk

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT = 49406, 49407

WORDS = (
    "a photo of the dog cat two people riding bikes down street red car parked near building "
    "man woman child playing frisbee park sunset beach ocean waves kitchen table pizza slice"
).split()
APOSTROPHES = [
    "it's", "don't", "they're", "we've", "I'm", "you'll", "she'd", "IT'S", "DON'T", "We'Re", "'sun", "''s",
    "rock'n'roll", "o'clock", "dogs'", "'", "'''", "it’s", "don‘t", "‘quoted’", "“double”", "'S", "'T", "'LL",
    "'ſ", "ſtreet", "'d'd", "'re's",
]  # fmt: skip
ENTITIES = [
    "&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&amp;amp;", "&amp;#39;", "&amp;quot;", "&nbsp;", "&#x27;",
    "&eacute;", "&", "& ", "AT&T", "&#12345;", "&#0;", "&#x1F600;", "&bogus;", "&amp", "&lt", "&#65",
    "&#x85;", "&#133;", "&#11;", "&#12;", "&#28;", "&Tab;", "&NewLine;", "&#xD800;", "&amp;lt;b&amp;gt;",
    "<b>bold</b>", "&#160;", "&copy;2020", "&hellip;", "R&amp;D",
]  # fmt: skip
NUMBERS = ["0", "42", "3.14", "1,000,000", "2nd", "3rd", "10:30", "-7", "1e9", "½", "²³", "Ⅻ", "٣", "१२", "①"]
UNICODE = [
    "café", "naïve", "Straße", "İstanbul", "ﬁne", "ﬂower", "ΑΘΗΝΑ", "москва", "Ελλάδα", "مرحبا", "שלום",
    "नमस्ते", "ภาษาไทย", "中文字符", "日本語のテキスト", "한국어", "ＬＯＵＤ　ＮＯＩＳＥＳ", "ｶﾀｶﾅ", "😀",
    "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1fa\U0001f1f8",
    "\U0001f3f3\ufe0f\u200d\U0001f308", "\u2764\ufe0f", "Ⓐⓑ", "\u212a", "\u212b", "𝐀𝐁𝐂", "ǅ", "ꞵ", "\u0345",
    "e\u0301", "Z\u0334\u0321\u0319a\u0337\u0317l\u0336g\u0335o", "\u200b", "\ufeff", "\u00ad", "\ufffd",
    "\U0010ffff", "\ue000", "\ud800", "…", "—", "«»", "‹›", "¿¡", "™", "°C",
]  # fmt: skip
MOJIBAKE = [
    "Ã©", "â€™", "Ã¢â‚¬â„¢", "ÃƒÂ©", "â€œquotedâ€\x9d", "doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t", "Ã¼ber", "voilÃ le",
    "sÃ³", "Ã\xa0 la", "â€¦", "ðŸ˜€", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "\x80\x85\x9f", "\x93smart\x94",
]  # fmt: skip
CONTROLS = [chr(c) for c in [*range(0x00, 0x20), 0x7F]] + ["\x1b[31mred\x1b[0m", "\x1b[1;32m"]
SPACES = ["\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2028", "\u2029", "\x85", "\u2003"]


def _fragment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.40:
        word = rng.choice(WORDS)
        return rng.choice([word, word.upper(), word.title(), word + rng.choice(".,!?;:")])
    pools = (APOSTROPHES, ENTITIES, NUMBERS, UNICODE, MOJIBAKE, CONTROLS)
    return rng.choice(rng.choice(pools))


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """n reproducible adversarial strings; about 2% are long enough to need truncation at 77 tokens."""
    rng = random.Random(seed)
    corpus = ["", " ", "\n\t", "a", "A", "&amp;amp;amp;", "x" * 400]
    while len(corpus) < n:
        count = rng.randint(60, 120) if rng.random() < 0.02 else rng.randint(1, 14)
        parts = []
        for _ in range(count):
            parts.append(_fragment(rng))
            roll = rng.random()
            parts.append(" " if roll < 0.7 else "" if roll < 0.85 else rng.choice(SPACES))
        corpus.append("".join(parts))
    return corpus[:n]


def random_ascii(rng: random.Random, max_len: int = 40) -> str:
    """Mostly printable ASCII (with apostrophes, digits, upper case), sometimes any of the 128 characters."""
    pool = string.ascii_letters + string.digits + "   '''" + string.punctuation
    out = []
    for _ in range(rng.randint(0, max_len)):
        out.append(chr(rng.randrange(128)) if rng.random() < 0.05 else rng.choice(pool))
    return "".join(out)


@pytest.fixture(scope="module")
def tok() -> tk.SimpleTokenizer:
    return tk.default_tokenizer()


def _first_differences(texts: list[str], ours: torch.Tensor, theirs: torch.Tensor, limit: int = 5) -> list:
    rows = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    return [(texts[i], ours[i].tolist(), theirs[i].tolist()) for i in rows[:limit]]


def test_vocab_file_is_openais():
    with open(tk.vocab_path(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == VOCAB_SHA256 == tk.VOCAB_SHA256


def test_vocabulary_layout(tok):
    assert len(tok.encoder) == len(tok.decoder) == tk.VOCAB_SIZE == 49408
    assert tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT
    assert len(tok.bpe_ranks) == tk.NUM_MERGES == 48894
    assert tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 256 + ord("a") - ord("!")
    assert all(tok.encoder[symbol] == i for i, symbol in tok.decoder.items())


def test_matches_open_clip_on_10k_generated_strings():
    texts = make_corpus(10_000, seed=1234)
    assert len(set(texts)) > 9_500
    ours = tk.tokenize(texts, truncate=True)
    theirs = open_clip.tokenize(texts)
    assert ours.dtype == torch.int32 and ours.shape == (10_000, 77)
    assert (ours[:, -1] != 0).sum() > 100  # some rows really were truncated
    diff = _first_differences(texts, ours.long(), theirs.long())
    assert not diff, diff


def test_matches_open_clip_at_other_context_lengths():
    texts = make_corpus(500, seed=7)
    for length in (16, 32, 100):
        ours = tk.tokenize(texts, context_length=length, truncate=True)
        theirs = open_clip.tokenize(texts, context_length=length)
        assert ours.shape == (500, length)
        assert not _first_differences(texts, ours.long(), theirs.long())


def test_fast_path_is_exact_on_ascii(tok):
    rng = random.Random(99)
    texts = [random_ascii(rng) for _ in range(5_000)]
    fast = [t for t in texts if tok.skips_cleaning(t)]
    assert 3_000 < len(fast) < 5_000  # both paths exercised
    for text in fast:  # the claim the fast path rests on
        assert tk.clean_text(text) == " ".join(text.lower().split()), repr(text)
    for text in texts:
        assert tok.encode(text) == tok._reference_encode(text), repr(text)


def test_every_ascii_character_is_classified_correctly(tok):
    for code in range(128):
        text = f"a{chr(code)}B {chr(code)}"
        if tok.skips_cleaning(text):
            assert tk.clean_text(text) == " ".join(text.lower().split()), hex(code)
    # characters that ftfy removes or html rewrites must take the exact path
    for char in ["\x00", "\x0b", "\x1b", "\x1c", "\x7f", "&", "é", "\u00a0"]:
        assert not tok.skips_cleaning(f"plain {char} text")


def test_ascii_chunk_pattern_equals_clip_pattern():
    full = regex.compile(tk.CLIP_PATTERN, regex.IGNORECASE)
    ascii_pat = re.compile(tk.ASCII_CHUNK_PATTERN)
    # the domain: printable ASCII without space and without upper case (lower-cased, space-split text)
    alphabet = [chr(c) for c in range(0x21, 0x7F) if not "A" <= chr(c) <= "Z"]
    short = itertools.chain(alphabet, ("".join(p) for p in itertools.product(alphabet, repeat=2)))
    tricky = "'strevmld<|>a1!"
    rng = random.Random(5)
    longer = [
        "".join(rng.choice(tricky if rng.random() < 0.8 else alphabet) for _ in range(12))
        for _ in range(3_000)
    ]
    longer += ["<|startoftext|>x", "'<|endoftext|>'s", "<|startoftext", "it's'll've"]
    for chunk in itertools.chain(short, longer):
        assert ascii_pat.findall(chunk) == full.findall(chunk), chunk


def test_small_cache_stays_bounded_and_exact():
    small = tk.SimpleTokenizer(cache_size=16)
    for text in make_corpus(400, seed=3):
        assert small.encode(text) == small._reference_encode(text), repr(text)
        assert len(small._chunk_cache) <= 16 and len(small._piece_cache) <= 16


def test_row_layout_and_dtype(tok):
    out = tk.tokenize("a photo of a dog")
    ids = tok.encode("a photo of a dog")
    assert out.dtype == torch.int32 and out.shape == (1, 77)
    assert out[0, : len(ids) + 2].tolist() == [SOT, *ids, EOT]
    assert not out[0, len(ids) + 2 :].any()
    assert tk.tokenize([]).shape == (0, 77)
    assert tk.tokenize(["", "  \n "])[:, :3].tolist() == [[SOT, EOT, 0], [SOT, EOT, 0]]


def test_too_long_text_raises_with_a_clear_message():
    text = "a dog and a cat " * 30
    with pytest.raises(RuntimeError) as err:
        tk.tokenize(["short", text])
    message = str(err.value)
    assert text[:50] in message and "77" in message and "truncate=True" in message
    huge = "word " * 5_000
    with pytest.raises(RuntimeError) as err:
        tk.tokenize(huge, context_length=77)
    assert len(str(err.value)) < 400 and "..." in str(err.value)


def test_truncate_keeps_end_of_text_last(tok):
    text = "one two three four five six seven eight nine ten " * 10
    ids = tok.encode(text)
    for length in (5, 77):
        out = tk.tokenize(text, context_length=length, truncate=True)
        assert out.shape == (1, length)
        assert out[0].tolist() == [SOT, *ids[: length - 2], EOT]
    # exactly fitting text is not truncated
    fit = " ".join(["dog"] * 75)
    assert tk.tokenize(fit)[0, -1].item() == EOT and tk.tokenize(fit)[0, -2].item() == tok.encoder["dog</w>"]


def test_context_length_is_respected():
    out_32 = tk.tokenize(["a red car", "two people riding bikes"], context_length=32)
    out_77 = tk.tokenize(["a red car", "two people riding bikes"])
    assert out_32.shape == (2, 32)
    assert torch.equal(out_32, out_77[:, :32])
    with pytest.raises(ValueError, match="context_length"):
        tk.tokenize("a", context_length=0)


def test_encode_decode_round_trip(tok):
    assert tok.decode(tok.encode("A photo of a DOG.")) == "a photo of a dog . "
    assert tok.decode(tok.encode("café 東京 😀")) == "café 東京 😀 "
    assert tok.decode(torch.tensor(tok.encode("it's fine"))) == "it 's fine "
    assert tok.encode("hello world") == [3306, 1002]
    assert tok.bpe("hello") == "hello</w>"


def test_literal_special_tokens_follow_openai():
    # openai/CLIP's pattern matches the literal special tokens in text (open_clip's spells them differently).
    out = tk.tokenize("<|startoftext|> x <|endoftext|>")
    assert out[0, :5].tolist() == [SOT, SOT, 343, EOT, EOT]


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tk.tokenize(["ok", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="1-D"):
        tk.default_tokenizer().decode(torch.zeros(2, 3, dtype=torch.long))


def test_nothing_is_built_at_import(monkeypatch):
    # Execute a fresh copy of the module: building a tokenizer at import would call the (patched) loader.
    calls = []
    monkeypatch.setattr(gzip, "open", lambda *a, **k: calls.append(a))
    spec = importlib.util.spec_from_file_location("fresh_tokenizer", tk.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert calls == [] and fresh.default_tokenizer.cache_info().currsize == 0
