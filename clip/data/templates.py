"""Class names and prompt templates for zero-shot classification, shipped as data.

`zeroshot_prompts.json` holds OpenAI's lists (see `clip/evaluation/DATA_SOURCES.md`):

* ``imagenet``: the 1,000 curated ImageNet-1k class names and the 80 prompt templates of OpenAI's
  "Prompt Engineering for ImageNet" notebook;
* ``imagenet-7``: the 7 of those 80 that OpenAI's sequential forward selection kept, in selection order;
* ``cifar10`` / ``cifar100``: class names (in label order) and the 18 templates of OpenAI's `data/prompts.md`;
* ``simple``: the single template ``"a photo of a {}."``.

A template is a string with one or more ``{}``; each ``{}`` is replaced by the class name.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

PROMPTS_FILE = "zeroshot_prompts.json"
SIMPLE_TEMPLATE = "a photo of a {}."


@functools.cache
def _prompts() -> dict[str, Any]:
    text = (importlib.resources.files("clip.data") / PROMPTS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def dataset_names() -> tuple[str, ...]:
    """Data sets with built-in class names: ('imagenet', 'cifar10', 'cifar100')."""
    return tuple(_prompts()["datasets"])


def template_names() -> tuple[str, ...]:
    """Names accepted by `templates()`: the data sets, 'imagenet-7' and 'simple'."""
    return (*dataset_names(), *_prompts()["templates"], "simple")


def classnames(dataset: str) -> list[str]:
    """The class names of a built-in data set, in label order (a fresh list)."""
    datasets = _prompts()["datasets"]
    if dataset not in datasets:
        raise ValueError(f"no built-in class names for {dataset!r}; known: {', '.join(datasets)}")
    return list(datasets[dataset]["classnames"])


def templates(name: str) -> list[str]:
    """The named template list (a fresh list); an unknown name lists the known ones."""
    prompts = _prompts()
    if name in prompts["datasets"]:
        return list(prompts["datasets"][name]["templates"])
    if name in prompts["templates"]:
        return list(prompts["templates"][name])
    if name == "simple":
        return [SIMPLE_TEMPLATE]
    raise ValueError(
        f"unknown template set {name!r}; use one of {', '.join(template_names())}, "
        'a file with one template per line, or a template such as "a photo of a {}."'
    )


def check_templates(items: list[str], source: str) -> list[str]:
    """Validate templates: a non-empty list of strings, each holding ``{}``. Returns them unchanged."""
    if not items:
        raise ValueError(f"no templates in {source}")
    bad = [t for t in items if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} from {source} has no '{{}}' to put the class name in")
    return items


def resolve_templates(spec: str | None, default: str | list[str] = "simple") -> list[str]:
    """Templates from a command-line value: a built-in NAME, a FILE (one per line), or a literal with ``{}``.

    `spec=None` gives `default` (a name or a list). A value that is none of the three is an error naming
    the known template sets. Blank lines and lines starting with '#' in a file are ignored.
    """
    if spec is None:
        return templates(default) if isinstance(default, str) else check_templates(list(default), "defaults")
    if "{}" in spec and not os.path.isfile(spec):
        return [spec]
    if os.path.isfile(spec):
        return check_templates(read_lines(spec), spec)
    return templates(spec)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped, without '#' comment lines."""
    text = Path(path).read_text(encoding="utf-8")
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def format_prompts(classname: str, items: list[str]) -> list[str]:
    """['a photo of a {}.'] -> ['a photo of a dog.']: every ``{}`` replaced (no other brace is special)."""
    return [t.replace("{}", classname) for t in items]
