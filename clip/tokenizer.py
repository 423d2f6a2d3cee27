"""OpenAI CLIP's byte-level BPE tokenizer: the ids of openai/CLIP's `clip.tokenize`, several times faster.

The algorithm is OpenAI's (Radford et al., 2021, and the GPT-2 byte-level BPE it builds on):

1. clean: `ftfy.fix_text`, `html.unescape` twice, strip, collapse every run of whitespace (regex ``\\s+``) to
   one space, strip, lower-case;
2. pre-tokenize with the CLIP pattern (special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
   letters, single digits, runs of anything else but whitespace);
3. map each piece's UTF-8 bytes to printable characters (`bytes_to_unicode`), mark the end of the word with
   ``</w>`` and apply the first 48,894 merges of `bpe_simple_vocab_16e6.txt.gz` (a vocabulary of 49,408 ids,
   ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407).

Two facts make it fast without changing a single id:

* Pre-tokenization never crosses a space (no alternative of the pattern matches whitespace and the pattern has
  no look-behind, and lower-casing creates no whitespace), so the ids of a cleaned text are the ids of its
  space-separated chunks, concatenated. Each tokenizer keeps a bounded cache from chunk to ids.
* For text made only of printable ASCII, tab, line feed, form feed and carriage return, without ``&``, the
  cleaning step is the identity up to whitespace: ftfy only rewrites ``\\r`` to ``\\n`` (it removes the other
  ASCII control characters, which is why those take the exact path) and `html.unescape` needs an ``&``.
  Such text skips ftfy and html; everything else takes the exact path.

The vocabulary file is OpenAI's (MIT licence, Copyright (c) 2021 OpenAI), shipped as package data; see NOTICE.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import re as std_re
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # 48,894: OpenAI uses the first merges so that the vocabulary has 49,408 entries
VOCAB_SIZE = 49408
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
DEFAULT_CONTEXT_LENGTH = 77

# OpenAI's pre-tokenization pattern, compiled with regex.IGNORECASE exactly as openai/CLIP does.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The same pattern restricted to chunks of printable, non-space ASCII without upper-case letters (what
# lower-cased ASCII text splits into). There \p{L} is [a-z], \p{N} is [0-9], no whitespace occurs and
# IGNORECASE matches nothing extra, so the alternatives (tried in the same order) match the same spans.
# The stdlib engine runs it faster than `regex` runs the Unicode classes.
ASCII_CHUNK_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^a-z0-9]+"""
# Characters that send a text down the exact path: anything but printable ASCII, \t \n \x0c \r; and '&'.
NEEDS_CLEANING_PATTERN = r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]"

# Entries kept per cache (chunks, pieces) per tokenizer, and the longest key worth keeping (long chunks such as
# URLs rarely repeat): at most ~70 MB per cache, a few MB for caption data.
_CACHE_SIZE = 1 << 18
_CACHE_MAX_KEY = 64


def vocab_path() -> str:
    """Path of the packaged vocabulary file (OpenAI's `bpe_simple_vocab_16e6.txt.gz`)."""
    # Next to this module: gzip needs a real file, and importlib.resources fails when an editable install
    # exposes `clip` as a namespace package.
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILE)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, soft hyphen...) take code points
    256 and up, in byte order, so that BPE symbols never contain whitespace or control characters.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    # The order matters: the first 256 vocabulary entries are these characters in this order.
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return dict(zip(printable + others, chars, strict=True))


def basic_clean(text: str) -> str:
    """ftfy, then HTML unescaping twice (captions are often double-escaped), then strip: as OpenAI."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


@functools.cache
def _whitespace_re() -> regex.Pattern:
    return regex.compile(r"\s+")


def whitespace_clean(text: str) -> str:
    """Collapse every run of Unicode whitespace to one space and strip: as OpenAI."""
    return _whitespace_re().sub(" ", text).strip()


def clean_text(text: str) -> str:
    """The full OpenAI cleaning: `whitespace_clean(basic_clean(text)).lower()`."""
    return whitespace_clean(basic_clean(text)).lower()


def _load_merges(path: str) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; OpenAI keeps the next NUM_MERGES lines.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{path} is not OpenAI's BPE vocabulary: expected {NUM_MERGES} merge lines of two symbols each; "
            f"reinstall the package or pass the original bpe_simple_vocab_16e6.txt.gz"
        )
    return merges  # type: ignore[return-value]


def _too_long_message(text: str, num_tokens: int, context_length: int) -> str:
    shown = text if len(text) <= 100 else text[:97] + "..."
    return (
        f"Input {shown!r} is too long for context length {context_length}: it needs {num_tokens} tokens "
        f"including <|startoftext|> and <|endoftext|>; pass truncate=True to cut it to {context_length} "
        f"tokens ending with <|endoftext|>"
    )


def _pack(rows: list[list[int]], context_length: int) -> torch.Tensor:
    """Rows of ids (each at most context_length long) -> zero-padded IntTensor [N, context_length]."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (N,)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    out = np.zeros((len(rows), context_length), dtype=np.int32)  # (N, L)
    # A boolean mask assigns in row-major order: row i gets its lengths[i] ids in columns 0..lengths[i]-1.
    out[np.arange(context_length) < lengths[:, None]] = flat
    return torch.from_numpy(out)


