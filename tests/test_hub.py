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
                self.send_response(416)  # as real servers: the length of the whole file, for the client
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
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

    def serve_hf(self, repo: str, filename: str, data: bytes, revision: str = "main") -> str:
        path = f"/hf/{repo}/resolve/{revision}/{filename}"
        self.state.files[path] = data
        return path


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv(hub.BASE_URL_ENV, url + "/")  # trailing slash must not double up
    monkeypatch.setenv(hub.HF_ENDPOINT_ENV, url + "/hf/")
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


# --- generic URLs, the HF Hub and OpenCLIP's tags ------------------------------------------------------------

REPO = "org/tiny-clip"
CONFIG = b'{"model_cfg": {"embed_dim": 8}}'
WEIGHTS = bytes(range(256)) * 300
TOKENIZER = b'{"version": "1.0"}'


def _requests(server: Server) -> list[tuple[str, int]]:
    return [(path, status) for path, _, status in server.state.requests]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_hf_urls_follow_hf_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hub.HF_ENDPOINT_ENV, raising=False)
    assert hub.hf_file_url("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors") == (
        "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_model.safetensors"
    )
    monkeypatch.setenv(hub.HF_ENDPOINT_ENV, "https://hf-mirror.example/")  # read per call, slash trimmed
    assert hub.hf_file_url("a/b", "sub dir/x y.json", revision="refs/pr/1") == (
        "https://hf-mirror.example/a/b/resolve/refs%2Fpr%2F1/sub%20dir/x%20y.json"
    )
    assert hub.hf_cache_dir("a/b", root=tmp_path) == tmp_path / "hf" / "a" / "b"
    assert hub.hf_cache_dir("a/b", "main", tmp_path) == tmp_path / "hf" / "a" / "b"
    assert hub.hf_cache_dir("a/b", "v1.0", tmp_path) == tmp_path / "hf" / "a" / "b@v1.0"
    assert hub.hf_cache_dir("a/b") == Path("~/.cache/clip/hf/a/b").expanduser()
    assert hub.parse_hf_hub_name("hf-hub:timm/ViT-B-16-SigLIP") == "timm/ViT-B-16-SigLIP"
    assert hub.parse_hf_hub_name("ViT-B/32") is None
    assert hub.parse_hf_hub_name("hf-hub:bert-base-uncased") == "bert-base-uncased"  # legacy ids have no org
    for bad in ("hf-hub:a/b/c", "hf-hub:../etc", "hf-hub:", "hf-hub:a b/c", "hf-hub:-x/y"):
        with pytest.raises(ValueError, match="not an HF Hub repo id; expected 'org/name'"):
            hub.parse_hf_hub_name(bad)
    for bad_file in ("../x", "/abs", "a//b", ""):
        with pytest.raises(ValueError, match="relative path"):
            hub.hf_file_url("a/b", bad_file)


def test_download_url_with_and_without_published_digest(server: Server, tmp_path: Path) -> None:
    server.state.files["/releases/weights-0123abcd.pt"] = PAYLOAD
    url = f"{server.url}/releases/weights-0123abcd.pt"
    # No digest: kept under the URL's file name, checked for completeness only, then trusted from the cache.
    path = hub.download_url(url, root=tmp_path, progress=False)
    assert path == tmp_path / "weights-0123abcd.pt" and path.read_bytes() == PAYLOAD
    assert hub.download_url(url, root=tmp_path, progress=False) == path
    assert len(server.state.requests) == 1
    # A published prefix (OpenCLIP's releases carry 8 hex digits) verifies the file.
    good = hub.download_url(url, "prefixed.pt", PAYLOAD_SHA[:8], tmp_path, progress=False)
    assert good.read_bytes() == PAYLOAD
    with pytest.raises(
        RuntimeError, match=f"SHA256 mismatch for {re.escape(url)}: expected 0123abcd"
    ) as info:
        hub.download_url(url, "wrong.pt", "0123abcd", tmp_path, progress=False)
    assert PAYLOAD_SHA in str(info.value)
    assert not (tmp_path / "wrong.pt").exists() and not (tmp_path / "wrong.pt.partial").exists()
    with pytest.raises(ValueError, match="8 to 64 lower-case hex digits"):
        hub.download_url(url, "x.pt", "abc", tmp_path)


