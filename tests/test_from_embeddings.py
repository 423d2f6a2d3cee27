"""`clip index --from-embeddings`: an index over `clip embed` shards that searches like `clip index` on the same
folder, with captions searchable, IVF codes chosen to fit a memory budget, and vectors read from a memory map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from clip.cli import main
from clip.search.embbuild import build_from_embeddings, minimal_roots
from clip.search.embindex import EmbeddingsIndex
from clip.search.index import Index, ModelMismatchError
from clip.search.ivf import CodeSpec, choose_codes, code_options, index_bytes, parse_size

pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red square", "a photo of a dog", "stripes", "number 3"]


def save_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((40, 32), Image.Resampling.NEAREST).save(path)


def make_photos(root: Path, n: int = 12) -> list[Path]:
    """n images (names sorted the same by path and by folder walk), each with a caption."""
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = root / f"im{i:03d}.png"
        save_png(p, i)
        p.with_suffix(".txt").write_text(f"picture number {i} of {'stripes' if i % 2 else 'squares'}")
        paths.append(p)
    return paths


@pytest.fixture
def job(tmp_path, tiny_checkpoint, one_thread):
    """(photos folder, embed output) of a small `clip embed --text` job in shards of 5."""
    photos = tmp_path / "photos"
    make_photos(photos)
    out = tmp_path / "emb"
    args = [
        str(photos),
        "--model",
        str(tiny_checkpoint),
        "--output",
        str(out),
        "--shard-size",
        "5",
        "--workers",
        "0",
    ]
    assert main(["embed", *args, "--text", "--no-progress"]) == 0
    return photos, out


def test_same_hits_as_clip_index_on_the_same_folder(tmp_path, job, tiny_checkpoint, capsys):
    photos, out = job
    assert main(["index", str(photos), "--index", str(tmp_path / "folder"), "--model", str(tiny_checkpoint),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert main(["index", "--from-embeddings", str(out), "--index", str(tmp_path / "emb_idx")]) == 0
    assert "model check: 4 images embedded again agree" in capsys.readouterr().err
    with Index.open(tmp_path / "folder") as a, Index.open(tmp_path / "emb_idx") as b:
        assert isinstance(b, EmbeddingsIndex) and len(b) == len(a) == 12
        assert b.model_identity == a.model_identity  # the embed job's model, named by its content
        for want, got in zip(a.search_text(QUERIES, k=5), b.search_text(QUERIES, k=5), strict=True):
            assert [h.path for h in got] == [h.path for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=2e-3)
        query = photos / "im004.png"
        top = b.search_image(query, k=3)
        assert top[0].path == str(query) and top[0].score > 0.999
        assert [h.path for h in top] == [h.path for h in a.search_image(query, k=3)]
        assert top[0].caption == "picture number 4 of squares"
        info = b.file_info(str(query))
        assert info is not None and (info.width, info.height) == (40, 32) and not info.content_hashed
        assert b.file_info(str(photos / "nope.png")) is None
        assert b.roots == [os.path.realpath(photos)]
    capsys.readouterr()
    assert main(["search", str(tmp_path / "emb_idx"), "a red square", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[0] == b.search_text("a red square", k=1)[0].path


def test_captions_text_to_text_and_image_to_caption(tmp_path, job, tiny_checkpoint, capsys):
    photos, out = job
    build_from_embeddings(out, tmp_path / "idx", log=lambda s: None)
    model, preprocess = clip.load(str(tiny_checkpoint), device="cpu")
    meta = [f"picture number {i} of {'stripes' if i % 2 else 'squares'}" for i in range(12)]
    with torch.no_grad():
        caps = F.normalize(model.encode_text(clip.tokenize(meta, context_length=32)), dim=-1).half().double()
        q = F.normalize(model.encode_text(clip.tokenize(["number 7 of stripes"], context_length=32)), dim=-1)
        img = F.normalize(
            model.encode_image(preprocess(Image.open(photos / "im002.png")).unsqueeze(0)), dim=-1
        )
    with Index.open(tmp_path / "idx") as idx:
        assert idx.has_captions
        for query, hits in ((q, idx.search_text("number 7 of stripes", k=4, target="captions")),
                            (img, idx.search_image(photos / "im002.png", k=4, target="captions"))):  # fmt: skip
            expect = (caps @ query.double()[0]).numpy()
            order = np.lexsort((np.arange(12), -expect))[:4]
            assert [h.id for h in hits] == order.tolist()
            assert [h.caption for h in hits] == [meta[i] for i in order]
            np.testing.assert_allclose([h.score for h in hits], expect[order], atol=2e-3)
    assert main(["search", str(tmp_path / "idx"), "stripes", "--captions", "--json", "-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 2 and "caption" in result["results"][0]


def test_wrong_model_is_refused(tmp_path, job):
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    torch.manual_seed(1)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp_path / "other.pt")
    with pytest.raises(ModelMismatchError, match="does not reproduce the embeddings"):
        build_from_embeddings(job[1], tmp_path / "idx", model=str(tmp_path / "other.pt"), log=lambda s: None)
    assert not (tmp_path / "idx" / "collection.json").exists()


def test_code_choice_fits_the_budget():
    assert (
        parse_size("16G") == 16 * 1024**3
        and parse_size("512M") == 512 * 1024**2
        and parse_size("1000") == 1000
    )
    with pytest.raises(ValueError, match="16 gigs"):
        parse_size("16 gigs")
    assert [c.name for c in code_options(512)] == [
        "SQ8",
        "SQ4",
        "PQ128",
        "PQ64",
        "PQ32",
        "PQ16",
        "PQ8",
        "PQ4",
    ]
    n = 10**8  # 10^8 CLIP vectors: SQ8 takes 52 GB; in 16 GiB the largest PQ that fits is PQ128
    assert choose_codes([n], 512, 16 * 1024**3) == CodeSpec("PQ", 128, 128)
    assert choose_codes([10**7], 512, 16 * 1024**3).name == "SQ8"
    assert choose_codes([10**7, 10**7], 512, 8 * 1024**3).name == "SQ4"  # images and captions together
    with pytest.raises(ValueError, match="raise --max-index-memory to at least"):
        choose_codes([n], 512, 1024**3)
    assert index_bytes(n, 512, 40000, CodeSpec("PQ", 64, 64)) < index_bytes(
        n, 512, 40000, CodeSpec("SQ4", 256)
    )


def fake_job(out: Path, n: int, dim: int, shard_rows: int, seed: int = 0) -> np.ndarray:
    """An embed job's output without a model: clustered unit vectors in shards, keys without files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip.collection import shards

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    for u, start in enumerate(range(0, n, shard_rows)):
        part = x[start : start + shard_rows]
        rows = list(range(start, start + len(part)))
        shards.write_chunk(out, u, 0, shards.ChunkData(part, [f"{r:08d}" for r in rows], [None] * len(part),
                           ["/nowhere/data.tar"] * len(part), [f"caption {r}" for r in rows], [1] * len(part),
                           [1] * len(part), rows), len(part), [])  # fmt: skip
        shards.write_unit_done(out, u, 1)
    job = {"format": 1, "model": "unused", "embed_dim": dim, "text": False, "precision": "fp32"}
    (out / shards.JOB_FILE).write_text(json.dumps(job))
    assert pa and pq
    return x


