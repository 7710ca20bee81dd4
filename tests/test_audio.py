"""processors.audio / processors.fetch: policy, limits, decoding, resampling parity with funasr, windows."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audio_fixtures import encode, tone, wav
from emofleet.processors.audio import (
    MIN_MODEL_SAMPLES, AudioError, AudioLoader, decode_audio, windows,
)
from emofleet.processors.fetch import MAX_REDIRECTS, host_allowed, shown
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.core.config import AudioSettings

HOUR = 3600.0


def expected_length(frames: int, rate: int) -> int:
    return int(np.ceil(frames * SAMPLE_RATE / rate))


def reason_of(call: Callable[[], Any]) -> AudioError:
    with pytest.raises(AudioError) as caught:
        call()
    return caught.value


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_ffmpeg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


@pytest.fixture
def make_loader() -> Iterator[Callable[..., AudioLoader]]:
    loaders: list[AudioLoader] = []

    def make(**changes: Any) -> AudioLoader:
        loaders.append(AudioLoader(replace(AudioSettings(), **changes)))
        return loaders[-1]

    yield make
    for loader in loaders:
        loader.close()


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 8_000, 1),
        ("WAV", "PCM_16", 44_100, 2),
        ("WAV", "FLOAT", 44_100, 2),
        ("WAV", "PCM_24", 48_000, 1),
        ("FLAC", "PCM_16", 22_050, 2),
        ("OGG", "VORBIS", 44_100, 1),
        ("OGG", "OPUS", 48_000, 2),
        ("MP3", "MPEG_LAYER_III", 44_100, 2),
        ("WAV", "PCM_16", 16_000, 1),
    ],
)
def test_supported_containers_decode_to_16k_mono(fmt: str, subtype: str, rate: int, channels: int) -> None:
    frames = round(1.3 * rate)
    samples = decode_audio(encode(tone(1.3, rate, channels), rate, fmt, subtype), max_seconds=HOUR)
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.flags.c_contiguous
    assert len(samples) == expected_length(frames, rate)
    assert np.isfinite(samples).all() and 0.1 < np.abs(samples).max() <= 1.0


def test_int16_is_scaled_to_unit_range_and_16k_is_not_resampled() -> None:
    pcm = np.array([-32768, -16384, 0, 16384, 32767] * 100, dtype=np.int16)
    samples = decode_audio(encode(pcm, SAMPLE_RATE, "WAV", "PCM_16"), max_seconds=HOUR)
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768)


def test_channels_are_averaged() -> None:
    stereo = np.tile(np.array([[0.5, 0.25]], dtype=np.float32), (1000, 1))
    samples = decode_audio(encode(stereo, SAMPLE_RATE, "WAV", "FLOAT"), max_seconds=HOUR)
    np.testing.assert_array_equal(samples, np.full(1000, 0.375, np.float32))


@pytest.mark.parametrize(("rate", "channels", "fmt"), [(44_100, 2, "WAV"), (8_000, 1, "FLAC"), (48_000, 1, "OGG")])
def test_resampling_matches_funasr_loader(tmp_path: Path, rate: int, channels: int, fmt: str) -> None:
    load_utils = pytest.importorskip("funasr.utils.load_utils")
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(encode(tone(2.0, rate, channels), rate, fmt))

    theirs = load_utils.load_audio_text_image_video(str(path), fs=SAMPLE_RATE).numpy()
    ours = decode_audio(path.read_bytes(), max_seconds=HOUR)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is a text file, not audio\n" * 20, "not_audio"),
        (b"\x00" + np.random.default_rng(1).bytes(4000), "not_audio"),
        (b"\x00\x00\x00\x20ftypM4A " + bytes(500), "unsupported_format"),
        (b"\x1a\x45\xdf\xa3" + bytes(500), "unsupported_format"),
    ],
)
@pytest.mark.usefixtures("no_ffmpeg")
def test_unusable_bytes_without_ffmpeg(data: bytes, reason: str) -> None:
    error = reason_of(lambda: decode_audio(data, max_seconds=HOUR))
    assert error.reason == reason and error.permanent
    if reason == "unsupported_format":
        assert "ffmpeg" in str(error)


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
@pytest.mark.usefixtures("no_ffmpeg")
def test_truncated_files_are_corrupt(fmt: str, subtype: str) -> None:
    data = encode(tone(1.0, 16_000), 16_000, fmt, subtype)
    for cut in (len(data) // 2, 80):
        error = reason_of(lambda: decode_audio(data[:cut], max_seconds=HOUR))
        assert (error.reason, error.permanent) == ("corrupt", True), (cut, error)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_rejected(bad: float) -> None:
    samples = tone(0.5, 8_000)
    samples[100] = bad
    error = reason_of(lambda: decode_audio(encode(samples, 8_000, "WAV", "FLOAT"), max_seconds=HOUR))
    assert error.reason == "non_finite" and error.permanent


def test_too_long_is_decided_from_the_header_before_decoding() -> None:
    data = encode(tone(3.0, 16_000), 16_000, "FLAC")
    assert reason_of(lambda: decode_audio(data, max_seconds=2.0)).reason == "too_long"
    # Truncated: decoding would fail as corrupt, so a too_long answer proves the header was checked first.
    assert reason_of(lambda: decode_audio(data[: len(data) // 2], max_seconds=2.0)).reason == "too_long"
    assert len(decode_audio(data, max_seconds=3.0)) == 48_000


@pytest.mark.usefixtures("no_ffmpeg")
def test_random_damage_never_escapes_as_another_exception() -> None:
    rng = np.random.default_rng(7)
    originals = [encode(tone(0.3, 8_000, 2), 8_000, fmt) for fmt in ("WAV", "FLAC", "OGG")]
    for _ in range(150):
        data = bytearray(originals[rng.integers(len(originals))])
        for position in rng.integers(0, min(len(data), 200), size=rng.integers(1, 6)):
            data[position] = rng.integers(256)
        try:
            samples = decode_audio(bytes(data), max_seconds=60.0)
        except AudioError:
            continue
        assert samples.dtype == np.float32 and np.isfinite(samples).all()


def test_unreadable_bytes_go_through_ffmpeg_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "ffmpeg"  # 0.5 s of 0.25 as f32le; fails on input starting BAD, complains on WARN
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys, struct\n"
        "args = sys.argv[1:]\n"
        "assert args[args.index('-ar') + 1] == '16000' and args[args.index('-ac') + 1] == '1'\n"
        "assert args[args.index('-f') + 1] == 'f32le'\n"
        "head = open(args[args.index('-i') + 1], 'rb').read(4)\n"
        "if head.startswith(b'BAD'):\n"
        "    sys.stderr.write('Invalid data found when processing input'); sys.exit(1)\n"
        "if head == b'WARN':\n"
        "    sys.stderr.write('File ended prematurely')\n"
        "sys.stdout.buffer.write(struct.pack('<8000f', *([0.25] * 8000)))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    m4a = b"\x00\x00\x00\x20ftypM4A " + bytes(500)

    np.testing.assert_array_equal(decode_audio(m4a, max_seconds=HOUR), np.full(8000, 0.25, np.float32))
    assert reason_of(lambda: decode_audio(m4a, max_seconds=0.2)).reason == "too_long"
    error = reason_of(lambda: decode_audio(b"BAD, not audio", max_seconds=HOUR))
    assert error.reason == "not_audio" and "Invalid data" in str(error)
    assert reason_of(lambda: decode_audio(b"WARN truncated", max_seconds=HOUR)).reason == "corrupt"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary")
def test_real_ffmpeg_decodes_m4a_and_webm_and_flags_damage(tmp_path: Path) -> None:
    source = tmp_path / "source.wav"
    source.write_bytes(wav(1.0, rate=44_100, channels=2))
    encoded = {}
    for name, codec in (("clip.m4a", "aac"), ("clip.webm", "libopus")):
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(source), "-c:a", codec, str(tmp_path / name)], check=True)
        encoded[name] = (tmp_path / name).read_bytes()
        samples = decode_audio(encoded[name], max_seconds=HOUR)
        assert abs(len(samples) - SAMPLE_RATE) < 0.05 * SAMPLE_RATE and 0.1 < np.abs(samples).max() <= 1.0
    webm = encoded["clip.webm"]
    assert reason_of(lambda: decode_audio(webm[: len(webm) // 2], max_seconds=HOUR)).reason == "corrupt"
    assert reason_of(lambda: decode_audio(encoded["clip.m4a"][:200], max_seconds=HOUR)).reason == "corrupt"
    ogg = encode(tone(1.0, 16_000), 16_000, "OGG", "VORBIS")
    assert reason_of(lambda: decode_audio(ogg[: len(ogg) // 2], max_seconds=HOUR)).reason == "corrupt"
    assert reason_of(lambda: decode_audio(b"plain text, no audio here" * 10, max_seconds=HOUR)).reason == "not_audio"


# ---------------------------------------------------------------- load: checks around decoding


def test_load_returns_hash_of_original_bytes_and_duration(make_loader: Callable[..., AudioLoader], tmp_path: Path) -> None:
    data = wav(seconds=1.5, rate=44_100, channels=2)
    (tmp_path / "a.wav").write_bytes(data)
    audio = make_loader(file_roots=(tmp_path,)).load(f"file://{tmp_path}/a.wav")
    assert audio.sha256 == hashlib.sha256(data).hexdigest()
    assert len(audio.samples) == expected_length(round(1.5 * 44_100), 44_100)
    assert audio.duration_seconds == pytest.approx(1.5, abs=1e-4)


def test_clip_under_min_seconds_is_too_short(make_loader: Callable[..., AudioLoader], tmp_path: Path) -> None:
    (tmp_path / "short.wav").write_bytes(wav(seconds=0.02))
    (tmp_path / "none.wav").write_bytes(encode(np.zeros((0, 1), np.float32), 16_000, "WAV", "PCM_16"))
    loader = make_loader(file_roots=(tmp_path,), min_seconds=0.025)
    for name in ("short.wav", "none.wav"):
        error = reason_of(lambda: loader.load(f"file://{tmp_path}/{name}"))
        assert (error.reason, error.permanent) == ("too_short", True)


def test_clip_between_min_seconds_and_model_minimum_is_zero_padded(make_loader: Callable[..., AudioLoader], tmp_path: Path) -> None:
    (tmp_path / "tiny.wav").write_bytes(wav(seconds=0.0125))  # 200 samples
    audio = make_loader(file_roots=(tmp_path,), min_seconds=0.01).load(f"file://{tmp_path}/tiny.wav")
    assert len(audio.samples) == MIN_MODEL_SAMPLES and audio.duration_seconds == pytest.approx(0.0125)
    assert not audio.samples[200:].any() and audio.samples[:200].any()


def test_load_rejects_too_long(make_loader: Callable[..., AudioLoader], tmp_path: Path) -> None:
    (tmp_path / "long.wav").write_bytes(wav(seconds=2.0, rate=8_000))
    error = reason_of(lambda: make_loader(file_roots=(tmp_path,), max_seconds=1.0).load(f"file://{tmp_path}/long.wav"))
    assert (error.reason, error.permanent) == ("too_long", True)


# ---------------------------------------------------------------- file://


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): root holds ok.wav; outside holds secret.wav."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "ok.wav").write_bytes(wav(0.5))
    (outside / "secret.wav").write_bytes(wav(0.5))
    return root, outside


def test_file_inside_root_loads(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "with space.wav").write_bytes(wav(0.5))
    loader = make_loader(file_roots=(root,))
    assert loader.fetch(f"file://{root}/ok.wav") == (root / "ok.wav").read_bytes()
    assert loader.fetch(f"file://localhost{root}/ok.wav") == (root / "ok.wav").read_bytes()
    assert len(loader.load(f"file://{root}/with%20space.wav").samples) == 8000


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("{root}/ok.wav", "scheme_not_allowed"),  # a bare path is not a URI
        ("file://{root}/../outside/secret.wav", "root_not_allowed"),
        ("file://{root}/%2e%2e/outside/secret.wav", "root_not_allowed"),
        ("file://{root}/a%00b.wav", "bad_uri"),
        ("file://{outside}/secret.wav", "root_not_allowed"),
        ("file://fileserver{root}/ok.wav", "host_not_allowed"),
        ("file://{root}/ok.wav?x=1", "bad_uri"),
        ("file://{root}/missing.wav", "not_found"),
        ("file://{root}", "not_found"),  # a directory
        ("ftp://example.com/a.wav", "scheme_not_allowed"),
    ],
)
def test_file_policy(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path], uri: str, reason: str) -> None:
    root, outside = roots
    error = reason_of(lambda: make_loader(file_roots=(root,)).fetch(uri.format(root=root, outside=outside)))
    assert (error.reason, error.permanent) == (reason, True)


def test_symlinks_cannot_escape_a_root(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path]) -> None:
    root, outside = roots
    (root / "link.wav").symlink_to(outside / "secret.wav")
    (root / "linkdir").symlink_to(outside)
    (root / "inner.wav").symlink_to(root / "ok.wav")
    loader = make_loader(file_roots=(root,))
    for uri in (f"file://{root}/link.wav", f"file://{root}/linkdir/secret.wav"):
        assert reason_of(lambda: loader.fetch(uri)).reason == "root_not_allowed"
    assert loader.fetch(f"file://{root}/inner.wav") == (root / "ok.wav").read_bytes()


def test_a_root_given_through_a_symlink_still_works(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = roots
    (tmp_path / "alias").symlink_to(root)
    loader = make_loader(file_roots=(tmp_path / "alias",))
    assert loader.fetch(f"file://{tmp_path}/alias/ok.wav") == loader.fetch(f"file://{root}/ok.wav")


def test_file_scheme_disabled_without_roots_or_when_not_allowed(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path]) -> None:
    root, _ = roots
    error = reason_of(lambda: make_loader().fetch(f"file://{root}/ok.wav"))
    assert error.reason == "root_not_allowed" and "EMOFLEET_AUDIO_FILE_ROOTS" in str(error)
    error = reason_of(lambda: make_loader(file_roots=(root,), allowed_schemes=("https",)).fetch(f"file://{root}/ok.wav"))
    assert error.reason == "scheme_not_allowed"


def test_file_size_cap_and_special_files(make_loader: Callable[..., AudioLoader], roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "big.wav").write_bytes(wav(1.0))  # ~32 kB
    os.mkfifo(root / "pipe.wav")  # must not block the open
    loader = make_loader(file_roots=(root,), max_bytes=20_000)
    assert reason_of(lambda: loader.fetch(f"file://{root}/big.wav")).reason == "too_large"
    assert reason_of(lambda: loader.fetch(f"file://{root}/pipe.wav")).reason == "not_found"
    (root / "empty.wav").write_bytes(b"")
    assert reason_of(lambda: loader.load(f"file://{root}/empty.wav")).reason == "empty"


# ---------------------------------------------------------------- http(s)://

Handler = Callable[[BaseHTTPRequestHandler], None]


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        if length:
            request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: dict[str, int] = {}
        self.release = threading.Event()
        routes, hits = self.routes, self.hits

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits[self.path] = hits.get(self.path, 0) + 1
                try:
                    routes.get(self.path, respond(404))(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.stop()


@pytest.fixture
def http_loader(make_loader: Callable[..., AudioLoader]) -> Callable[..., AudioLoader]:
    return lambda **changes: make_loader(**({"http_hosts": ("127.0.0.1",), "fetch_timeout_seconds": 5.0} | changes))


def test_http_download_and_load(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    data = wav(1.0, rate=8_000)
    server.routes["/a.wav"] = respond(200, data)
    server.routes["/hop"] = respond(302, headers={"Location": "/a.wav"})
    loader = http_loader()
    assert loader.fetch(f"{server.base}/a.wav") == data
    audio = loader.load(f"{server.base}/hop")
    assert audio.sha256 == hashlib.sha256(data).hexdigest() and len(audio.samples) == 16_000


def test_http_host_allowlist(make_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/a.wav"] = respond(200, wav(0.5))
    for hosts in ((), ("example.com",), ("*.0.0.1",)):
        error = reason_of(lambda: make_loader(http_hosts=hosts).fetch(f"{server.base}/a.wav"))
        assert (error.reason, error.permanent) == ("host_not_allowed", True)
    assert server.hits == {}


def test_host_patterns() -> None:
    hosts = ("Audio.Example.com", "*.cdn.example.net")
    assert host_allowed("audio.example.com", hosts) and host_allowed("AUDIO.EXAMPLE.COM.", hosts)
    assert host_allowed("a.cdn.example.net", hosts) and host_allowed("x.y.cdn.example.net", hosts)
    assert not host_allowed("cdn.example.net", hosts)
    assert not host_allowed("evilcdn.example.net", hosts)
    assert not host_allowed("audio.example.com.evil.org", hosts)
    assert not host_allowed("example.com", hosts)


def test_redirect_to_a_disallowed_host_is_refused(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/out"] = respond(302, headers={"Location": "http://evil.invalid/a.wav"})
    error = reason_of(lambda: http_loader().fetch(f"{server.base}/out"))
    assert (error.reason, error.permanent) == ("redirect_not_allowed", True)
    assert "evil.invalid" in str(error)


def test_redirect_to_a_disallowed_scheme_is_refused(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/tls"] = respond(301, headers={"Location": server.base.replace("http:", "https:") + "/a.wav"})
    error = reason_of(lambda: http_loader(allowed_schemes=("http",)).fetch(f"{server.base}/tls"))
    assert error.reason == "redirect_not_allowed"


def test_redirect_hops_are_capped(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/loop"] = respond(307, headers={"Location": "/loop"})
    error = reason_of(lambda: http_loader().fetch(f"{server.base}/loop"))
    assert error.reason == "redirect_not_allowed" and "redirects" in str(error)
    assert server.hits["/loop"] == MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [
        (404, "not_found", True), (410, "not_found", True), (403, "forbidden", True), (400, "fetch_failed", True),
        (500, "fetch_failed", False), (503, "fetch_failed", False), (429, "fetch_failed", False),
    ],
)
def test_http_status_mapping(http_loader: Callable[..., AudioLoader], server: Server, status: int, reason: str, permanent: bool) -> None:
    server.routes["/x"] = respond(status, b"nope")
    error = reason_of(lambda: http_loader().fetch(f"{server.base}/x"))
    assert (error.reason, error.permanent) == (reason, permanent)


def test_http_size_cap_from_content_length(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/big"] = respond(200, b"x" * 10, headers={"Content-Length": str(10**9)}, length=False)
    error = reason_of(lambda: http_loader(max_bytes=1000).fetch(f"{server.base}/big"))
    assert (error.reason, error.permanent) == ("too_large", True)


def test_http_size_cap_on_a_streamed_body_without_content_length(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    def stream(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.end_headers()  # HTTP/1.0, no Content-Length: the body runs until the connection closes
        for _ in range(64):
            request.wfile.write(bytes(32 * 1024))

    server.routes["/stream"] = stream
    error = reason_of(lambda: http_loader(max_bytes=100_000).fetch(f"{server.base}/stream"))
    assert (error.reason, error.permanent) == ("too_large", True)
    server.routes["/small"] = respond(200, bytes(5000), length=False)
    assert http_loader(max_bytes=100_000).fetch(f"{server.base}/small") == bytes(5000)


def test_http_timeout_is_transient(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/stall"] = lambda request: server.release.wait(10)
    error = reason_of(lambda: http_loader(fetch_timeout_seconds=0.2).fetch(f"{server.base}/stall"))
    assert (error.reason, error.permanent) == ("timeout", False)


def test_http_connection_refused_is_transient(http_loader: Callable[..., AudioLoader]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = reason_of(lambda: http_loader().fetch(f"http://127.0.0.1:{port}/a.wav"))
    assert (error.reason, error.permanent) == ("fetch_failed", False)


def test_http_empty_body_is_empty(http_loader: Callable[..., AudioLoader], server: Server) -> None:
    server.routes["/empty"] = respond(200, b"")
    assert reason_of(lambda: http_loader().load(f"{server.base}/empty")).reason == "empty"


# ---------------------------------------------------------------- s3://


class FakeClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class FakeS3:
    def __init__(self, objects: dict[tuple[str, str], bytes], error: Exception | None = None) -> None:
        self.objects, self.error = objects, error

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        if self.error:
            raise self.error
        data = self.objects[(Bucket, Key)]
        return {"ContentLength": len(data), "Body": io.BytesIO(data)}


def install_boto3(monkeypatch: pytest.MonkeyPatch, client: FakeS3) -> dict[str, Any]:
    calls: dict[str, Any] = {}
    boto3 = types.ModuleType("boto3")
    boto3.client = lambda service, **kwargs: calls.update(service=service, **kwargs) or client  # type: ignore[attr-defined]
    botocore_config = types.ModuleType("botocore.config")
    botocore_config.Config = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", boto3)
    monkeypatch.setitem(sys.modules, "botocore", types.ModuleType("botocore"))
    monkeypatch.setitem(sys.modules, "botocore.config", botocore_config)
    return calls


def test_s3_without_boto3_is_a_clear_permanent_error(monkeypatch: pytest.MonkeyPatch, make_loader: Callable[..., AudioLoader]) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    error = reason_of(lambda: make_loader().fetch("s3://bucket/a.wav"))
    assert (error.reason, error.permanent) == ("s3_unavailable", True) and "boto3" in str(error)


def test_s3_fetch_through_boto3(monkeypatch: pytest.MonkeyPatch, make_loader: Callable[..., AudioLoader]) -> None:
    data = wav(0.5)
    calls = install_boto3(monkeypatch, FakeS3({("bucket", "calls/a b.wav"): data}))
    loader = make_loader(s3_endpoint="http://127.0.0.1:9000", fetch_timeout_seconds=3.0)
    assert loader.fetch("s3://bucket/calls/a b.wav") == data
    assert calls["service"] == "s3" and calls["endpoint_url"] == "http://127.0.0.1:9000"
    assert calls["config"]["read_timeout"] == 3.0
    assert reason_of(lambda: make_loader(max_bytes=100).fetch("s3://bucket/calls/a b.wav")).reason == "too_large"
    assert reason_of(lambda: loader.fetch("s3://bucket")).reason == "bad_uri"
    assert reason_of(lambda: make_loader(allowed_schemes=("https",)).fetch("s3://bucket/x")).reason == "scheme_not_allowed"


@pytest.mark.parametrize(
    ("error", "reason", "permanent"),
    [
        (FakeClientError("NoSuchKey", 404), "not_found", True),
        (FakeClientError("AccessDenied", 403), "forbidden", True),
        (FakeClientError("SlowDown", 503), "fetch_failed", False),
        (type("ReadTimeoutError", (Exception,), {})(), "timeout", False),
        (type("EndpointConnectionError", (Exception,), {})(), "fetch_failed", False),
        (type("NoCredentialsError", (Exception,), {})(), "s3_unavailable", True),
    ],
)
def test_s3_error_mapping(monkeypatch: pytest.MonkeyPatch, make_loader: Callable[..., AudioLoader], error: Exception, reason: str, permanent: bool) -> None:
    install_boto3(monkeypatch, FakeS3({}, error))
    caught = reason_of(lambda: make_loader().fetch("s3://bucket/a.wav"))
    assert (caught.reason, caught.permanent) == (reason, permanent)


# ---------------------------------------------------------------- misc


def test_errors_pickle_and_uris_are_shown_without_secrets() -> None:
    error = pickle.loads(pickle.dumps(AudioError("timeout", "slow", permanent=False)))
    assert (error.reason, error.message, error.permanent) == ("timeout", "slow", False)
    assert shown("https://user:pw@host.example:8443/a.wav?X-Amz-Signature=abc#f") == "https://host.example:8443/a.wav"


@pytest.mark.parametrize("window_seconds", [1.0, 0.37, 2.5])
def test_windows_tile_the_clip(window_seconds: float) -> None:
    rate = 100
    size = round(window_seconds * rate)
    for n in range(0, 12 * size):
        spans = windows(n, window_seconds, rate)
        if n == 0:
            assert spans == []
            continue
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        lengths = [end - start for start, end in spans]
        assert all(length >= 1 for length in lengths)
        assert all(length == size for length in lengths[:-1])
        if n <= size:
            assert spans == [(0, n)]
        else:
            assert size * 0.25 <= lengths[-1] < size * 1.25
        assert windows(n, window_seconds, rate) == spans  # pure


def test_windows_examples_and_bad_arguments() -> None:
    assert windows(30 * SAMPLE_RATE, 30.0) == [(0, 480_000)]
    assert windows(35 * SAMPLE_RATE, 30.0) == [(0, 560_000)]  # 5 s remainder < 7.5 s: merged
    assert windows(40 * SAMPLE_RATE, 30.0) == [(0, 480_000), (480_000, 640_000)]
    with pytest.raises(ValueError):
        windows(-1, 30.0)
    with pytest.raises(ValueError):
        windows(10, 0.0)