class SimpleTokenizer:
    """OpenAI's CLIP tokenizer with a fast path and a chunk cache that change no id.

    Attributes as in openai/CLIP: `encoder` (symbol -> id), `decoder` (id -> symbol), `byte_encoder`,
    `byte_decoder`, `bpe_ranks` (merge pair -> rank), `pat` (the compiled pre-tokenization pattern), `vocab`.
    """

    def __init__(self, bpe_path: str | os.PathLike[str] | None = None, cache_size: int = _CACHE_SIZE) -> None:
        path = os.fspath(bpe_path) if bpe_path is not None else vocab_path()
        merges = _load_merges(path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        self.vocab = [*base, *(c + "</w>" for c in base), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
        self.encoder = {symbol: i for i, symbol in enumerate(self.vocab)}
        self.decoder = dict(enumerate(self.vocab))
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pat = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._ascii_chunk_pat = std_re.compile(ASCII_CHUNK_PATTERN)
        self._needs_cleaning = std_re.compile(NEEDS_CLEANING_PATTERN)
        # For str.translate after .decode("latin-1"): code point (= byte value) -> its BPE character.
        self._byte_table = dict(self.byte_encoder)
        self._specials = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        self._cache_size = cache_size
        self._chunk_cache: dict[str, tuple[int, ...]] = {}
        self._piece_cache: dict[str, tuple[int, ...]] = {}

    # -- BPE --

    def _merge(self, token: str) -> list[str]:
        """BPE of one byte-encoded piece: merge every occurrence (left to right) of the best pair, repeat."""
        symbols = [*token[:-1], token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:], strict=False), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if symbols[i] == first and i + 1 < n and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def bpe(self, token: str) -> str:
        """openai/CLIP's `bpe`: the BPE symbols of one byte-encoded piece, joined by spaces."""
        if token in self._specials:
            return token
        return " ".join(self._merge(token))

    # -- caches --

    def _remember(self, cache: dict[str, tuple[int, ...]], key: str, ids: tuple[int, ...]) -> None:
        if len(key) > _CACHE_MAX_KEY:
            return
        if len(cache) >= self._cache_size:
            cache.clear()  # bounded without per-hit LRU bookkeeping; a hot working set refills in one pass
        cache[key] = ids

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._piece_cache.get(piece)
        if ids is None:
            ids = self._specials.get(piece)
            if ids is None:
                chars = piece.encode("utf-8").decode("latin-1").translate(self._byte_table)
                ids = tuple(self.encoder[s] for s in self._merge(chars))
            self._remember(self._piece_cache, piece, ids)
        return ids

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        """Ids of one space-free chunk of cleaned, lower-cased text (the cache-miss path)."""
        if chunk.isascii() and chunk.isprintable() and chunk == chunk.lower():
            pieces = self._ascii_chunk_pat.findall(chunk)
        else:
            pieces = self.pat.findall(chunk)
        ids = tuple(i for piece in pieces for i in self._piece_ids(piece))
        self._remember(self._chunk_cache, chunk, ids)
        return ids

    # -- text --

    def skips_cleaning(self, text: str) -> bool:
        """True when `clean_text(text)` is `" ".join(text.lower().split())`, so ftfy and html can be skipped.

        That holds for printable ASCII plus \\t \\n \\x0c \\r without "&": ftfy leaves those characters alone
        except \\r -> \\n (a space either way after whitespace collapse), and html.unescape needs an "&".
        """
        if not text.isascii() or "&" in text:
            return False
        return text.isprintable() or self._needs_cleaning.search(text) is None

    def _chunks(self, text: str) -> list[str]:
        """Cleaned, lower-cased text split at its (single) spaces; the fast path skips ftfy and html."""
        if self.skips_cleaning(text):
            return text.lower().split()
        cleaned = clean_text(text)
        return cleaned.split(" ") if cleaned else []

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without <|startoftext|> and <|endoftext|> (as openai/CLIP's `encode`)."""
        ids: list[int] = []
        cache = self._chunk_cache
        for chunk in self._chunks(text):
            chunk_ids = cache.get(chunk)
            ids += chunk_ids if chunk_ids is not None else self._chunk_ids(chunk)
        return ids

    def _reference_encode(self, text: str) -> list[int]:
        """OpenAI's encode step by step: the full pattern on the whole text, no fast path, no cache.

        The oracle that tests hold the fast path and the caches to.
        """
        ids: list[int] = []
        for piece in self.pat.findall(clean_text(text)):
            if piece in self._specials:
                ids += self._specials[piece]
                continue
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[s] for s in self._merge(chars)]
        return ids

    def decode(self, tokens: Iterable[int] | torch.Tensor) -> str:
        """Ids -> text; each end of word becomes a space (as openai/CLIP's `decode`). Tensors must be 1-D."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, not shape {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        symbols = "".join(self.decoder[int(t)] for t in tokens)
        data = bytes(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """Texts -> IntTensor [N, context_length]: <|startoftext|>, ids, <|endoftext|>, then zeros.

        A text longer than context_length raises RuntimeError unless truncate=True, which keeps the first
        context_length ids and puts <|endoftext|> last.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1, got {context_length}")
        sot, eot = self.sot_token_id, self.eot_token_id
        cache = self._chunk_cache
        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] is a {type(text).__name__}, not a str")
            row = [sot]
            for chunk in self._chunks(text):
                chunk_ids = cache.get(chunk)
                row += chunk_ids if chunk_ids is not None else self._chunk_ids(chunk)
            row.append(eot)
            if len(row) > context_length:
                if not truncate:
                    raise RuntimeError(_too_long_message(text, len(row), context_length))
                row = row[:context_length]
                row[-1] = eot
            rows.append(row)
        return _pack(rows, context_length)

    __call__ = tokenize


@functools.cache
def default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer over the packaged vocabulary, built on first use (never at import)."""
    return SimpleTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """Drop-in for openai/CLIP's `clip.tokenize`: IntTensor [N, context_length] (int32), zero padded.

    Each row is 49406 (<|startoftext|>), the BPE ids of the text, 49407 (<|endoftext|>), then zeros. A text
    that does not fit raises RuntimeError unless truncate=True, which cuts it and keeps 49407 as the last id.
    """
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)
