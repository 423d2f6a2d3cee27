"""clip.hub against a local HTTP server on 127.0.0.1: no test reaches the internet.

The server serves tiny payloads under `/<sha256>/<file>`, honours `Range: bytes=N-` (unless told to ignore
it), can drop the connection halfway through a response, and logs every request so that tests can assert
how the client resumed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clip import hub
from clip.commands import download as download_command

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes: several reads, small enough to be instant
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
TINY = hub.PretrainedFile("tiny", "tiny.pt", PAYLOAD_SHA)


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    drop_next: int = 0  # how many upcoming responses send only half their body, then close
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, status)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState  # set on a per-server subclass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.state.files.get(self.path)
        range_header = self.headers.get("Range")
        if data is None:
            self._log(range_header, 404)
            self.send_error(404)
            return
        start = 0
        if range_header and not self.state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, f"client sent an unexpected Range header {range_header!r}"
            start = int(match.group(1))
            if start >= len(data):
                self._log(range_header, 416)
                self.send_error(416)
                return
        status = 206 if start else 200
        self._log(range_header, status)
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.state.drop_next:
            self.state.drop_next -= 1
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # the client sees EOF short of Content-Length
            return
        self.wfile.write(body)

    def _log(self, range_header: str | None, status: int) -> None:
        self.state.requests.append((self.path, range_header, status))

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@dataclass
class Server:
    url: str
    state: ServerState

    def serve(self, entry: hub.PretrainedFile, data: bytes) -> None:
        self.state.files[f"/{entry.sha256}/{entry.filename}"] = data


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv(hub.BASE_URL_ENV, url + "/")  # trailing slash must not double up
    monkeypatch.setattr(hub, "_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    srv = Server(url, state)
    srv.serve(TINY, PAYLOAD)
    yield srv
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_registry_lists_openai_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.available_models() == [
        "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px",
    ]  # fmt: skip
    for entry in hub.OPENAI_MODELS:
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry
        assert entry.filename == entry.name.replace("/", "-").replace("@", "-") + ".pt"
    assert len({e.sha256 for e in hub.OPENAI_MODELS}) == len(hub.OPENAI_MODELS)
    monkeypatch.delenv(hub.BASE_URL_ENV, raising=False)
    assert hub.model_url(hub.get_pretrained("ViT-B/32")) == (
        "https://openaipublic.azureedge.net/clip/models/"
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
    )
    # The variable is read at call time, not import time.
    monkeypatch.setenv(hub.BASE_URL_ENV, "http://mirror.example/clip/")
    assert hub.model_url(TINY) == f"http://mirror.example/clip/{PAYLOAD_SHA}/tiny.pt"


def test_download_verifies_and_caches(server: Server, tmp_path: Path) -> None:
    path = hub.download(TINY, root=tmp_path, progress=True)  # progress on: the tqdm path runs too
    assert path == tmp_path / "tiny.pt"
    assert path.read_bytes() == PAYLOAD
    assert _cache_files(tmp_path) == ["tiny.pt"]
    assert server.state.requests == [(f"/{PAYLOAD_SHA}/tiny.pt", None, 200)]
    # A verified cached file is returned without touching the network.
    assert hub.download(TINY, root=tmp_path, progress=False) == path
    assert len(server.state.requests) == 1


def test_download_by_name_uses_registry(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "OPENAI_MODELS", (TINY,))
    assert hub.download("tiny", root=str(tmp_path), progress=False).read_bytes() == PAYLOAD


def test_dropped_connection_is_resumed_with_range(server: Server, tmp_path: Path) -> None:
    server.state.drop_next = 1
    path = hub.download(TINY, root=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    half = len(PAYLOAD) // 2
    assert [(r, s) for _, r, s in server.state.requests] == [(None, 200), (f"bytes={half}-", 206)]
    assert _cache_files(tmp_path) == ["tiny.pt"]


def test_existing_partial_is_resumed(server: Server, tmp_path: Path) -> None:
    (tmp_path / "tiny.pt.partial").write_bytes(PAYLOAD[:30_000])
    assert hub.download(TINY, root=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [(r, s) for _, r, s in server.state.requests] == [("bytes=30000-", 206)]


def test_complete_partial_is_renamed_without_network(server: Server, tmp_path: Path) -> None:
    (tmp_path / "tiny.pt.partial").write_bytes(PAYLOAD)
    assert hub.download(TINY, root=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.state.requests == []


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.state.ignore_range = True
    # Garbage prefix: appending the 200 body to it would fail the hash, so only a restart passes.
    (tmp_path / "tiny.pt.partial").write_bytes(b"x" * 30_000)
    assert hub.download(TINY, root=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [(r, s) for _, r, s in server.state.requests] == [("bytes=30000-", 200)]
    assert _cache_files(tmp_path) == ["tiny.pt"]


def test_oversized_partial_restarts_after_416(server: Server, tmp_path: Path) -> None:
    (tmp_path / "tiny.pt.partial").write_bytes(PAYLOAD + b"junk")
    assert hub.download(TINY, root=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [s for _, _, s in server.state.requests] == [416, 200]


def test_wrong_checksum_raises_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    expected = hashlib.sha256(b"the real weights").hexdigest()
    wrong = hub.PretrainedFile("bad", "bad.pt", expected)
    server.serve(wrong, PAYLOAD)  # the server answers with other bytes than the registry promises
    with pytest.raises(RuntimeError) as info:
        hub.download(wrong, root=tmp_path, progress=False)
    message = str(info.value)
    assert f"{server.url}/{expected}/bad.pt" in message
    assert expected in message and PAYLOAD_SHA in message
    assert _cache_files(tmp_path) == []


def test_corrupted_cache_is_fetched_again(server: Server, tmp_path: Path) -> None:
    (tmp_path / "tiny.pt").write_bytes(PAYLOAD[:-1] + b"\x00")
    with pytest.warns(UserWarning, match="SHA256"):
        path = hub.download(TINY, root=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.state.requests) == 1


def test_repeated_drops_without_progress_give_up_and_keep_partial(server: Server, tmp_path: Path) -> None:
    server.state.ignore_range = True
    server.state.drop_next = 100  # every response dies at the same byte: no attempt gets further
    with pytest.raises(RuntimeError, match="run again to resume"):
        hub.download(TINY, root=tmp_path, progress=False)
    # The first attempt made progress (0 -> half); then 1 try + one per delay, each ending at the same byte.
    assert len(server.state.requests) == 1 + 1 + len(hub._RETRY_DELAYS_S)
    assert _cache_files(tmp_path) == ["tiny.pt.partial"]
    server.state.drop_next = 0
    assert hub.download(TINY, root=tmp_path, progress=False).read_bytes() == PAYLOAD


def test_http_404_names_url_and_fix(server: Server, tmp_path: Path) -> None:
    missing = hub.PretrainedFile("missing", "missing.pt", "0" * 64)
    with pytest.raises(RuntimeError, match="HTTP 404") as info:
        hub.download(missing, root=tmp_path, progress=False)
    assert f"{server.url}/{'0' * 64}/missing.pt" in str(info.value)
    assert str(tmp_path / "missing.pt") in str(info.value)


def test_offline_error_says_where_to_place_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(hub.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(RuntimeError) as info:
        hub.download(TINY, root=tmp_path, progress=False)
    message = str(info.value)
    assert "appears to be offline" in message
    assert f"http://127.0.0.1:{port}/{PAYLOAD_SHA}/tiny.pt" in message
    assert str(tmp_path / "tiny.pt") in message
    assert hub.BASE_URL_ENV in message
    assert not (tmp_path / "tiny.pt.partial").exists()


def test_file_url_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    (mirror / PAYLOAD_SHA).mkdir(parents=True)
    (mirror / PAYLOAD_SHA / "tiny.pt").write_bytes(PAYLOAD)
    monkeypatch.setenv(hub.BASE_URL_ENV, mirror.as_uri())
    assert hub.download(TINY, root=tmp_path / "cache", progress=False).read_bytes() == PAYLOAD


def test_unknown_name_lists_available_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ViT-B/32.*ViT-L/14@336px") as info:
        hub.download("ViT-B/31", root=tmp_path)
    assert "'ViT-B/31'" in str(info.value)
    assert _cache_files(tmp_path) == []


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip")
    download_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_download_prints_paths(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = hub.PretrainedFile("other", "other.pt", hashlib.sha256(b"other").hexdigest())
    server.serve(other, b"other")
    monkeypatch.setattr(hub, "OPENAI_MODELS", (TINY, other))
    args = _parse(["download", "all", "--root", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "tiny.pt"), str(tmp_path / "other.pt")]
    args = _parse(["download", "other", "--root", str(tmp_path)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "other.pt")]
    # A typo fails before anything is fetched, even when listed after a valid name.
    args = _parse(["download", "tiny", "nope", "--root", str(tmp_path / "fresh")])
    with pytest.raises(ValueError, match="nope"):
        args.func(args)
    assert not (tmp_path / "fresh").exists()