def test_hf_file_resumes_and_finishes_an_unrenamed_partial(server: Server, tmp_path: Path) -> None:
    path = server.serve_hf(REPO, "open_clip_model.safetensors", WEIGHTS)
    server.state.drop_next = 1
    got = hub.download_hf_file(REPO, "open_clip_model.safetensors", root=tmp_path, progress=False)
    assert got == tmp_path / "hf" / REPO / "open_clip_model.safetensors" and got.read_bytes() == WEIGHTS
    half = len(WEIGHTS) // 2
    assert server.state.requests == [(path, None, 200), (path, f"bytes={half}-", 206)]
    # Without a digest, a complete .partial (killed before the rename) is recognised by the 416 answer.
    server.state.requests.clear()
    got.rename(got.with_name(got.name + ".partial"))
    assert hub.download_hf_file(REPO, "open_clip_model.safetensors", root=tmp_path, progress=False) == got
    assert got.read_bytes() == WEIGHTS
    assert [s for _, _, s in server.state.requests] == [416]
    assert _files(got.parent) == ["open_clip_model.safetensors"]


def test_hf_file_with_a_known_digest_is_verified(server: Server, tmp_path: Path) -> None:
    server.serve_hf(REPO, "good.bin", PAYLOAD)
    server.serve_hf(REPO, "bad.bin", PAYLOAD[::-1])
    assert hub.download_hf_file(REPO, "good.bin", root=tmp_path, progress=False, sha256=PAYLOAD_SHA).is_file()
    with pytest.raises(RuntimeError, match="SHA256 mismatch") as info:
        hub.download_hf_file(REPO, "bad.bin", root=tmp_path, progress=False, sha256=PAYLOAD_SHA)
    assert "check that it serves the original file" in str(info.value)  # $HF_ENDPOINT is set: say so
    assert _files(tmp_path / "hf" / REPO) == ["good.bin"]


def test_hf_404_names_repo_file_and_mirror(server: Server, tmp_path: Path) -> None:
    with pytest.raises(hub.DownloadNotFoundError) as info:
        hub.download_hf_file(REPO, "missing.safetensors", revision="v2", root=tmp_path, progress=False)
    message = str(info.value)
    assert f"HF Hub repo {REPO} (revision v2) has no file missing.safetensors" in message
    assert f"{server.url}/hf/{REPO}/resolve/v2/missing.safetensors answered HTTP 404" in message
    assert f"${hub.HF_ENDPOINT_ENV}={server.url}/hf/" in message
    assert not (tmp_path / "hf" / f"{REPO}@v2" / "missing.safetensors.partial").exists()


