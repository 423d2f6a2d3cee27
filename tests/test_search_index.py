"""clip.search.Index: incremental updates, bad files, exact search, ties, model identity, and the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clip import cli
from clip.config import get_config
from clip.model import CLIP
from clip.search.encoder import Encoder, model_identity
from clip.search.index import Index, ModelMismatchError
from clip.search.topk import search_exact

SEARCH_COMMANDS = ("clip.commands.index", "clip.commands.search", "clip.commands.serve")


def make_images(folder, n, seed=0, size=(40, 32)):
    """n distinct small images (random colour blocks) as PNG and JPEG, some in a subfolder; returns paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
        ext = "png" if i % 2 else "jpg"
        path = folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.{ext}"
        img.save(path, quality=95)
        paths.append(str(path))
    return sorted(paths)


def write_checkpoint(path, seed=0):
    from clip.loading import save_model

    torch.manual_seed(seed)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), path)
    return str(path)


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "tiny.pt")


def run_cli(argv, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys(cli.COMMAND_MODULES + SEARCH_COMMANDS)))
    return cli.main(argv)


def bump_mtime(path, seconds=10):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_incremental_add_modify_delete(tmp_path, ckpt):
    photos = tmp_path / "photos"
    paths = make_images(photos, 12)
    (photos / "notes.txt").write_text("not an image, and not an image name: ignored")
    idx = Index.open(tmp_path / "idx", model=ckpt)
    first = idx.sync(photos, batch_size=4, num_workers=2)
    assert (first.added, first.updated, first.removed, len(first.failed)) == (12, 0, 0, 0)
    assert len(idx) == 12 and all(p in idx for p in paths)

    again = idx.sync(photos, batch_size=4, num_workers=0)
    assert (again.added, again.updated, again.skipped) == (0, 0, 12)

    # Modify one file (new pixels), touch another (same bytes, new mtime), delete one, add one.
    changed, touched, deleted = paths[1], paths[2], paths[3]
    Image.new("RGB", (40, 32), (250, 10, 10)).save(changed)
    bump_mtime(changed)
    bump_mtime(touched)
    os.remove(deleted)
    new = make_images(tmp_path / "more", 1, seed=5)[0]
    added = str(photos / "sub" / "new.png")
    shutil.copy(new, added)
    before = idx.search_image(touched, k=1)[0]
    report = idx.sync(photos, batch_size=4, num_workers=2)
    assert (report.added, report.updated, report.unchanged_content, report.removed) == (1, 1, 1, 1)
    assert len(idx) == 12 and deleted not in idx and added in idx
    # Results follow: the changed file is found by its new content, the touched one kept its vector.
    top = idx.search_image(Image.new("RGB", (40, 32), (250, 10, 10)), k=1)[0]
    assert top.path == changed and top.score > 0.999
    assert idx.search_image(touched, k=1)[0] == before
    assert deleted not in {h.path for h in idx.search_text("anything", k=20)}
    assert idx.search_image(added, k=1)[0].path == added

    assert idx.remove([added, paths[0]]) == 2
    assert len(idx) == 10 and added not in idx


def test_bad_files_listed_not_fatal(tmp_path, ckpt, monkeypatch):
    photos = tmp_path / "photos"
    make_images(photos, 4)
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.jpg").write_text("hello")
    good = photos / "img001.png"
    (photos / "truncated.png").write_bytes(good.read_bytes()[:60])
    idx = Index.open(tmp_path / "idx", model=ckpt)
    report = idx.sync(photos, batch_size=2, num_workers=1)
    bad = {os.path.basename(p) for p, _ in report.failed}
    assert bad == {"empty.png", "text.jpg", "truncated.png"} and report.added == 4
    assert [os.path.basename(p) for p, _ in idx.errors()] == sorted(bad)
    assert all(msg for _, msg in idx.errors())
    # Unchanged bad files are not retried; a fixed one is embedded and leaves the error list.
    assert idx.sync(photos, num_workers=0).failed == []
    shutil.copy(good, photos / "text.jpg")
    bump_mtime(photos / "text.jpg")
    fixed = idx.sync(photos, num_workers=0)
    assert fixed.added == 1 and len(idx.errors()) == 2

    # The CLI writes the report with every unreadable file and prints them.
    assert (
        run_cli(["index", str(photos), "--index", str(tmp_path / "idx"), "--no-progress"], monkeypatch) == 0
    )
    saved = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert sorted(os.path.basename(e["path"]) for e in saved["errors"]) == ["empty.png", "truncated.png"]
    assert saved["count"] == 5


def test_query_image_in_index_comes_first(tmp_path, ckpt):
    paths = make_images(tmp_path / "photos", 10)
    idx = Index.open(tmp_path / "idx", model=ckpt)
    idx.add(paths, num_workers=0)
    for p in paths[:3]:
        top = idx.search_image(p, k=3)
        assert top[0].path == p and top[0].score == pytest.approx(1.0, abs=2e-3)
        assert top[0].score > top[1].score
    # Many queries in one batched call give the same answers as one by one (the model's numbers may differ
    # in the last bits with the batch size, so scores are compared to a tolerance).
    texts = ["a red square", "a photo of a dog", ""]
    pairs = [(idx.search_image(paths[:3], k=3), [idx.search_image(p, k=3) for p in paths[:3]])]
    pairs.append((idx.search_text(texts, k=4), [idx.search_text(t, k=4) for t in texts]))
    for batched, single in pairs:
        assert [[h.path for h in hits] for hits in batched] == [[h.path for h in hits] for hits in single]
        got = [h.score for hits in batched for h in hits]
        assert got == pytest.approx([h.score for hits in single for h in hits], abs=1e-5)