def test_budget_picks_pq_and_search_keeps_recall(tmp_path, tiny_model, monkeypatch):
    """20,000 vectors of 64 dimensions: SQ8 and SQ4 do not fit 900 KB, PQ16 does; recall@10 >= 0.95."""
    from clip.search import embbuild
    from clip.search.encoder import Encoder

    dim = tiny_model.config.embed_dim
    x = fake_job(tmp_path / "emb", 20_000, dim, 4096)
    monkeypatch.setattr(
        embbuild, "_encoder_for", lambda job, model, device: Encoder(tiny_model, lambda im: im)
    )
    monkeypatch.setattr(embbuild, "check_model", lambda *a: "model check skipped")
    budget = 900 * 1024
    assert index_bytes(20_000, dim, 565, CodeSpec("SQ4", dim // 2)) > budget
    manifest = build_from_embeddings(tmp_path / "emb", tmp_path / "idx", ann="always", max_index_memory=budget,
                                     log=lambda s: None)  # fmt: skip
    info = manifest["ann"]["images"]
    assert info["codes"] == "PQ16" and info["bytes"] <= budget and info["recall"] >= 0.95
    idx = EmbeddingsIndex(tmp_path / "idx", manifest, Encoder(tiny_model, lambda im: im), "cpu")
    q = torch.from_numpy(x[[5, 17_000]].astype(np.float32)) + 0.05 * torch.randn(2, dim)
    approx, exact = idx.search_vectors(q, k=10), idx.search_vectors(q, k=10, ann=False)
    assert sum(len({h.id for h in a} & {h.id for h in e}) for a, e in zip(approx, exact, strict=True)) >= 18
    assert approx[0][0].path == "/nowhere/data.tar#00000005" and idx.file_info(approx[0][0].path) is None


def test_many_lists_use_an_hnsw_quantiser_with_the_same_recall(tmp_path, monkeypatch):
    """From HNSW_MIN_LISTS lists on, lists are found by an HNSW graph (fast adds at 10^7); recall still holds,
    the graph searches at least 2 x nprobe candidates, and a saved index loads back with it."""
    import faiss

    from clip.search import ivf
    from clip.search.vectors import ShardedVectors

    x = fake_job(tmp_path / "emb", 8_000, 32, 8_000)
    vectors = ShardedVectors(sorted((tmp_path / "emb").rglob("*.npy")), 32)
    found = {}
    for threshold in (10**9, 64):  # flat, then HNSW, at the same 256 lists
        monkeypatch.setattr(ivf, "HNSW_MIN_LISTS", threshold)
        index, info = ivf.build_ivf(vectors, CodeSpec("SQ8", 32), nlist=256)
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index.index).quantizer)
        assert isinstance(quantizer, faiss.IndexHNSW) == (threshold == 64)
        assert info["recall"] >= 0.95
        found[threshold] = index.topk(vectors, torch.from_numpy(x[:20].astype(np.float32)), 10)
    assert quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    assert quantizer.hnsw.efSearch == max(ivf.HNSW_MIN_EF, 2 * info["nprobe"])
    seen = []  # adding looks lists up with the cheaper HNSW_ADD_EF, and leaves the search setting as it was
    real_add = type(index.index).add_with_ids

    def spy(self, *args):
        seen.append(quantizer.hnsw.efSearch)
        return real_add(self, *args)

    monkeypatch.setattr(type(index.index), "add_with_ids", spy)
    index.add(vectors, chunk_rows=4_000)
    assert seen == [ivf.HNSW_ADD_EF] * 2 and quantizer.hnsw.efSearch == max(
        ivf.HNSW_MIN_EF, 2 * info["nprobe"]
    )
    monkeypatch.undo()
    same = [len(set(a[0]) & set(b[0])) for a, b in zip(found[10**9], found[64], strict=True)]
    assert sum(same) >= 0.95 * 200
    index.save(tmp_path / "i.faiss")
    back = ivf.IvfIndex.load(tmp_path / "i.faiss", nprobe=5, candidates_factor=1)
    graph = faiss.downcast_index(faiss.extract_index_ivf(back.index).quantizer)
    assert isinstance(graph, faiss.IndexHNSW) and graph.hnsw.efSearch == ivf.HNSW_MIN_EF


