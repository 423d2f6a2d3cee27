"""`clip index` on a folder with videos: a frame every --frame-interval seconds, each a hit (file, time); an
image query finds the right video and timestamps, through `Index.search_image` and `clip search`; a corrupt
video is one line and the rest of the folder is indexed; an index made before videos still opens and works."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip.cli import main
from clip.search.index import Index
from clip.search.store import DB_NAME

av = pytest.importorskip("av")
from test_embed_video import write_video  # noqa: E402 - one video writer for the video tests

INTERVAL = 0.5
RED, GREEN, BLUE, YELLOW, MAGENTA = (
    (220, 30, 30),
    (30, 200, 40),
    (40, 50, 230),
    (230, 220, 30),
    (200, 40, 200),
)
# (colour, start s, end s): each video shows each colour over [start, end)
VIDEOS = {
    "clips/a.mp4": [(RED, 0.0, 1.5), (GREEN, 1.5, 3.0), (BLUE, 3.0, 4.0)],
    "clips/b.mp4": [(YELLOW, 0.0, 2.0), (MAGENTA, 2.0, 3.0)],
}


def expected_frames(colour, interval: float = INTERVAL) -> set[tuple[str, float]]:
    """(relative path, time) of every kept frame showing `colour`."""
    out = set()
    for name, scenes in VIDEOS.items():
        end = scenes[-1][2]
        for k in range(int(end / interval + 1e-9) + (0 if (end / interval).is_integer() else 1)):
            t = k * interval
            if any(c == colour and s <= t < e for c, s, e in scenes):
                out.add((name, round(t, 3)))
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(tmp, media folder, checkpoint, index) : two videos, two images and a corrupt video, indexed."""
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    tmp = tmp_path_factory.mktemp("video")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    folder = tmp / "media"
    for name, scenes in VIDEOS.items():
        write_video(folder / name, scenes)
    Image.new("RGB", (48, 40), (128, 128, 128)).save(folder / "grey.png")
    Image.new("RGB", (40, 48), (20, 200, 220)).save(folder / "cyan.jpg")
    (folder / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    return tmp, folder, tmp / "tiny.pt"


@pytest.fixture(scope="module")
def indexed(media):
    from clip.collection.video import VideoOptions

    tmp, folder, ckpt = media
    idx = Index.open(tmp / "idx", model=str(ckpt))
    report = idx.sync(folder, num_workers=2, video=VideoOptions(frame_interval=INTERVAL))
    yield idx, report
    idx.close()


def rel(folder: Path, path: str) -> str:
    return os.path.relpath(path, folder)


@pytest.mark.parametrize("colour", [RED, GREEN, BLUE, YELLOW, MAGENTA])
def test_image_query_finds_the_file_and_timestamps(media, indexed, colour):
    _, folder, _ = media
    idx, _ = indexed
    want = expected_frames(colour)
    hits = idx.search_image(Image.new("RGB", (64, 64), colour), k=len(idx))
    top = hits[: len(want)]
    # Every frame of that colour, each a hit of its own (one video, several times), ahead of everything else.
    assert {(rel(folder, h.path), round(h.time, 3)) for h in top} == want
    assert min(h.score for h in top) > 0.99 > hits[len(want)].score
    assert len({h.time for h in top}) == len(top)
    assert all(h.label == f"{h.path}#t={h.time:.3f}" for h in top)
    images = [h for h in hits if h.time is None]
    assert sorted(rel(folder, h.path) for h in images) == ["cyan.jpg", "grey.png"]


def test_report_counts_frames_and_names_the_corrupt_video(media, indexed):
    _, folder, _ = media
    idx, report = indexed
    n_frames = 8 + 6  # a.mp4: 4 s, b.mp4: 3 s, a frame every 0.5 s
    assert report.frames == n_frames and report.added == 4 and len(idx) == n_frames + 2
    broken = str(folder / "clips" / "broken.mp4")
    assert [p for p, _ in report.failed] == [broken] and broken in report.failed[0][1]
    assert idx.errors()[0][0] == broken
    frame = idx.search_image(Image.new("RGB", (64, 64), BLUE), k=1)[0]
    assert idx.metadata([frame.id]) == [{"path": frame.path, "width": 64, "height": 64, "time": frame.time}]
    info = idx.file_info(str(folder / "clips" / "a.mp4"))
    assert info.is_video and (info.width, info.height) == (64, 64)
    assert idx.file_info(str(folder / "grey.png")).time is None


def test_cli_index_and_search_print_file_and_time(media, tmp_path, capsys):
    _, folder, ckpt = media
    out_idx = tmp_path / "idx"
    args = ["index", str(folder), "--index", str(out_idx), "--model", str(ckpt), "--workers", "0"]
    assert main([*args, "--no-progress", "--frame-interval", str(INTERVAL)]) == 0
    out = capsys.readouterr().out
    assert "embedded 4 new" in out and "(14 video frames among them)" in out
    broken = [line for line in out.splitlines() if "broken.mp4" in line]
    assert len(broken) == 1 and "cannot decode video" in broken[0]

    query = tmp_path / "green.png"
    Image.new("RGB", (64, 64), GREEN).save(query)
    assert main(["search", str(out_idx), "--image", str(query), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    a = folder / "clips" / "a.mp4"
    assert [line.split("\t")[0] for line in lines] == [f"{a}#t={t:.3f}" for t in (1.5, 2.0, 2.5)]
    assert all(float(line.split("\t")[1]) > 0.99 for line in lines)
    assert main(["search", str(out_idx), "--image", str(query), "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["path"], r["time"]) for r in results] == [(str(a), t) for t in (1.5, 2.0, 2.5)]

    # Unchanged: nothing embedded again. Another --frame-interval: the videos are sampled again, images kept.
    assert main([*args, "--no-progress", "--frame-interval", str(INTERVAL)]) == 0
    assert "embedded 0 new and 0 changed" in capsys.readouterr().out
    assert main([*args, "--no-progress", "--frame-interval", "1"]) == 0
    assert "embedded 0 new and 2 changed" in capsys.readouterr().out
    with Index.open(out_idx) as idx:
        assert len(idx) == 4 + 3 + 2
        assert {h.time for h in idx.search_image(query, k=9) if h.path == str(a)} == {0.0, 1.0, 2.0, 3.0}
    assert main([*args[:-2], "--workers", "0", "--no-progress", "--frame-interval", "0"]) == 2
    assert "--frame-interval must be a positive number" in capsys.readouterr().err


def make_old_index(idx_dir: Path) -> None:
    """Rewrite an index's files table as it was before videos: keyed by path, no time column."""
    con = sqlite3.connect(idx_dir / DB_NAME)
    with con:
        con.execute(
            "CREATE TABLE old (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
            "sha256 TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, vec_id INTEGER NOT NULL "
            "UNIQUE, shard INTEGER NOT NULL, row INTEGER NOT NULL)"
        )
        con.execute(
            "INSERT INTO old SELECT path, size, mtime_ns, sha256, width, height, vec_id, shard, row FROM files"
        )
        con.execute("DROP TABLE files")
        con.execute("ALTER TABLE old RENAME TO files")
        con.execute("CREATE INDEX files_shard ON files (shard)")
    con.close()


@contextlib.contextmanager
def read_only(folder: Path):
    """Read-only for this process: mode bits, and for root (who ignores them) the immutable attribute."""
    items = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode for p in items}
    try:
        for p in items:
            p.chmod(modes[p] & ~0o222)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", *map(str, items)], check=True)
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", *map(str, items)], check=True)
        for p in items:
            p.chmod(modes[p])


def test_index_made_before_videos_opens_searches_and_migrates(media, tmp_path):
    _, _, ckpt = media
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, c in enumerate([RED, GREEN, BLUE]):
        Image.new("RGB", (40, 40), c).save(photos / f"p{i}.png")
    with Index.open(tmp_path / "idx", model=str(ckpt)) as idx:
        idx.sync(photos, num_workers=0)
        before = idx.search_image(photos / "p1.png", k=3)
    make_old_index(tmp_path / "idx")
    with read_only(tmp_path / "idx"), Index.open(tmp_path / "idx") as idx:  # cannot migrate: read as images
        assert idx.search_image(photos / "p1.png", k=3) == before and before[0].time is None
        assert idx.file_info(str(photos / "p0.png")).time is None
    write_video(photos / "v.mp4", [(BLUE, 0.0, 2.0)])
    with Index.open(tmp_path / "idx") as idx:  # writable: migrated on open, then a video is added
        report = idx.sync(photos, num_workers=0)
        assert report.added == 1 and report.skipped == 3 and report.frames == 2
        hits = idx.search_image(photos / "p2.png", k=3)
        assert {(os.path.basename(h.path), h.time) for h in hits} == {
            ("p2.png", None),
            ("v.mp4", 0.0),
            ("v.mp4", 1.0),
        }
    con = sqlite3.connect(tmp_path / "idx" / DB_NAME)
    assert "time" in [r[1] for r in con.execute("PRAGMA table_info(files)")]
    con.close()
