"""`clip embed` on videos: a frame every --frame-interval seconds, stored with its time; an image query finds
the right timestamps; corrupt or truncated videos are skipped and reported without stopping the job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from clip.cli import main
from clip.collection import shards
from clip.collection.video import VideoOptions, read_frames

av = pytest.importorskip("av")
pytest.importorskip("pyarrow")

FPS = 10
# (colour, start s, end s): the video shows each colour over [start, end)
SCENES = [((220, 30, 30), 0.0, 1.5), ((30, 200, 40), 1.5, 3.0), ((40, 50, 230), 3.0, 4.0)]


def write_video(path: Path, scenes=SCENES, size: int = 64) -> None:
    """A video of solid-colour scenes at FPS frames a second (MPEG-4 part 2: in every FFmpeg build)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour, start, end in scenes:
            for _ in range(round((end - start) * FPS)):
                img = np.full((size, size, 3), colour, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def colour_at(t: float) -> int:
    return next(i for i, (_, start, end) in enumerate(SCENES) if start <= t < end)


def embed(args: list[str]) -> dict:
    assert main(["embed", *args, "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / "report.json").read_text())


def test_image_query_finds_the_right_timestamps(tmp_path, tiny_checkpoint, one_thread):
    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "clip.mp4")
    (folder / "clip.txt").write_text("three coloured scenes")
    Image.new("RGB", (48, 40), (128, 128, 128)).save(folder / "still.png")
    out = tmp_path / "out"
    report = embed(
        [str(folder), "--model", str(tiny_checkpoint), "--output", str(out), "--frame-interval", "0.5"]
    )
    assert report["complete"] and report["skipped"] == 0
    meta = shards.load_metadata(out).to_pydict()
    frames = [i for i, v in enumerate(meta["video"]) if v is not None]
    times = [meta["frame_time"][i] for i in frames]
    assert times == pytest.approx([0.5 * k for k in range(8)], abs=1e-6)  # 4 s at one frame per 0.5 s
    assert [meta["key"][i] for i in frames] == [f"clip.mp4#t={t:.3f}" for t in times]
    assert {meta["video"][i] for i in frames} == {str(folder / "clip.mp4")}
    assert {meta["caption"][i] for i in frames} == {"three coloured scenes"}
    assert {(meta["width"][i], meta["height"][i]) for i in frames} == {(64, 64)}
    still = meta["key"].index("still.png")
    assert meta["frame_time"][still] is None and meta["video"][still] is None

    # Query: a still image of each scene's colour, embedded directly; each frame's best query is its scene's.
    model, preprocess = clip.load(str(tiny_checkpoint), device="cpu")
    queries = torch.stack([preprocess(Image.new("RGB", (64, 64), c)) for c, _, _ in SCENES])
    with torch.no_grad():
        q = F.normalize(model.encode_image(queries), dim=-1).numpy()
    emb = shards.load_embeddings(out).astype(np.float32)[frames]
    sims = emb @ q.T  # [frames, scenes]
    assert [int(k) for k in sims.argmax(1)] == [colour_at(t) for t in times]
    for scene in range(len(SCENES)):  # and the top hits of a query are that scene's timestamps
        hits = sorted(np.argsort(-sims[:, scene])[: sum(colour_at(t) == scene for t in times)])
        assert all(colour_at(times[h]) == scene for h in hits)


def test_bad_videos_are_skipped_and_reported(tmp_path, tiny_checkpoint, one_thread):
    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "a_good.mp4")
    (folder / "b_garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    whole = (folder / "a_good.mp4").read_bytes()
    (folder / "c_truncated.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) is lost
    write_video(tmp_path / "d.mkv")  # Matroska: cut mid-stream, the frames before the cut still decode
    mkv = (tmp_path / "d.mkv").read_bytes()
    (folder / "d_cut.mkv").write_bytes(mkv[: int(len(mkv) * 0.6)])
    (folder / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "f.png")
    out = tmp_path / "out"
    report = embed([str(folder), "--model", str(tiny_checkpoint), "--output", str(out), "--shard-size", "2"])
    assert report["complete"]
    keys = shards.load_metadata(out).column("key").to_pylist()
    good = [k for k in keys if k.startswith("a_good.mp4#t=")]
    assert len(good) == 4 and "f.png" in keys
    cut = [k for k in keys if k.startswith("d_cut.mkv#t=")]
    assert 1 <= len(cut) < 4  # frames before the damage are kept
    errors = {e["key"]: e["error"] for e in report["errors"]}
    assert "b_garbage.mp4" in errors and "c_truncated.mp4" in errors and "e.png" in errors
    assert all(
        k in errors[k] or k in errors[k].replace("\\", "/") for k in ("b_garbage.mp4", "c_truncated.mp4")
    )
    assert report["embedded"] == len(keys)


def test_sampling_is_lazy_and_bounded(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path)
    frames = read_frames(str(path), VideoOptions(frame_interval=1.0, max_frames=3))
    first = next(frames)  # a generator: one frame decoded and handed over, not the whole video
    assert first.time == 0.0 and first.image.size == (64, 64)
    rest = list(frames)
    assert [f.time for f in rest[:-1]] == [1.0, 2.0] and "stopped after 3 frames" in rest[-1]
    # The colour of each kept frame is the scene's (decoding is right, not just counting).
    every = [f for f in read_frames(str(path), VideoOptions(0.25)) if not isinstance(f, str)]
    assert len(every) == 16
    for f in every:
        pixel = np.asarray(f.image)[32, 32].astype(int)
        assert np.abs(pixel - np.array(SCENES[colour_at(f.time)][0])).max() < 20


def test_video_units_do_not_change_the_vectors(tmp_path, tiny_checkpoint, one_thread):
    """A video is a unit of its own, cut into chunks of --shard-size frames: any shard size, same rows."""
    folder = tmp_path / "media"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / name)
    write_video(folder / "b.mp4")
    common = [str(folder), "--model", str(tiny_checkpoint), "--frame-interval", "0.5"]
    embed([*common, "--output", str(tmp_path / "small"), "--shard-size", "3"])
    embed([*common, "--output", str(tmp_path / "large"), "--shard-size", "100"])
    assert (
        len(shards.complete_chunks(tmp_path / "small")) == 5
    )  # a.png | b.mp4 in 3 chunks of 3, 3, 2 | c.png
    small, large = shards.load_metadata(tmp_path / "small"), shards.load_metadata(tmp_path / "large")
    assert small.column("key").to_pylist() == large.column("key").to_pylist()
    np.testing.assert_array_equal(
        shards.load_embeddings(tmp_path / "small"), shards.load_embeddings(tmp_path / "large")
    )
    job = shards.read_job(tmp_path / "small")
    assert job["input"]["video"] == {"frame_interval": 0.5, "max_frames": 10_000}


def test_bad_video_options_say_what_to_do(tmp_path, tiny_checkpoint, capsys):
    code = main(["embed", str(tmp_path), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"),
                 "--frame-interval", "0"])  # fmt: skip
    assert code == 2
    assert "--frame-interval must be a positive number of seconds" in capsys.readouterr().err


def test_index_from_embeddings_gives_file_and_time_hits(tmp_path, tiny_checkpoint, one_thread):
    """`clip index --from-embeddings` on a job with videos: a hit on a frame is (the video, its time)."""
    from clip.search.index import Index

    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "clip.mp4")
    Image.new("RGB", (48, 40), (128, 128, 128)).save(folder / "still.png")
    out = tmp_path / "out"
    embed([str(folder), "--model", str(tiny_checkpoint), "--output", str(out), "--frame-interval", "0.5"])
    assert main(["index", "--from-embeddings", str(out), "--index", str(tmp_path / "idx")]) == 0
    with Index.open(tmp_path / "idx") as idx:
        for scene, (colour, _, _) in enumerate(SCENES):
            query = tmp_path / f"q{scene}.png"
            Image.new("RGB", (64, 64), colour).save(query)
            top = idx.search_image(query, k=2)
            assert all(h.path == str(folder / "clip.mp4") and h.time is not None for h in top)
            assert all(colour_at(h.time) == scene for h in top)
            assert top[0].to_dict()["time"] == pytest.approx(top[0].time)
        still = [h for h in idx.search_image(folder / "still.png", k=12) if h.path.endswith("still.png")]
        assert len(still) == 1 and still[0].time is None
