"""What keeps `clip serve` from sending what it should not: the file checks, the Host check, the headers.

- A file is sent only if it is still the file that was indexed: its path, with links resolved *now*, lies
  inside a folder the index was filled from; it is a regular file of the indexed size and mtime; and, for the
  original, its bytes hash to the indexed SHA-256 and are an image of a known type (the Content-Type comes
  from those bytes, not from the name).  An index built from `clip embed` shards never read the bytes: its
  records carry the size and mtime seen when it was built (`FileRecord.content_hashed` False), and those, the
  folders and the image check are what is verified.  A link re-pointed at `/etc/shadow`, or an image overwritten by
  something else, gets a 404 until `clip index` has seen the change.
- A video is checked the same way except for its bytes: `open_video` verifies the folders, the size and mtime on
  the open descriptor, and the container's signature (MP4/QuickTime, Matroska/WebM, AVI, MPEG, ASF, FLV), which
  also gives its Content-Type.  Not its SHA-256 (a browser seeking sends a Range request per seek, and hashing a
  multi-GB file for each is out of the question) and not a PyAV probe (each request would run FFmpeg's demuxers
  over the file inside the server, for milliseconds to seconds): the size and mtime already tie the bytes to
  what `clip index` decoded, and the 64-byte signature catches a file replaced by something that is no video.
- Host allow-list against DNS rebinding: a page on an attacker's domain that resolves to 127.0.0.1 sends its
  own name in `Host:`, so requests are answered only for IP literals, `localhost`, the bound name and names
  added with `--allowed-host`.
- Every response forbids framing (`X-Frame-Options`, CSP `frame-ancestors`), sniffing and cross-origin
  embedding (`Cross-Origin-Resource-Policy`).
- Slow clients: a connection that has not sent complete request headers within `header_timeout` seconds
  is closed (uvicorn's own timeout only starts once a request is complete, and data keeps resetting it).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from PIL import Image

from clip.search.scan import relative_to
from clip.search.store import FileRecord

# Image formats `clip index` reads, and the Content-Type each is sent with.
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "MPO": "image/jpeg",  # multi-picture JPEG (phone cameras): a JPEG to browsers
}
WILDCARD_BINDS = {"0.0.0.0", "::", ""}


class FileChangedError(ValueError):
    """The indexed path no longer leads to the indexed file (moved link, new content, deleted)."""


def _inside_roots(path: str, roots: Iterable[str]) -> str:
    """The real path of `path` if it lies inside one of `roots` (real paths), else FileChangedError."""
    real = os.path.realpath(path)
    if not any(real == r or relative_to(real, r) for r in roots):
        raise FileChangedError("indexed file now resolves outside the indexed folders")
    return real


def _default_roots(info: FileRecord) -> list[str]:
    """For an index that recorded no roots: the real path of the file's own folder."""
    return [os.path.realpath(os.path.dirname(info.path))]


def check_unchanged(info: FileRecord, roots: list[str]) -> str:
    """The real path of the indexed file if it is still there unchanged (size and mtime), else
    FileChangedError.  Cheap (no read): used before serving a cached thumbnail."""
    real = _inside_roots(info.path, roots or _default_roots(info))
    try:
        st = os.stat(real)
    except OSError:
        raise FileChangedError("indexed file is no longer there") from None
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (info.size, info.mtime_ns):
        raise FileChangedError("indexed file changed since it was indexed; run `clip index` again")
    return real


