"""Evaluation data sets read from local files: image folders, CSV files and the CIFAR python archives.

* Image folder: ``DIR/<class name>/**/*.jpg`` (any common image extension). Classes are the sub-folders in
  sorted order; a folder name's underscores are read as spaces (``golden_retriever`` -> "golden retriever").
* Labelled CSV: a header row with the columns ``filepath`` and ``label``; paths are relative to the CSV's
  folder. A label is a class name, or a 0-based index into ``--classnames`` when one is given.
* Caption CSV (retrieval): columns ``filepath`` and ``caption``, one row per caption; an image may appear on
  several rows (its captions), in any order.
* CIFAR-10/100: the python archives as extracted from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  (folders ``cifar-10-batches-py`` and ``cifar-100-python``), with OpenAI's class names and templates.

CIFAR batches are Python pickles. They are read with a restricted unpickler that can only rebuild plain
containers, numbers, strings, bytes and numpy arrays: the only globals it hands out are numpy's array
constructor, `numpy.dtype` and a latin-1-only stand-in for `_codecs.encode` (how Python 3 writes bytes in
protocol 2). Any other global (a function or class a hostile pickle could use to run code) is refused before
it is looked up, so reading an archive cannot execute code.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip.data import templates as prompt_data
from clip.files import IMAGE_EXTENSIONS, is_image_name  # noqa: F401  (the one definition)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"

ImageSource = str | np.ndarray  # a file path, or an HxWx3 uint8 array (CIFAR)


@dataclass
class LabeledImages:
    """Images with class labels: `sources[i]` has class `labels[i]`, named `classnames[labels[i]]`.

    `templates` are the data set's own prompt templates (CIFAR), or None to use the caller's default.
    """

    sources: list[ImageSource]
    labels: list[int]
    classnames: list[str]
    description: str
    templates: list[str] | None = None
    unreadable: list[dict[str, str]] = field(
        default_factory=list
    )  # [{"folder", "error"}] left out of `sources`

    def __len__(self) -> int:
        return len(self.sources)


@dataclass
class ImageCaptions:
    """Image-caption pairs for retrieval: caption j describes image `caption_image[j]` (an index into paths)."""

    paths: list[str]
    captions: list[str]
    caption_image: list[int] = field(default_factory=list)
    description: str = ""


# ------------------------------------------------------------------------------------------- readers


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a UTF-8 text file, one per line, in label order (blank lines ignored)."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file {path} is empty; write one class name per line")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"class-name file {path} lists {dup!r} more than once")
    return names


def load_image_folder(root: str | os.PathLike) -> LabeledImages:
    """`root/<class>/**/<image>`: classes sorted by folder name, underscores read as spaces.

    A folder that cannot be listed (permissions, I/O error) is left out and recorded in `unreadable`, so the
    report can say which images were never seen instead of silently scoring without them.
    """
    root = Path(root)
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise ValueError(f"cannot list image folder {root}: {err.strerror or err}") from None
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; lay images out as {root}/<class name>/*.jpg")
    sources: list[ImageSource] = []
    labels: list[int] = []
    unreadable: list[dict[str, str]] = []
    for label, folder in enumerate(class_dirs):
        files = _image_files(folder, unreadable)
        sources += [str(p) for p in files]
        labels += [label] * len(files)
    classnames = [d.name.replace("_", " ") for d in class_dirs]
    _check_not_empty(sources, f"image folder {root}")
    return LabeledImages(sources, labels, classnames, f"image folder {root}", unreadable=unreadable)


def _image_files(folder: Path, unreadable: list[dict[str, str]]) -> list[Path]:
    """Image files under `folder`, recursively (symlinked folders not followed), in sorted order; folders that
    cannot be listed are appended to `unreadable`."""

    def failed(err: OSError) -> None:
        unreadable.append({"folder": str(err.filename or folder), "error": err.strerror or str(err)})

    files = []
    for top, _, names in os.walk(folder, onerror=failed):
        for name in names:
            path = Path(top) / name
            if is_image_name(path) and path.is_file():
                files.append(path)
    return sorted(files)


def _read_csv(path: Path, columns: tuple[str, str]) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if not all(c in header for c in columns):
            raise ValueError(
                f"{path} needs a header row with the columns {','.join(columns)}; found {','.join(header) or 'none'}"
            )
        reader.fieldnames = header
        rows = [(row[columns[0]] or "", row[columns[1]] or "") for row in reader]
    base = path.parent
    return [(str(base / p.strip()) if p.strip() else "", v.strip()) for p, v in rows]


def load_labeled_csv(path: str | os.PathLike, classnames: Sequence[str] | None = None) -> LabeledImages:
    """A `filepath,label` CSV. Labels are class names (sorted when `classnames` is None) or indices."""
    path = Path(path)
    rows = _read_csv(path, ("filepath", "label"))
    _check_not_empty(rows, f"CSV {path}")
    values = [v for _, v in rows]
    if classnames is None:
        if all(v.isdigit() for v in values):
            raise ValueError(f"{path} has numeric labels; pass --classnames FILE to name the classes")
        classnames = sorted(set(values))
    classnames = list(classnames)
    index = {name: i for i, name in enumerate(classnames)}
    labels = []
    for line, v in enumerate(values, start=2):
        if v in index:
            labels.append(index[v])
        elif v.isdigit() and int(v) < len(classnames):
            labels.append(int(v))
        else:
            raise ValueError(
                f"{path} line {line}: label {v!r} is neither a class name nor an index below "
                f"{len(classnames)}"
            )
    return LabeledImages([p for p, _ in rows], labels, classnames, f"CSV {path}")


def load_caption_csv(path: str | os.PathLike) -> ImageCaptions:
    """A `filepath,caption` CSV, one row per caption; rows of the same file are captions of one image."""
    path = Path(path)
    rows = _read_csv(path, ("filepath", "caption"))
    _check_not_empty(rows, f"CSV {path}")
    image_index: dict[str, int] = {}
    captions, caption_image = [], []
    for line, (p, caption) in enumerate(rows, start=2):
        if not caption:
            raise ValueError(f"{path} line {line}: empty caption")
        caption_image.append(image_index.setdefault(p, len(image_index)))
        captions.append(caption)
    return ImageCaptions(list(image_index), captions, caption_image, f"CSV {path}")


def _check_not_empty(items: Sequence[Any], what: str) -> None:
    if not items:
        raise ValueError(f"{what} holds no images; check the path and the layout")


# ------------------------------------------------------------------------------------------------ CIFAR


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for `_codecs.encode`, which Python 3 protocol-2 pickles use to store bytes, for latin-1 only."""
    if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds plain Python values and numpy arrays only; every other global is refused."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], Any]:
        reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own array rebuild function, whatever its module
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_bytes,
        }
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(module, "_reconstruct")] = reconstruct
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only numpy arrays are allowed here"
            )
        return allowed[(module, name)]


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """One CIFAR batch / meta pickle -> dict with str keys (the files use Python 2 byte-string keys)."""
    data = Path(path).read_bytes()
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read CIFAR file {path}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def find_cifar(data: str | os.PathLike) -> tuple[str, Path] | None:
    """('cifar10' | 'cifar100', archive folder) if `data` is or directly holds an extracted CIFAR archive."""
    data = Path(data)
    for name, folder, marker in (
        ("cifar10", CIFAR10_DIR, "batches.meta"),
        ("cifar100", CIFAR100_DIR, "meta"),
    ):
        for candidate in (data, data / folder) if data.name == folder else (data / folder,):
            if (candidate / marker).is_file():
                return name, candidate
    return None


