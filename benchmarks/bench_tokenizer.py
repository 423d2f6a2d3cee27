"""Tokenizer throughput: clip.tokenize vs open_clip.tokenize on the same captions, same process, same threads.

    .venv/bin/python benchmarks/bench_tokenizer.py [--texts 10000] [--repeats 5] [--seed 0]

Prints one JSON line per measurement and a final summary line (speed ratio, whether the ids were identical).
The captions are synthetic but shaped like COCO/CC captions; about 3% carry non-ASCII letters, curly quotes,
emoji or "&", which take the exact (ftfy + html) path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

COUNTS = ["a", "an old", "one", "two", "three", "several", "a group of", "a couple of", "many", "a single"]
ADJECTIVES = ["red", "small", "large", "brown", "white", "black", "young", "wooden", "shiny", "tall"]
SUBJECTS = [
    "dog", "cat", "man", "woman", "child", "horse", "bus", "train", "bicycle", "pizza", "giraffe", "surfer",
    "skateboarder", "teddy bear", "kite", "laptop", "motorcycle", "elephant", "sandwich", "boat", "tower",
]  # fmt: skip
ACTIONS = [
    "sitting on", "standing next to", "running across", "parked near", "flying over", "lying on", "riding",
    "looking at", "walking down", "eating", "holding", "leaning against", "jumping over", "waiting at",
]  # fmt: skip
PLACES = [
    "the beach", "a busy street", "a kitchen counter", "the grass", "a snowy hill", "an airport runway",
    "a wooden table", "the river bank", "a city park", "the train station", "a dirt road", "the living room",
]  # fmt: skip
TAILS = [
    "", "", "", " at sunset", " on a sunny day", " in the rain", " at night", " with trees behind it",
    " while people watch", ", photographed from above", " in black and white",
]  # fmt: skip
# Realistic text that must take the exact path (ftfy, html): accents, curly quotes, emoji, ampersands.
UNUSUAL = [
    "café", "crème brûlée", "it’s", "“fresh”", "salt & pepper", "Ben &amp; Jerry's", "piñata", "😀", "naïve",
]  # fmt: skip


def make_captions(n: int, seed: int) -> list[str]:
    """n distinct, reproducible caption-like strings."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        words = [rng.choice(COUNTS), rng.choice(ADJECTIVES), rng.choice(SUBJECTS), rng.choice(ACTIONS)]
        text = " ".join(words) + " " + rng.choice(PLACES) + rng.choice(TAILS)
        if rng.random() < 0.3:
            text += f" number {rng.randint(1, 999)}"
        if rng.random() < 0.03:
            text += " " + rng.choice(UNUSUAL)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:] + "."
        seen[text] = None
    return list(seen)


def time_calls(fns: list[Callable[[], torch.Tensor]], repeats: int) -> list[tuple[float, torch.Tensor]]:
    """Median wall time of `repeats` calls of each function, interleaved so that load drifts hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), out) for t, out in zip(times, outs, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=10_000, help="number of distinct captions")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import open_clip

    from clip import tokenizer as tk

    texts = make_captions(args.texts, args.seed)
    common = {"bench": "tokenizer", "texts": len(texts), "torch_threads": torch.get_num_threads()}
    common["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"

    def report(impl: str, mode: str, seconds: float, repeats: int) -> None:
        line = {**common, "impl": impl, "mode": mode, "repeats": repeats, "seconds": round(seconds, 5)}
        print(json.dumps({**line, "texts_per_s": round(len(texts) / seconds)}), flush=True)

    # Cold: first call on each default tokenizer (vocabulary parsed beforehand), every word through BPE once.
    tk.default_tokenizer()
    start = time.perf_counter()
    tk.tokenize(texts)
    ours_cold = time.perf_counter() - start
    report("clipforge", "cold-cache", ours_cold, 1)
    open_clip.tokenize("warm up: parse the vocabulary")
    start = time.perf_counter()
    open_clip.tokenize(texts)
    theirs_cold = time.perf_counter() - start
    report("open_clip", "cold-cache", theirs_cold, 1)

    # Every text through the exact path (ftfy + html), cache warm: what the fast path adds.
    exact = tk.SimpleTokenizer()
    exact.skips_cleaning = lambda text: False  # type: ignore[method-assign]
    exact.tokenize(texts)
    [(seconds, _)] = time_calls([lambda: exact.tokenize(texts)], args.repeats)
    report("clipforge", "warm-exact-path-only", seconds, args.repeats)

    # Warm, the normal case: both implementations have seen these texts once (both keep BPE caches).
    ours_fn = lambda: tk.tokenize(texts)  # noqa: E731
    theirs_fn = lambda: open_clip.tokenize(texts)  # noqa: E731
    (ours_s, ours), (theirs_s, theirs) = time_calls([ours_fn, theirs_fn], args.repeats)
    report("clipforge", "warm", ours_s, args.repeats)
    report("open_clip", "warm", theirs_s, args.repeats)

    identical = bool(torch.equal(ours.long(), theirs.long()))
    summary = {
        **common,
        "ratio_warm": round(theirs_s / ours_s, 2),
        "ratio_cold": round(theirs_cold / ours_cold, 2),
    }
    summary["identical"] = identical
    summary["ours_dtype"] = str(ours.dtype)
    print(json.dumps(summary), flush=True)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