def _open_unchanged(info: FileRecord, roots: list[str]) -> int:
    """An open descriptor of the indexed file: opened without following a link in its last component (the
    resolved path was checked), the descriptor itself checked for the indexed size and mtime. The caller closes it."""
    real = check_unchanged(info, roots)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise FileChangedError("indexed file is no longer readable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (info.size, info.mtime_ns):
        os.close(fd)
        raise FileChangedError("indexed file changed since it was indexed; run `clip index` again")
    return fd


def read_verified(info: FileRecord, roots: list[str]) -> tuple[bytes, str]:
    """(bytes, media type) of the indexed file, only if they are exactly what was indexed: the descriptor of
    `_open_unchanged`, then the bytes checked for the indexed SHA-256 and for an image header."""
    with os.fdopen(_open_unchanged(info, roots), "rb") as f:
        data = f.read(info.size + 1)
    if len(data) != info.size or (info.content_hashed and hashlib.sha256(data).hexdigest() != info.sha256):
        raise FileChangedError("indexed file's content changed since it was indexed; run `clip index` again")
    try:
        with Image.open(io.BytesIO(data)) as img:
            media_type = MEDIA_TYPES.get(img.format or "")
    except Exception:  # noqa: BLE001 - Pillow signals a non-image with many exception types
        media_type = None
    if media_type is None:
        raise FileChangedError("indexed file is not an image of a known type")
    return data, media_type


# ISO base media brands / boxes that open an MP4 or QuickTime file (an old QuickTime file has no ftyp box).
_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}
_ASF = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def video_media_type(head: bytes) -> str | None:
    """The Content-Type of a video container from its first 64 bytes, or None if it is not one."""
    if head[4:8] in _BMFF_BOXES:
        return "video/quicktime" if head[4:8] != b"ftyp" or head[8:12] == b"qt  " else "video/mp4"
    if head[:4] == b"\x1aE\xdf\xa3":  # EBML: Matroska, or WebM by its DocType
        return "video/webm" if b"webm" in head else "video/x-matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):  # MPEG program stream, MPEG video
        return "video/mpeg"
    if head[:16] == _ASF:
        return "video/x-ms-wmv"
    if head[:3] == b"FLV":
        return "video/x-flv"
    return None


def open_video(info: FileRecord, roots: list[str]) -> tuple[int, str]:
    """(open descriptor, media type) of the indexed video `info`, only while it is still the indexed file:
    inside the indexed folders, the indexed size and mtime, a video container's signature.  The caller closes
    the descriptor."""
    fd = _open_unchanged(info, roots)
    try:
        media_type = video_media_type(os.pread(fd, 64, 0))
        if media_type is None:
            raise FileChangedError("indexed file is not a video container of a known type")
    except BaseException:
        os.close(fd)
        raise
    return fd, media_type


# ------------------------------------------------------------------------------------------- host check


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names (lower case, no port) a request may name, besides IP literals, which are always allowed
    (a rebinding page can only send its own domain name).  "*" in `extra` allows every name."""
    names = {"localhost"}
    if bind_host in WILDCARD_BINDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    elif not _is_ip(bind_host):
        names.add(bind_host.lower())
    names |= {h.lower().rstrip(".") for h in extra}
    return frozenset(n for n in names if n)


def host_of(header: str) -> str:
    """The host part of a Host header value ("[::1]:8000" -> "[::1]", "Example.com.:80" -> "example.com")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    if header is None:
        return True  # HTTP/1.0 without Host: not a browser, so not a rebinding page
    host = host_of(header)
    return "*" in names or host in names or _is_ip(host)


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
FRAME_CSP = "frame-ancestors 'none'"
SAFETY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class GuardMiddleware:
    """ASGI middleware: refuse disallowed Host headers (400 with a message), add the safety headers."""

    def __init__(self, app: ASGIApp, allowed_names: frozenset[str]) -> None:
        self.app = app
        self.allowed_names = allowed_names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if not host_allowed(host, self.allowed_names):
            shown = host_of(host or "")[:100]
            message = (
                f"host {shown!r} is not allowed (a protection against DNS rebinding); if that is this "
                f"server's name, start it with `clip serve ... --allowed-host {shown}`"
            )
            await _send_json(send, 400, {"error": message})
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_safety_headers(message.get("headers", []))}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _with_safety_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() not in {name for name, _ in SAFETY_HEADERS}]
    csp = [i for i, (k, _) in enumerate(out) if k.lower() == b"content-security-policy"]
    if csp:
        k, v = out[csp[0]]
        if b"frame-ancestors" not in v:
            out[csp[0]] = (k, v + b"; " + FRAME_CSP.encode())
    else:
        out.append((b"content-security-policy", FRAME_CSP.encode()))
    return out + SAFETY_HEADERS


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(b"cache-control", b"no-store"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": _with_safety_headers(headers)})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------------ slow clients


def timed_h11_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request's headers within
    `header_timeout` seconds of connecting or of its previous response (a slow-loris client)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting_for = self.cycle  # the deadline is met once a new request cycle starts

            def expire() -> None:
                idle = waiting_for is None or waiting_for.response_complete  # not answering a pipelined one
                if self.cycle is waiting_for and idle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(header_timeout, expire)

    return TimedH11Protocol