MMAP_PROBE = textwrap.dedent("""
    import sys
    import torch
    from pathlib import Path
    from clip.config import get_config
    from clip.model import CLIP
    from clip.search.embindex import EmbeddingsIndex, read_manifest
    from clip.search.encoder import Encoder
    root = Path(sys.argv[1])
    manifest = read_manifest(root)
    idx = EmbeddingsIndex(root, manifest, Encoder(CLIP(get_config("ViT-Tiny/8@32px")), lambda im: im), "cpu")
    hits = idx.search_vectors(torch.randn(3, manifest["embed_dim"]), k=10)
    print(len(hits[0]))
""")


def cached_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (mincore over a mapping that itself touches nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    pages = (len(view) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(view)), vec) == 0
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_search_reads_only_candidate_pages(tmp_path, tiny_model, monkeypatch):
    """A searching process reads only the pages of its rescored candidates: the shards are dropped from the
    page cache, a fresh process opens the index and searches, and the shards' pages that came back are few
    (readahead is off for those reads; without that, the kernel reads read_ahead_kb around each row)."""
    from clip.search import embbuild
    from clip.search.encoder import Encoder

    dim = tiny_model.config.embed_dim
    fake_job(tmp_path / "emb", 200_000, dim, 50_000)
    monkeypatch.setattr(
        embbuild, "_encoder_for", lambda job, model, device: Encoder(tiny_model, lambda im: im)
    )
    monkeypatch.setattr(embbuild, "check_model", lambda *a: "model check skipped")
    build_from_embeddings(tmp_path / "emb", tmp_path / "idx", log=lambda s: None)  # auto: IVF from 100k
    shards = sorted((tmp_path / "emb" / "img_emb").glob("*.npy"))
    for p in shards:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if sum(cached_bytes(p) for p in shards) > 0:
        pytest.fail("the page cache kept the shards after POSIX_FADV_DONTNEED: cannot measure reads here")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MMAP_PROBE, str(tmp_path / "idx")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "10"
    read = sum(cached_bytes(p) for p in shards)
    total = sum(p.stat().st_size for p in shards)
    assert 0 < read < total * 0.1, (read, total)  # 3 queries x ~42 candidates: ~126 rows, a page or so each


def test_changed_shards_and_bad_inputs_are_one_line(tmp_path, job, capsys):
    _, out = job
    assert main(["index", "--from-embeddings", str(out), "--index", str(tmp_path / "idx"), "--max-index-memory",
                 "lots"]) == 2  # fmt: skip
    assert "--max-index-memory" in capsys.readouterr().err
    assert main(["index", "--from-embeddings", str(tmp_path), "--index", str(tmp_path / "idx")]) != 0
    assert "is not the output of `clip embed`" in capsys.readouterr().err
    build_from_embeddings(out, tmp_path / "idx", log=lambda s: None)
    shard = sorted((out / "img_emb").iterdir())[0]
    data = shard.read_bytes()
    shard.write_bytes(data)  # same bytes, new mtime: a rerun job may have rewritten it
    os.utime(shard, ns=(0, 0))
    assert main(["search", str(tmp_path / "idx"), "a dog"]) != 0
    err = capsys.readouterr().err
    assert "changed since the index was built" in err and "--from-embeddings" in err


def test_minimal_roots():
    assert minimal_roots({"/a/b", "/a", "/ab", "/c/d"}) == ["/a", "/ab", "/c/d"]