def load_cifar(data: str | os.PathLike, split: str = "test") -> LabeledImages:
    """CIFAR-10/100 `split` ('test' or 'train') with OpenAI's class names and templates."""
    found = find_cifar(data)
    if found is None:
        raise FileNotFoundError(f"no {CIFAR10_DIR} or {CIFAR100_DIR} folder at {data}")
    name, folder = found
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    if name == "cifar10":
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        label_key = "labels"
    else:
        files, label_key = [split], "fine_labels"
    arrays, labels = [], []
    for fname in files:
        batch = read_cifar_pickle(folder / fname)
        images = np.asarray(batch["data"])
        if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
            raise ValueError(
                f"{folder / fname}: 'data' must be uint8 [N, 3072], got {images.dtype} {images.shape}"
            )
        arrays.append(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are R, G, B planes -> HWC
        labels += [int(v) for v in batch[label_key]]
    classnames = prompt_data.classnames(name)
    if labels and not 0 <= min(labels) <= max(labels) < len(classnames):
        raise ValueError(f"{folder}: labels outside 0..{len(classnames) - 1}; is this really {name}?")
    sources: list[ImageSource] = [img for block in arrays for img in block]
    _check_not_empty(sources, f"{name} {split} split in {folder}")
    return LabeledImages(
        sources, labels, classnames, f"{name} {split} ({folder})", prompt_data.templates(name)
    )


def load_labeled_images(
    data: str | os.PathLike, classnames: Sequence[str] | None = None, split: str = "test"
) -> LabeledImages:
    """Dispatch on the layout: a CIFAR archive folder, a `.csv` file, or an image folder."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no such data file or folder: {path}")
    if path.is_dir() and find_cifar(path) is not None:
        dataset = load_cifar(path, split)
        if classnames is not None:
            raise ValueError("CIFAR archives come with their own class names; drop --classnames")
        return dataset
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ValueError(
                f"{path} is a file but not a .csv; pass a CSV of filepath,label or an image folder"
            )
        return load_labeled_csv(path, classnames)
    dataset = load_image_folder(path)
    if classnames is not None:
        if len(classnames) != len(dataset.classnames):
            raise ValueError(
                f"--classnames lists {len(classnames)} names but {path} has {len(dataset.classnames)} class folders"
            )
        dataset.classnames = list(classnames)  # display names for the sorted folders, in the same order
    return dataset


# -------------------------------------------------------------------------------------- torch wrapper


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms images for a DataLoader; an unreadable one yields its error, not an exception.

    Item i -> (i, tensor or None, error message or None). Use `collate_skipping` as the collate_fn.
    """

    def __init__(self, sources: Sequence[ImageSource], transform: Callable[[Any], torch.Tensor]) -> None:
        self.sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        from PIL import Image

        from clip.preprocess import load_image

        src = self.sources[i]
        try:
            # EXIF orientation applied, as `clip index` and training do: one photo looks the same to every command
            img = Image.fromarray(src) if isinstance(src, np.ndarray) else load_image(src, exif=True)
            return i, self.transform(img), None
        except (ValueError, OSError) as err:  # load_image raises ValueError for every unreadable file
            return i, None, str(err)


def collate_skipping(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Batch the readable items: {'images': [B, 3, H, W], 'index': [B], 'failed': [(i, message)]}."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    return {
        "images": torch.stack([x for _, x in ok]) if ok else None,
        "index": torch.tensor([i for i, _ in ok], dtype=torch.long),
        "failed": [(i, msg) for i, x, msg in items if x is None],
    }