def brute_force(vectors16, queries, k):
    scores = vectors16.astype(np.float64) @ queries.astype(np.float64).T  # [N, Q]
    out = []
    for q in range(queries.shape[0]):
        order = np.lexsort((np.arange(len(vectors16)), -scores[:, q]))[:k]
        out.append((order, scores[order, q]))
    return out


@pytest.mark.parametrize("n_queries", [1, 3, 9])
def test_exact_search_matches_brute_force(n_queries):
    rng = np.random.default_rng(n_queries)
    vecs = rng.standard_normal((5000, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs16 = vecs.astype(np.float16)
    vecs16[100] = vecs16[4000]  # exact duplicates tie: the lower row (path) must come first
    vecs16[2500] = vecs16[4000]
    queries = rng.standard_normal((n_queries, 64)).astype(np.float32)
    queries[0] = vecs16[4000].astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = search_exact(torch.from_numpy(vecs16), torch.from_numpy(queries), 25)
    for (rows, scores), (ref_rows, ref_scores) in zip(got, brute_force(vecs16, queries, 25), strict=True):
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-12)
    assert list(got[0][0][:3]) == [100, 2500, 4000]


def test_ties_are_ordered_by_path(tmp_path, ckpt):
    photos = tmp_path / "photos"
    src = make_images(tmp_path / "src", 2)
    for name in ("c.png", "a.png", "b.png"):  # identical bytes, three paths
        photos.mkdir(exist_ok=True)
        shutil.copy(src[0], photos / name)
    shutil.copy(src[1], photos / "z.png")
    idx = Index.open(tmp_path / "idx", model=ckpt)
    idx.sync(photos, batch_size=2, num_workers=0)
    hits = idx.search_image(src[0], k=4)
    assert [os.path.basename(h.path) for h in hits[:3]] == ["a.png", "b.png", "c.png"]
    assert hits[0].score == hits[1].score == hits[2].score
    assert idx.search_image(src[0], k=2) == hits[:2]


def test_model_mismatch_is_refused(tmp_path, ckpt):
    photos = tmp_path / "photos"
    make_images(photos, 3)
    Index.open(tmp_path / "idx", model=ckpt).sync(photos, num_workers=0)
    other = write_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ModelMismatchError, match="cannot be mixed"):
        Index.open(tmp_path / "idx", model=other)
    # The same weights in fp16 have the same identity; other preprocessing does not.
    from clip.loading import load
    from clip.preprocess import image_transform

    model, preprocess = load(ckpt)
    ident = model_identity(model, preprocess)
    assert model_identity(model.half(), preprocess) == ident
    assert model_identity(model, image_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))) != ident
    with pytest.raises(ModelMismatchError):
        Index.open(tmp_path / "idx", model=Encoder(model.float(), image_transform(40)))
    # Opening without a model uses (and checks) the recorded one.
    assert len(Index.open(tmp_path / "idx").search_text("x", k=2)) == 2


def test_cli_index_and_search(tmp_path, ckpt, monkeypatch, capsys):
    photos = tmp_path / "photos"
    paths = make_images(photos, 6)
    idx_dir = str(tmp_path / "idx")
    assert run_cli(["index", str(photos), "--index", idx_dir, "--no-progress"], monkeypatch) == 2
    assert "--model" in capsys.readouterr().err
    argv = ["index", str(photos), "--index", idx_dir, "--model", ckpt, "--no-progress", "--workers", "1"]
    assert run_cli(argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "embedded 6 new" in out and "images/s" in out and "holds 6 images" in out

    assert run_cli(["search", idx_dir, "a dog on a beach", "-k", "3"], monkeypatch) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in paths for line in lines)
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)

    assert run_cli(["search", idx_dir, "--image", paths[2], "-k", "2", "--json"], monkeypatch) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["query"] == paths[2] and record["results"][0]["path"] == paths[2]
    assert record["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)

    assert run_cli(["search", idx_dir], monkeypatch) == 2
    assert run_cli(["search", str(tmp_path / "nothing"), "x"], monkeypatch) == 2
    assert "no index" in capsys.readouterr().err
    # --model points at the index's model where it lives now; it never creates an index.
    moved = shutil.copy(ckpt, tmp_path / "moved.pt")
    assert run_cli(["search", idx_dir, "x", "-k", "1", "--model", str(moved)], monkeypatch) == 0
    assert run_cli(["search", str(tmp_path / "nothing"), "x", "--model", str(moved)], monkeypatch) == 2
    assert not (tmp_path / "nothing").exists()


def test_formats_and_exif_orientation(tmp_path, ckpt):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    base, upright, first = (
        Image.fromarray(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)).resize((48, 24), Image.NEAREST)
        for _ in range(3)
    )
    for ext in ("jpeg", "webp", "bmp", "tiff"):
        base.save(photos / f"pic.{ext}")
    first.save(photos / "anim.gif", save_all=True, append_images=[Image.new("RGB", (48, 24), (0, 0, 255))])
    # Stored sideways with the EXIF tag "rotate 90 degrees clockwise to display" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(photos / "rotated.png", exif=exif)
    idx = Index.open(tmp_path / "idx", model=ckpt)
    report = idx.sync(photos, num_workers=0)
    assert report.added == 6 and not report.failed
    info = idx.file_info(str(photos / "rotated.png"))
    assert (info.width, info.height) == (48, 24)  # upright size
    top = idx.search_image(upright, k=1)[0]
    assert top.path == str(photos / "rotated.png") and top.score > 0.999
    # A GIF is read as its first frame.
    with Image.open(photos / "anim.gif") as gif:
        first_frame = gif.convert("RGB")
    top = idx.search_image(first_frame, k=1)[0]
    assert top.path == str(photos / "anim.gif") and top.score > 0.999
