"""Videos in `clip serve`: the bytes with HTTP Range support, and a thumbnail of the frame at a hit's time.

Browsers play a `<video>` by Range requests and can seek only if the server answers them with 206 Partial
Content (`Content-Range: bytes START-END/SIZE`).  One range per request is served (what browsers send); a
request for several ranges, or a malformed one, gets the whole file (200), which RFC 9110 allows; a range
starting past the end gets 416.  The bytes are read from the descriptor that `clip.search.guard.open_video`
checked, so a file swapped after the check is never sent.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import AsyncIterator

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from clip.search.store import FileRecord

CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(ValueError):
    """A Range that starts past the end of the file (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single `Range: bytes=...` header, or None to send the whole file."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None  # several ranges, another unit, or malformed: the whole file
    if not m[1]:  # bytes=-N: the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if first >= size:
        raise RangeNotSatisfiable(header)
    if last < first:
        return None
    return first, min(last, size - 1)


def etag(info: FileRecord) -> str:
    return f'"{info.sha256[:16]}-{info.size}-{info.mtime_ns}"'


def video_response(fd: int, info: FileRecord, media_type: str, range_header: str | None,
                   if_range: str | None) -> Response:  # fmt: skip
    """The response for GET /api/video: all of the file (200) or one range (206), streamed from `fd` (closed
    when the body is done), or 416.  `If-Range` naming another version of the file asks for all of it."""
    size = info.size
    headers = {"Accept-Ranges": "bytes", "ETag": etag(info), "Cache-Control": "private, max-age=3600"}
    if if_range is not None and if_range.strip() != etag(info):
        range_header = None
    try:
        span = parse_range(range_header, size)
    except RangeNotSatisfiable:
        os.close(fd)
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = span if span is not None else (0, size - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        _read(fd, first, last + 1), status_code=206 if span else 200, media_type=media_type, headers=headers
    )


async def _read(fd: int, start: int, stop: int) -> AsyncIterator[bytes]:
    try:
        pos = start
        while pos < stop:
            data = await run_in_threadpool(os.pread, fd, min(CHUNK, stop - pos), pos)
            if not data:
                break  # truncated since the check: send no more than is there
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def frame_at(fd: int, t: float) -> Image.Image:
    """The frame shown at time `t` (seconds) of the video open at `fd` (not closed here): the first frame at or
    after `t`, as `clip index` chose it, decoded from the keyframe before `t`."""
    import av

    with os.fdopen(os.dup(fd), "rb") as f, av.open(f) as container:
        stream = container.streams.video[0]
        if t > 0 and stream.time_base:
            container.seek(int(t / stream.time_base), stream=stream, backward=True)
        shown = None
        for frame in container.decode(stream):
            shown = frame
            if frame.time is None or frame.time + 1e-6 >= t:
                break
        if shown is None:
            raise ValueError("no frame could be decoded")
        return shown.to_image()


def frame_thumbnail(fd: int, t: float, size: int) -> bytes:
    """JPEG bytes of the frame at `t`, longest side `size`."""
    img = frame_at(fd, t)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()
