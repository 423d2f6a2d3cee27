"""openai/CLIP's `clip.simple_tokenizer` module: `SimpleTokenizer`, `default_bpe`, `bytes_to_unicode`, ...

Same names, same ids; the implementation is `clip.tokenizer` (a faster path that changes no id).
"""

from __future__ import annotations

from clip.tokenizer import SimpleTokenizer, basic_clean, bytes_to_unicode, vocab_path, whitespace_clean

__all__ = ["SimpleTokenizer", "basic_clean", "bytes_to_unicode", "default_bpe", "whitespace_clean"]


def default_bpe() -> str:
    """Path of the packaged BPE vocabulary (openai/CLIP's `default_bpe()`)."""
    return vocab_path()