def test_hf_401_says_private_or_gated(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unauthorised(handler: _Handler) -> None:
        handler._log(None, 401)
        handler.send_error(401)

    monkeypatch.setattr(_Handler, "do_GET", unauthorised)
    with pytest.raises(RuntimeError, match="HTTP 401.*misspelled, private or gated"):
        hub.download_hf_file("org/secret", "open_clip_config.json", root=tmp_path, progress=False)


def test_download_hf_hub_folder_and_offline_reuse(server: Server, tmp_path: Path) -> None:
    for name, data in [("open_clip_config.json", CONFIG), ("open_clip_model.safetensors", WEIGHTS),
                       ("open_clip_pytorch_model.bin", b"pickled"), ("tokenizer.json", TOKENIZER)]:  # fmt: skip
        server.serve_hf(REPO, name, data)
    folder = hub.download_hf_hub(f"hf-hub:{REPO}", tmp_path, progress=False)
    assert folder == tmp_path / "hf" / REPO
    assert _files(folder) == [
        ".special_tokens_map.json.absent",
        ".tokenizer_config.json.absent",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
    ]  # fmt: skip  (the .bin is not fetched when safetensors exist)
    assert (folder / "open_clip_model.safetensors").read_bytes() == WEIGHTS
    assert sorted(s for _, s in _requests(server)) == [200, 200, 200, 404, 404]
    # Everything is cached, absent files included: a second call makes no request (it works offline).
    server.state.requests.clear()
    assert hub.download_hf_hub(REPO, tmp_path, progress=False) == folder
    assert server.state.requests == []


def test_download_hf_hub_falls_back_to_the_pickle(server: Server, tmp_path: Path) -> None:
    server.serve_hf(REPO, "open_clip_config.json", CONFIG, revision="v1")
    server.serve_hf(REPO, "open_clip_pytorch_model.bin", WEIGHTS, revision="v1")
    folder = hub.download_hf_hub(REPO, tmp_path, revision="v1", progress=False)
    assert folder == tmp_path / "hf" / f"{REPO}@v1"
    assert (folder / "open_clip_pytorch_model.bin").read_bytes() == WEIGHTS
    assert not (folder / "open_clip_model.safetensors").exists()
    assert f"/hf/{REPO}/resolve/v1/open_clip_pytorch_model.bin" in [p for p, _ in _requests(server)]


def test_download_hf_hub_errors_name_the_missing_files(server: Server, tmp_path: Path) -> None:
    with pytest.raises(
        hub.DownloadNotFoundError, match=f"{REPO} .*has no file open_clip_config.json.*OpenCLIP Hub repo"
    ):
        hub.download_hf_hub(REPO, tmp_path, progress=False)
    server.serve_hf(REPO, "open_clip_config.json", CONFIG)
    with pytest.raises(
        hub.DownloadNotFoundError,
        match="has neither open_clip_model.safetensors nor open_clip_pytorch_model.bin",
    ):
        hub.download_hf_hub(REPO, tmp_path, progress=False)


def test_download_tokenizer_feeds_hf_tokenizer(server: Server, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from clip.hf_tokenizer import TokenizerSpec

    tok = Tokenizer(
        models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "dog": 5}, "[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    server.serve_hf("bert-base-uncased", "tokenizer.json", tok.to_str().encode())
    server.serve_hf("bert-base-uncased", "config.json", b'{"model_type": "bert"}')
    with pytest.raises(hub.DownloadNotFoundError, match="has no file tokenizer.json.*save_pretrained"):
        hub.download_tokenizer("org/no-tokenizer", tmp_path, progress=False)
    folder = hub.download_tokenizer("bert-base-uncased", tmp_path, progress=False)
    assert _files(folder) == [
        ".special_tokens_map.json.absent", ".tokenizer_config.json.absent", "config.json", "tokenizer.json",
    ]  # fmt: skip
    spec = TokenizerSpec("hf", 6, "bert-base-uncased", strip_sep_token=True)
    # config.json's model_type makes [PAD] / [SEP] the pad and sep tokens, as transformers' BERT class does.
    assert spec.build(folder)(["a dog", "A DOG cat"]).tolist() == [[2, 4, 5, 0, 0, 0], [2, 1, 1, 1, 0, 0]]


def _tag(**sources: object) -> object:
    from clip.pretrained import PreprocessCfg, PretrainedCfg

    return PretrainedCfg("Tiny", "t", sources.get("hf_hub"), sources.get("url"), False, PreprocessCfg())


def test_download_pretrained_prefers_hub_safetensors_then_pickle(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clip.pretrained import HubFile, UrlFile

    server.serve_hf(REPO, "open_clip_pytorch_model.bin", WEIGHTS)
    server.state.files["/rel/tiny-0123.pt"] = PAYLOAD
    url = UrlFile(f"{server.url}/rel/tiny-0123.pt", "tiny-0123.pt", PAYLOAD_SHA[:8])
    entry = _tag(hf_hub=HubFile(REPO, "open_clip_pytorch_model.bin"), url=url)
    monkeypatch.setattr(hub, "get_pretrained_cfg", lambda arch, tag: entry)
    path = hub.download_pretrained("Tiny", "t", tmp_path, progress=False)
    assert path == tmp_path / "hf" / REPO / "open_clip_pytorch_model.bin" and path.read_bytes() == WEIGHTS
    assert [s for _, s in _requests(server)] == [404, 200]  # the safetensors twin first, as OpenCLIP
    via_url = hub.download_pretrained("Tiny", "t", tmp_path / "other", progress=False, prefer="url")
    assert via_url == tmp_path / "other" / "tiny-0123.pt" and via_url.read_bytes() == PAYLOAD
    # A cached file is used whatever the preference: no request at all.
    server.state.requests.clear()
    assert hub.download_pretrained("Tiny", "t", tmp_path, progress=False, prefer="url") == path
    assert hub.download_pretrained("Tiny", "t", tmp_path / "other", progress=False) == via_url
    assert server.state.requests == []
    with pytest.raises(ValueError, match="prefer='s3'"):
        hub.download_pretrained("Tiny", "t", tmp_path, prefer="s3")


def test_download_pretrained_real_tags_hit_the_mirror(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    server.serve_hf(repo, "open_clip_model.safetensors", WEIGHTS)
    path = hub.download_pretrained("ViT-B-32", "LAION2B-S34B-B79K", tmp_path, progress=False)
    assert path == tmp_path / "hf" / repo / "open_clip_model.safetensors"
    assert _requests(server) == [(f"/hf/{repo}/resolve/main/open_clip_model.safetensors", 200)]
    # OpenAI's tag by URL is the file clip.hub.download("ViT-B/32") keeps, from the same (mirrored) URL with
    # the same digest: a cached copy that fails it is fetched again (recorded here: no real weights in tests).
    entry = hub.get_pretrained("ViT-B/32")
    (tmp_path / entry.filename).write_bytes(b"not the weights")
    calls: list[tuple] = []
    monkeypatch.setattr(hub, "download_url", lambda *args: calls.append(args) or Path(args[0]))
    hub.download_pretrained("ViT-B-32", "openai", tmp_path, progress=False, prefer="url")
    assert calls == [(hub.model_url(entry), entry.filename, entry.sha256, tmp_path, False)]
    with pytest.raises(ValueError, match="ViT-B-32 has no pretrained tag 'laion5b'"):
        hub.download_pretrained("ViT-B-32", "laion5b", tmp_path)
