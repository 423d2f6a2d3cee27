"""Approximate search through FAISS: recall against exact search, and its use inside an Index."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clip import cli
from clip.config import get_config
from clip.model import CLIP
from clip.search import ann as ann_mod
from clip.search import index as index_mod
from clip.search.index import Index
from clip.search.topk import search_exact

faiss = pytest.importorskip("faiss")


def clustered(n, dim, clusters, seed, spread=0.35):
    """Random unit vectors around random centres (embeddings are clustered, not uniform on the sphere).

    The centres are the same for every `seed`; the samples differ.
    """
    centres = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    v = centres[rng.integers(0, clusters, n)] + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_recall_against_exact_on_random_vectors():
    data = clustered(20000, 64, 200, seed=0)
    vecs = data.astype(np.float16)
    ids = np.arange(len(vecs), dtype=np.int64) * 3 + 7  # labels need not be rows
    ann, info = ann_mod.build(vecs, ids, target_recall=0.95, seed=0)
    assert info["recall"] >= 0.95 and info["nprobe"] < info["nlist"]  # it did not fall back to a full scan
    # Fresh queries from the same distribution, not the ones nprobe was tuned on.
    queries = torch.from_numpy(clustered(200, 64, 200, seed=1))
    truth = [rows for rows, _ in search_exact(torch.from_numpy(vecs), queries, 10)]
    recall = ann_mod.recall_at_k(ann, torch.from_numpy(vecs), ann_mod.row_lookup(ids), queries, truth)
    assert recall >= 0.9
    # Rescoring makes the scores of what it finds exact.
    rows, scores = ann_mod.ann_topk(ann, torch.from_numpy(vecs), ann_mod.row_lookup(ids), queries[:1], 10)[0]
    ref = vecs[rows].astype(np.float64) @ queries[0].double().numpy()
    np.testing.assert_allclose(scores, ref, atol=1e-12)


def images(folder, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
        img.save(folder / f"{seed}-{i:03d}.png")
        paths.append(str(folder / f"{seed}-{i:03d}.png"))
    return paths


@pytest.fixture
def small_index(tmp_path, monkeypatch):
    from clip.loading import save_model

    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp_path / "tiny.pt")
    paths = images(tmp_path / "photos", 40, seed=0)
    idx = Index.open(tmp_path / "idx", model=str(tmp_path / "tiny.pt"))
    idx.add(paths, num_workers=0)
    monkeypatch.setattr(index_mod, "ANN_THRESHOLD", 10)
    return idx, paths


def test_index_uses_ann_and_sees_later_changes(small_index, tmp_path):
    idx, paths = small_index
    assert idx.ann_needed()
    info = idx.build_ann(target_recall=1.0, nlist=4)  # recall 1.0 forces an exhaustive nprobe: results exact
    assert info["recall"] == 1.0 and info["count"] == 40 and not idx.ann_needed()
    queries = ["a red car", "a blue sky", "a cat"]
    assert idx.search_text(queries, k=5, ann=True) == idx.search_text(queries, k=5, ann=False)
    assert idx.search_text(queries, k=5) == idx.search_text(queries, k=5, ann=True)  # auto picks the ANN

    # Files added after the build are searched exactly on the side; removed ones never come back.
    new = images(tmp_path / "later", 3, seed=1)
    idx.add(new, num_workers=0)
    idx.remove(paths[:5])
    assert idx.search_image(new[1], k=1, ann=True)[0].path == new[1]
    found = {h.path for h in idx.search_text("anything", k=38, ann=True)}
    assert found.isdisjoint(paths[:5]) and len(found) == 38
    assert idx.ann_status()["stale"] == pytest.approx(8 / 38)


def test_cli_builds_ann_and_prints_recall(small_index, tmp_path, monkeypatch, capsys):
    idx, _ = small_index
    idx.close()
    mods = ("clip.commands.index", "clip.commands.search")
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys(cli.COMMAND_MODULES + mods)))
    argv = ["index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--no-progress"]
    assert cli.main(argv) == 0
    assert "recall@10 vs exact search" in capsys.readouterr().out
    assert cli.main(["search", str(tmp_path / "idx"), "a dog", "-k", "3", "--ann"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_without_faiss_clear_message_and_exact_fallback(small_index, monkeypatch):
    idx, paths = small_index
    idx.build_ann(nlist=4)
    exact = idx.search_text("a dog", k=4, ann=False)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        ann_mod.require_faiss()
    assert idx.search_text("a dog", k=4) == exact  # auto mode falls back to exact search
