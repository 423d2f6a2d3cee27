"""Evaluation data readers: image folders, CSVs, and CIFAR archives written here in the real format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clip.evaluation import datasets as ds
from clip.evaluation.features import EncodeOptions, encode_images


def write_cifar10(root, n_test=6, n_train_per_batch=2):
    """A tiny `cifar-10-batches-py` with the real keys: Python-2 style byte-string keys, uint8 [N, 3072] rows."""
    folder = root / ds.CIFAR10_DIR
    folder.mkdir(parents=True)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"num_cases_per_batch": n_test, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

    def batch(n, label, offset):
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:, :1024] = 255  # red plane full: every image is pure red...
        data[:, 1024 + 1] = np.arange(n) + offset  # ...with green at (row 0, col 1) = its index
        return {
            b"batch_label": label,
            b"labels": [int(i % 10) for i in range(offset, offset + n)],
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }

    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test, b"testing batch 1 of 1", 0), protocol=2))
    for i in range(1, 6):
        b = batch(n_train_per_batch, f"training batch {i} of 5".encode(), 100 + 10 * i)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b, protocol=2))
    return folder


def write_cifar100(root, n=5):
    folder = root / ds.CIFAR100_DIR
    folder.mkdir(parents=True)
    fine = [c.replace(" ", "_").encode() for c in ds.prompt_data.classnames("cifar100")]
    (folder / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": fine, b"coarse_label_names": []}, protocol=2)
    )
    for split in ("train", "test"):
        rec = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": [99 - i for i in range(n)],
            b"coarse_labels": [0] * n,
            b"data": np.full((n, 3072), 7, dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(rec, protocol=2))
    return folder


def test_cifar10_archive_reading(tmp_path):
    write_cifar10(tmp_path)
    for data in (tmp_path, tmp_path / ds.CIFAR10_DIR):  # the parent folder or the archive folder itself
        test = ds.load_labeled_images(data)
        assert len(test) == 6 and test.labels == [0, 1, 2, 3, 4, 5]
        assert test.classnames[0] == "airplane" and len(test.templates) == 18
    img = test.sources[3]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 0, 0] and img[0, 1].tolist() == [255, 3, 0]  # planes -> HWC, row-major
    train = ds.load_cifar(tmp_path, split="train")
    assert len(train) == 10 and train.labels[:2] == [0, 1] and train.labels[-1] == 1  # 150 % 10, 151 % 10


def test_cifar100_archive_reading(tmp_path):
    write_cifar100(tmp_path)
    test = ds.load_labeled_images(tmp_path, split="test")
    assert (
        test.labels == [99, 98, 97, 96, 95] and test.classnames[99] == "worm" and len(test.classnames) == 100
    )
    assert test.sources[0][5, 5].tolist() == [7, 7, 7]


def test_cifar_pickles_from_numpy_1_name_the_old_module(tmp_path):
    """Archives pickled by older numpy name numpy.core.multiarray; both spellings must load."""
    raw = pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=2)
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "batch"
    for blob in (raw, old):
        path.write_bytes(blob)
        assert ds.read_cifar_pickle(path)["data"].tolist() == [0, 1, 2, 3, 4, 5]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_reader_refuses_code(tmp_path, capsys):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"refused to load (__builtin__|builtins)\.print"):
        ds.read_cifar_pickle(path)
    assert "never run" not in capsys.readouterr().out


def write_image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root):
    write_image(root / "golden_retriever" / "a.png", (200, 150, 50))
    write_image(root / "golden_retriever" / "nested" / "b.jpg", (190, 140, 60))
    write_image(root / "cat" / "c.png", (20, 20, 20))
    (root / "cat" / "broken.jpg").write_bytes(b"not really a jpeg")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()
    return root


def test_image_folder_layout(tmp_path):
    data = ds.load_labeled_images(make_folder(tmp_path / "imgs"))
    assert data.classnames == ["cat", "golden retriever"]  # sorted folders, underscores read as spaces
    assert [p.split("/imgs/")[1] for p in data.sources] == [
        "cat/broken.jpg",
        "cat/c.png",
        "golden_retriever/a.png",
        "golden_retriever/nested/b.jpg",
    ]
    assert data.labels == [0, 0, 1, 1]
    renamed = ds.load_labeled_images(tmp_path / "imgs", classnames=["kitty", "goldie"])
    assert renamed.classnames == ["kitty", "goldie"]
    with pytest.raises(ValueError, match="lists 1 names but"):
        ds.load_labeled_images(tmp_path / "imgs", classnames=["one"])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = ds.load_labeled_images(make_folder(tmp_path / "imgs"))
    seen = []

    def encode(x):
        seen.append(x.shape)
        return x.flatten(1)[:, :8]

    enc = encode_images(
        encode, data.sources, lambda im: torch.ones(3, 4, 4), EncodeOptions(batch_size=3, progress=False)
    )
    assert enc.index.tolist() == [1, 2, 3] and enc.n_skipped == 1
    assert enc.failed[0][0] == 0 and "broken.jpg" in enc.failed[0][1]
    assert seen == [(2, 3, 4, 4), (1, 3, 4, 4)]
    torch.testing.assert_close(enc.features.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        encode_images(encode, data.sources[:1], lambda im: torch.ones(3, 4, 4), EncodeOptions(progress=False))


def test_labeled_csv(tmp_path):
    make_folder(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text("filepath,label\ncat/c.png,cat\ngolden_retriever/a.png,dog\n")
    data = ds.load_labeled_images(csv)
    assert data.classnames == ["cat", "dog"] and data.labels == [0, 1]
    assert data.sources[0] == str(tmp_path / "cat" / "c.png")  # relative to the CSV's folder
    csv.write_text("filepath,label\ncat/c.png,1\ngolden_retriever/a.png,0\n")
    with pytest.raises(ValueError, match="numeric labels"):
        ds.load_labeled_images(csv)
    assert ds.load_labeled_images(csv, classnames=["dog", "cat"]).labels == [1, 0]
    csv.write_text("path,label\ncat/c.png,cat\n")
    with pytest.raises(ValueError, match="header row with the columns filepath,label"):
        ds.load_labeled_images(csv)
    csv.write_text("filepath,label\n")
    with pytest.raises(ValueError, match="holds no images"):
        ds.load_labeled_images(csv)


def test_caption_csv_groups_captions_by_image(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text('filepath,caption\na.jpg,a dog\nb.jpg,"a cat, sitting"\na.jpg,a brown dog\n')
    pairs = ds.load_caption_csv(csv)
    assert [p.rsplit("/", 1)[1] for p in pairs.paths] == ["a.jpg", "b.jpg"]
    assert pairs.captions == ["a dog", "a cat, sitting", "a brown dog"]
    assert pairs.caption_image == [0, 1, 0]


def test_empty_and_missing_data_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ds.load_labeled_images(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ds.load_labeled_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such data"):
        ds.load_labeled_images(tmp_path / "nope")
