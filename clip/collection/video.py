"""Video inputs of `clip embed`: one frame every `frame_interval` seconds, decoded lazily with PyAV.

A video is decoded front to back (seeking costs a keyframe interval per frame at 1 fps) and only the frames
kept are converted to images, one at a time, so memory stays at one decoded frame plus the batch being
built, whatever the video's length. The frame kept for time t is the first frame shown at or after t
(t = 0, interval, 2 * interval, ...); its own presentation time is the one stored. A video that cannot be
opened, or breaks off mid-stream, yields the frames read so far and one message naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from PIL import Image

from clip.files import VIDEO_EXTENSIONS, is_video_name  # noqa: F401  (the one definition; re-exported)

AV_EXTRA = "pip install 'clipforge[embed]'"


def walk_videos(root: str) -> list[str]:
    """Absolute paths of the video files under `root`, with `clip.search.scan.walk_images`' rules (recursive,
    sorted, hidden folders and files skipped, symlinked folders not followed)."""
    found = []
    for folder, dirs, files in os.walk(os.path.abspath(root)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, f) for f in files if is_video_name(f) and not f.startswith("."))
    return sorted(found)


@dataclass(frozen=True)
class VideoOptions:
    """How videos are sampled: a frame every `frame_interval` seconds, at most `max_frames` per video."""

    frame_interval: float = 1.0
    max_frames: int = 10_000

    def __post_init__(self) -> None:
        if not self.frame_interval > 0:
            raise ValueError(
                f"--frame-interval must be a positive number of seconds, got {self.frame_interval}"
            )
        if self.max_frames < 1:
            raise ValueError(f"--max-frames-per-video must be at least 1, got {self.max_frames}")


@dataclass(frozen=True)
class Frame:
    """One kept frame: its presentation time in seconds and the RGB image."""

    time: float
    image: Image.Image


def _frame_time(frame, stream, index: int) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    rate = stream.average_rate or Fraction(25)  # no timestamps at all: count frames at the stream's rate
    return float(index / rate)


def read_frames(path: str, options: VideoOptions) -> Iterator[Frame | str]:
    """The kept frames of the video at `path`, decoded lazily; a problem ends the stream with one message.

    Never raises for a bad file: an unreadable or corrupt video yields a message (str) naming it, after the
    frames decoded before the damage. More than `options.max_frames` frames: a message says where it stopped.
    """
    try:
        import av
    except ImportError:
        yield f"video {path!r} needs PyAV, which is not installed: {AV_EXTRA}"
        return
    kept, next_time = 0, 0.0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                yield f"video {path!r}: the file holds no video stream"
                return
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding is most of a video job's work
            for index, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, stream, index)
                if t + 1e-6 < next_time:
                    continue
                if kept == options.max_frames:
                    yield (f"video {path!r}: stopped after {kept} frames at {t:.3f} s "
                           "(raise --max-frames-per-video to embed more)")  # fmt: skip
                    return
                yield Frame(t, frame.to_image())
                kept += 1
                # The next kept frame is the first at or after the next multiple of the interval.
                next_time = (int((t + 1e-6) / options.frame_interval) + 1) * options.frame_interval
    except Exception as err:  # noqa: BLE001 - FFmpeg reports damage through many error types
        where = f" after {kept} frames" if kept else ""
        yield f"cannot decode video {path!r}{where}: {type(err).__name__}: {err}"
        return
    if kept == 0:
        yield f"video {path!r}: no frame could be decoded"
