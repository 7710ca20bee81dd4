"""The pipeline the fault-injection suite (tests/test_faults.py) runs and breaks, and how it keeps the books.

A pipeline: a Tansu broker (memory storage; or, for the broker-restart fault, ``s3://`` storage on a local
moto S3 server, so a kill -9 of the broker loses nothing), a dedicated redis-server on a free port
(SIGSTOP-able; the shared one is never touched),
processor subprocesses (``python -m emofleet.cli process``, as `emofleet up` runs them) plus in-process
members for fast churn, and the ClickHouse sink in this process on its own chDB directory, through a
wrapper that can make every insert fail, as a :class:`pipeline_helpers.SinkWithCommitHook` that can crash
between insert and commit.

Book-keeping: every reference gets a unique ``audio_id`` (``<run>-<phase>-<n>``); references that cannot
even be decoded carry that id as their Kafka key, which the dead letter keeps. A phase is accounted for
when every id has exactly one whole-clip row in ``emotion_events`` or one row in ``dead_letters``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import soundfile as sf
from confluent_kafka import Producer

from emofleet.infra.local_stack import (
    ensure_redis, free_port, port_open, start_broker, stop_process, wait_until,
)
from emofleet.processors.tiny_model import build_tiny_model
from emofleet.samples import synth_clip
from emofleet.schemas.codec import make_codec
from emofleet.sinks.service import REJECTED
from emofleet.core.config import Settings, to_env
from emofleet.core.metrics import Metrics
from emofleet.streams.producer import idempotent_producer_config
from emofleet.streams.references import make_reference

from metrics_helpers import metric
from pipeline_helpers import FlakyClient, SinkWithCommitHook

S3_BUCKET = "tansu"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "emofleet-test", "AWS_SECRET_ACCESS_KEY": "emofleet-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


# ---------------------------------------------------------------------------------------- broker on S3


# moto's server runs requests on threads, and its conditional PUT (If-Match / If-None-Match) checks the
# ETag and then writes without a lock: two racing writers can both win. Tansu keeps its cluster metadata
# in one object updated with conditional PUTs, and under the pipeline's load (seen: 386 HTTP 412s in 15 s)
# a lost update left it acknowledging produces and serving nothing, forever. One request at a time makes
# the check-and-write atomic, as on real S3.
_SERIALIZED_MOTO = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
def serialized(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple("127.0.0.1", int(sys.argv[1]), serialized, threaded=True, request_handler=MotoRequestHandler)
"""


def moto_available() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class DurableBroker:
    """Tansu on ``s3://`` against moto's S3 server (``durable``), or on memory storage."""

    def __init__(self, workdir: Path, *, durable: bool) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.durable = durable
        self.moto: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        if self.durable:
            port = free_port()
            log = open(workdir / "moto.log", "ab")  # noqa: SIM115 - lives as long as the server
            self.moto = subprocess.Popen([sys.executable, "-c", _SERIALIZED_MOTO, str(port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if not wait_until(lambda: self.moto.poll() is None and port_open("127.0.0.1", port), 30):
                raise RuntimeError(f"moto S3 server did not start; see {workdir / 'moto.log'}")
            self.env = AWS_ENV | {"AWS_ENDPOINT": f"http://127.0.0.1:{port}"}
            import boto3

            boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT"], region_name="us-east-1",
                         aws_access_key_id="emofleet-test", aws_secret_access_key="emofleet-test",
                         ).create_bucket(Bucket=S3_BUCKET)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.bootstrap = ""
        self.start()

    @property
    def storage(self) -> str:
        return f"s3://{S3_BUCKET}/" if self.durable else "memory://tansu/"

    def start(self) -> None:
        with mock.patch.dict(os.environ, self.env):  # start_broker hands os.environ to Tansu
            self.process, self.bootstrap = start_broker(self.workdir / "broker.log", port=self.port,
                                                        storage=self.storage, timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process.pid)
        if self.moto is not None:
            stop_process(self.moto.pid)


# ---------------------------------------------------------------------------------------- ClickHouse


class SinkCrash(BaseException):
    """Raised by the ``before_commit`` hook: the sink dies between insert and commit."""


SINK_COUNTS: dict[str, tuple[str, dict[str, str]]] = {
    "inserted_events": ("emofleet_sink_inserted_rows_total", {"table": "emotion_events"}),
    "inserted_dead_letters": ("emofleet_sink_inserted_rows_total", {"table": "dead_letters"}),
    "inserted_aggregates": ("emofleet_sink_inserted_rows_total", {"table": "emotion_aggregates"}),
    "inserted_frames": ("emofleet_sink_inserted_rows_total", {"table": "emotion_frames"}),
    "rejected": ("emofleet_dead_letters_total", {"reason": REJECTED, "stage": "sink"}),
    "dropped_dead_letters": ("emofleet_errors_total", {"kind": REJECTED}),
    "skipped_replays": ("emofleet_sink_skipped_replays_total", {"by": "position"}),
    "skipped_duplicates": ("emofleet_sink_skipped_replays_total", {"by": "id"}),
    "insert_failures": ("emofleet_sink_insert_failures_total", {}),
    "flushes": ("emofleet_sink_batch_rows_count", {}),
}
"""The campaign report's names for the sink's metric samples (bench/reliability_table.py reads them)."""


class SinkRunner:
    """The in-process ClickHouseSink in a thread; restartable, with an armable crash before commit. Every
    sink it starts reports into the same metrics, so their counts add up over restarts."""

    def __init__(self, settings: Settings, client: FlakyClient, lock: threading.Lock) -> None:
        self.settings = settings
        self.client = client
        self.lock = lock
        self.crash_armed = threading.Event()
        self.crashes = 0
        self.unplanned: list[str] = []
        self.metrics = Metrics("sink")
        self._sink: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _before_commit(self) -> None:
        if self.crash_armed.is_set():
            self.crash_armed.clear()
            self.crashes += 1
            raise SinkCrash("injected: the sink died between insert and commit")

    def start(self) -> None:
        self._error = None
        self._sink = SinkWithCommitHook(self.settings, self.client, make_codec(), client_lock=self.lock,
                                        metrics=self.metrics, before_commit=self._before_commit)
        sink = self._sink

        def run() -> None:
            try:
                sink.run()
            except BaseException as error:  # noqa: BLE001 - a crash is what some phases want
                self._error = error

        self._thread = threading.Thread(target=run, name="sink", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def restart_if_dead(self) -> bool:
        """Restart a sink that died (a planned crash or anything else); True when it did."""
        if self.alive or self._thread is None:
            return False
        if not isinstance(self._error, SinkCrash):
            self.unplanned.append(repr(self._error))
        self.start()
        return True

    def stats(self) -> dict[str, int]:
        """The sinks' counts so far, under the names of :data:`SINK_COUNTS`."""
        return {key: int(metric(self.metrics, name, **labels)) for key, (name, labels) in SINK_COUNTS.items()}

    def stop(self) -> None:
        if self._sink is not None:
            self._sink.stop()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the sink did not stop"
            self._sink = None


# ---------------------------------------------------------------------------------------- processors


class SubprocessMember:
    """``python -m emofleet.cli process`` with the campaign's settings, as `emofleet up` runs it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.process = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "process", "--log-level", "info"],
                                        env=os.environ | to_env(settings), stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def assigned(self) -> bool:
        return "assigned ['" in self.log_path.read_text(errors="replace")

    def assignment(self) -> set[str]:
        """Partitions it holds now, from its log ("assigned" lines list them all, "revoked" the ones lost)."""
        current: set[str] = set()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "emofleet.streams.consumer assigned [" in line:
                current = set(re.findall(r"'([^']+)'", line.split(" assigned ", 1)[1]))
            elif "emofleet.streams.consumer revoked [" in line:
                current -= set(re.findall(r"'([^']+)'", line.split(" revoked ", 1)[1]))
        return current

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return -9
        finally:
            self._log.close()


class ThreadMember:
    """A processor group member inside this process (its own model instance): cheap to add and remove."""

    def __init__(self, settings: Settings) -> None:
        from emofleet.processors.model import load_model
        from emofleet.processors.service import build_processor

        model = load_model(settings.model, cache_dir=settings.data_dir / "models")
        self.processor = build_processor(settings, model=model)
        self._thread = threading.Thread(target=self.processor.run, name="member", daemon=True)
        self._thread.start()

    def assigned(self) -> bool:
        return bool(self.processor.loop.assigned)

    def assignment(self) -> set[str]:
        return {f"{topic}[{partition}]" for topic, partition in list(self.processor.loop.assigned)}

    def stop(self) -> None:
        self.processor.stop()
        self._thread.join(60)
        assert not self._thread.is_alive(), "an in-process member did not stop"


# ---------------------------------------------------------------------------------------- inputs


def wav_bytes(samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


class ClipPool:
    """Short distinct clips on disk: a few base clips, each reference's copy made unique by one sample
    (so its content hash, and the cache key, is its own) unless it deliberately repeats an earlier one."""

    def __init__(self, root: Path, bases: int = 64, min_seconds: float = 0.2, max_seconds: float = 0.6,
                 repeat_every: int = 4) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(7)
        self._bases = [(np.clip(synth_clip(float(rng.uniform(min_seconds, max_seconds)), seed) * 32767, -32768, 32767)
                        .astype("<i2")) for seed in range(bases)]
        self._header = {len(b): wav_bytes(np.zeros(len(b), np.float32))[:44] for b in self._bases}
        self.repeat_every = repeat_every
        self._written: list[str] = []
        self._count = 0

    def next_uri(self) -> str:
        """A file:// URI; every ``repeat_every``-th one repeats an earlier clip (a cache hit)."""
        self._count += 1
        if self.repeat_every and self._written and self._count % self.repeat_every == 0:
            return self._written[(self._count * 7919) % len(self._written)]
        base = self._bases[self._count % len(self._bases)].copy()
        base[0] = np.int16(self._count % 30000)  # unique content
        base[1] = np.int16(self._count // 30000)
        path = self.root / f"clip-{self._count:06d}.wav"
        path.write_bytes(self._header[len(base)] + base.tobytes())
        uri = path.as_uri()
        self._written.append(uri)
        return uri


@dataclass(frozen=True)
class Message:
    ident: str  # audio_id, or (for references that do not decode) the Kafka key the dead letter keeps
    kind: str  # "good" or the poison kind
    reasons: frozenset[str]  # dead-letter reasons that are right for this input (empty: must succeed)
    key: bytes
    value: bytes
    reference: dict[str, Any] | None = None  # re-encoded when sent, so produced_at is the send time


def reference(audio_id: str, uri: str, phase: str) -> dict[str, Any]:
    """An AudioReference like make_reference builds, but any URI (poison must get past the producer)."""
    return {"audio_id": audio_id, "uri": uri, "produced_at": int(time.time() * 1000), "content_type": None,
            "attributes": {"phase": phase}, "tenant": "faults", "source": phase, "channel": None, "call_id": None}


class HttpFixture:
    """Loopback HTTP server for the http(s) poison kinds: 404, 403, 500, a redirect to a disallowed host."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.rsplit("/", 1)[-1].split("-")[0]
                if name == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://not-allowed.invalid/x.wav")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = {"missing": 404, "forbidden": 403, "broken": 500}.get(name, 404)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def poison_files(root: Path) -> dict[str, Path]:
    """Bad inputs on disk under the allowed root (and one symlink leading out of it)."""
    root.mkdir(parents=True, exist_ok=True)
    good = wav_bytes(synth_clip(0.5, 1))
    nan = synth_clip(0.5, 2)
    nan[100] = np.nan
    inf = synth_clip(0.5, 3)
    inf[200] = np.inf
    files = {
        "empty_file": b"",
        "text_file": b"this is not audio, it is a text file\n" * 20,
        "truncated_wav": good[: len(good) // 2],
        "nan_samples": wav_bytes(nan, subtype="FLOAT"),
        "inf_samples": wav_bytes(inf, subtype="FLOAT"),
        "too_short": wav_bytes(synth_clip(0.01, 4)),
        "zero_frames": wav_bytes(np.zeros(0, np.float32)),
        "too_long": wav_bytes(synth_clip(12.0, 5)),  # the campaign caps audio at 10 s
        "oversize": np.random.default_rng(0).bytes(1_200_000),  # the campaign caps files at 1 MB
        "garbage_header": b"RIFF\xff\xff\xff\xffWAVEfmt " + bytes(range(256)) * 4,
        "mp4_junk": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 400,
    }
    paths = {}
    for name, data in files.items():
        path = root / f"{name}.wav"
        path.write_bytes(data)
        paths[name] = path
    escape = root / "escape.wav"
    if not escape.is_symlink():
        escape.symlink_to("/etc/hostname")
    paths["symlink_escape"] = escape
    directory = root / "a-directory.wav"
    directory.mkdir(exist_ok=True)
    paths["directory"] = directory
    fifo = root / "fifo.wav"
    if not fifo.exists():
        os.mkfifo(fifo)
    paths["fifo"] = fifo
    return paths


def poison_messages(phase: str, prefix: str, root: Path, files: dict[str, Path], http_host: str,
                    topic: str, copies: int) -> list[Message]:
    """At least 20 kinds of bad input, ``copies`` of each, every one with the dead-letter reason(s) it
    must get. References that decode carry a bad URI; the rest are bad bytes on the audio topic."""
    codec = make_codec()
    kinds: list[tuple[str, frozenset[str], str | None, Callable[[str], bytes] | None]] = []

    def uri_kind(kind: str, uri: str, *reasons: str) -> None:
        kinds.append((kind, frozenset(reasons), uri, None))

    def bytes_kind(kind: str, make: Callable[[str], bytes], *reasons: str) -> None:
        kinds.append((kind, frozenset(reasons), None, make))

    r = root.as_uri()
    uri_kind("missing_file", f"{r}/does-not-exist.wav", "not_found")
    uri_kind("empty_file", files["empty_file"].as_uri(), "empty")
    uri_kind("not_audio_text", files["text_file"].as_uri(), "not_audio")
    uri_kind("truncated_wav", files["truncated_wav"].as_uri(), "corrupt")
    uri_kind("nan_samples", files["nan_samples"].as_uri(), "non_finite")
    uri_kind("inf_samples", files["inf_samples"].as_uri(), "non_finite")
    uri_kind("too_short", files["too_short"].as_uri(), "too_short")
    uri_kind("zero_frames", files["zero_frames"].as_uri(), "too_short")
    uri_kind("too_long", files["too_long"].as_uri(), "too_long")
    uri_kind("oversize", files["oversize"].as_uri(), "too_large")
    uri_kind("garbage_wav_header", files["garbage_header"].as_uri(), "corrupt", "not_audio")
    uri_kind("mp4_junk", files["mp4_junk"].as_uri(), "corrupt", "unsupported_format")
    uri_kind("symlink_escape", files["symlink_escape"].as_uri(), "root_not_allowed")
    uri_kind("directory", files["directory"].as_uri(), "not_found")
    uri_kind("fifo", files["fifo"].as_uri(), "not_found")
    uri_kind("outside_root", "file:///etc/hostname", "root_not_allowed")
    uri_kind("path_traversal", f"{r}/../../../../etc/hostname", "root_not_allowed")
    uri_kind("file_remote_host", f"file://elsewhere{root}/x.wav", "host_not_allowed")
    uri_kind("query_in_file_uri", f"{r}/x.wav?version=2", "bad_uri")
    uri_kind("nul_byte", f"{r}/x%00.wav", "bad_uri")
    uri_kind("disallowed_scheme", "ftp://example.invalid/a.wav", "scheme_not_allowed")
    uri_kind("not_a_uri", "/plain/path.wav", "scheme_not_allowed")
    uri_kind("disallowed_http_host", "http://not-allowed.invalid/a.wav", "host_not_allowed")
    uri_kind("unparseable_uri", "http://[::1/a.wav", "bad_uri")
    uri_kind("s3_without_key", "s3://bucket-only", "bad_uri")
    uri_kind("http_404", f"http://{http_host}/missing", "not_found")
    uri_kind("http_403", f"http://{http_host}/forbidden", "forbidden")
    uri_kind("http_500_after_retries", f"http://{http_host}/broken", "fetch_failed")
    uri_kind("redirect_to_disallowed_host", f"http://{http_host}/redirect", "redirect_not_allowed")

    def valid_bytes(ident: str) -> bytes:
        return codec.encode("audio_reference", reference(ident, f"{r}/x.wav", phase), topic=topic)

    def unknown_fingerprint(ident: str) -> bytes:
        return b"\xc3\x01" + b"\x13\x37" * 4 + valid_bytes(ident)[10:]

    def other_record_type(ident: str) -> bytes:
        from emofleet.streams.dead_letters import Failure, Lineage, dead_letter

        record = dead_letter(key=ident.encode(), payload=b"", headers=[], lineage=Lineage("t", 0, 0),
                             failure=Failure("x", "decode", "E", "m"), reference=None, processor="p", failed_at_ms=0)
        return codec.encode("dead_letter", record, topic=topic)

    def wrong_types(ident: str) -> bytes:
        from fastavro import parse_schema, schemaless_writer

        from emofleet.schemas.codec import SCHEMA_DIR

        schema = json.loads((SCHEMA_DIR / "audio_reference.avsc").read_text())
        for item in schema["fields"]:
            if item["name"] in ("audio_id", "uri"):
                item["type"] = "double"  # same fingerprint header, body with doubles where strings belong
        body = io.BytesIO()
        record = reference(ident, "x", phase) | {"audio_id": 1.5, "uri": 2.5}
        schemaless_writer(body, parse_schema(schema), record)
        return valid_bytes(ident)[:10] + body.getvalue()

    bytes_kind("malformed_avro", lambda ident: f"garbage {ident} not avro".encode(), "malformed")
    bytes_kind("empty_message", lambda ident: b"", "malformed")
    bytes_kind("truncated_avro", lambda ident: valid_bytes(ident)[:25], "malformed")
    bytes_kind("trailing_bytes", lambda ident: valid_bytes(ident) + b"\x00\x01", "malformed")
    bytes_kind("unknown_schema_fingerprint", unknown_fingerprint, "unknown_schema")
    bytes_kind("confluent_framing", lambda ident: b"\x00\x00\x00\x00\x07" + valid_bytes(ident)[10:], "malformed")
    bytes_kind("other_record_type", other_record_type, "unknown_schema")
    bytes_kind("wrong_field_types", wrong_types, "malformed")

    messages = []
    for copy in range(copies):
        for index, (kind, reasons, uri, make) in enumerate(kinds):
            ident = f"{prefix}p{copy}-{index}"
            if uri is not None:
                value = codec.encode("audio_reference", reference(ident, uri, phase), topic=topic)
            else:
                value = make(ident)  # type: ignore[misc]
            messages.append(Message(ident, kind, reasons, ident.encode(), value))  # sent as built
    return messages


def good_messages(phase: str, prefix: str, pool: ClipPool, topic: str, count: int, start: int = 0) -> list[Message]:
    codec = make_codec()
    out = []
    for n in range(start, start + count):
        ident = f"{prefix}{n}"
        ref = make_reference({"uri": pool.next_uri(), "audio_id": ident, "tenant": "faults", "source": phase})
        value = codec.encode("audio_reference", ref, topic=topic)
        out.append(Message(ident, "good", frozenset(), ident.encode(), value, ref))
    return out


# ---------------------------------------------------------------------------------------- feeding


class Feeder:
    """Produces a phase's messages at ``rate`` per second in a thread; remembers when each was sent."""

    def __init__(self, settings: Settings, messages: list[Message], rate: float) -> None:
        self.messages = messages
        self.rate = rate
        self.sent_at: dict[str, float] = {}
        self.failed: list[str] = []
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self.started = time.time()
        self._thread.start()

    def _run(self) -> None:
        producer = Producer(idempotent_producer_config(self._settings.kafka, **{"linger.ms": 5, "log_level": 2}))
        topic = self._settings.kafka.audio_topic
        codec = make_codec()
        start = time.monotonic()

        def delivered(error: Any, message: Any) -> None:
            if error is not None:
                self.failed.append(f"{message.key()!r}: {error.str()}")

        for index, message in enumerate(self.messages):
            due = start + index / self.rate
            if (delay := due - time.monotonic()) > 0:
                self._stop.wait(delay)  # pacing the offered load, not synchronisation
            value = message.value
            self.sent_at[message.ident] = now = time.time()
            if message.reference is not None:
                stamped = message.reference | {"produced_at": int(now * 1000)}
                value = codec.encode("audio_reference", stamped, topic=topic)
            while True:
                try:
                    producer.produce(topic, key=message.key, value=value, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        remaining = producer.flush(120)
        if remaining:
            self.failed.append(f"{remaining} message(s) not delivered within 120 s")

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = 180) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the feeder did not finish"


# ---------------------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    expected: int
    stored_events: int = 0  # ids with a whole-clip row
    dead_lettered: int = 0  # ids with a dead letter row
    lost: list[str] = field(default_factory=list)
    lost_ids: list[str] = field(default_factory=list)
    duplicate_rows: int = 0  # rows beyond one per id (events, no FINAL) + dead letters beyond one per id
    double_outcome: list[str] = field(default_factory=list)  # an id with both a result and a dead letter
    wrong_reason: list[str] = field(default_factory=list)
    unexpected_dead: list[str] = field(default_factory=list)  # good references that were dead-lettered
    empty_reason: int = 0
    distinct_event_ids: int = 0
    stored_at: dict[str, float] = field(default_factory=dict)  # first inserted_at per id (epoch seconds)
    reasons: dict[str, int] = field(default_factory=dict)


def settled_count(run: Callable[..., list[dict]], database: str, prefix: str) -> int:
    (events,) = run(f"SELECT uniqExact(audio_id) AS n FROM {database}.emotion_events "
                    "WHERE segment_index = -1 AND startsWith(audio_id, {p:String})", {"p": prefix})
    (dead,) = run(f"SELECT uniqExact(ifNull(key, '')) AS n FROM {database}.dead_letters "
                  "WHERE startsWith(ifNull(key, ''), {p:String})", {"p": prefix})
    return int(events["n"]) + int(dead["n"])


def account(run: Callable[..., list[dict]], database: str, prefix: str, messages: list[Message]) -> Accounting:
    result = Accounting(expected=len(messages))
    events = {r["audio_id"]: r for r in run(
        f"SELECT audio_id, count() AS rows, uniqExact(event_id) AS ids, min(inserted_at) AS stored "
        f"FROM {database}.emotion_events WHERE segment_index = -1 AND startsWith(audio_id, {{p:String}}) "
        "GROUP BY audio_id", {"p": prefix})}
    dead = {r["ident"]: r for r in run(
        "SELECT ifNull(key, '') AS ident, count() AS rows, uniqExact(dead_letter_id) AS ids, "
        "groupArray(reason) AS reasons, min(inserted_at) AS stored "
        f"FROM {database}.dead_letters WHERE startsWith(ifNull(key, ''), {{p:String}}) GROUP BY ident",
        {"p": prefix})}
    (all_rows,) = run(f"SELECT count() AS rows, uniqExact(event_id) AS ids FROM {database}.emotion_events "
                      "WHERE startsWith(audio_id, {p:String})", {"p": prefix})
    result.duplicate_rows = int(all_rows["rows"]) - int(all_rows["ids"])
    (distinct,) = run(f"SELECT uniqExact(event_id) AS ids FROM {database}.emotion_events "
                      "WHERE segment_index = -1 AND startsWith(audio_id, {p:String})", {"p": prefix})
    result.distinct_event_ids = int(distinct["ids"])
    (empty,) = run(f"SELECT count() AS n FROM {database}.dead_letters WHERE reason = ''", {})
    result.empty_reason = int(empty["n"])
    for message in messages:
        event, letter = events.get(message.ident), dead.get(message.ident)
        if event is None and letter is None:
            result.lost.append(f"{message.ident} ({message.kind})")
            result.lost_ids.append(message.ident)
            continue
        if event is not None and letter is not None:
            result.double_outcome.append(message.ident)
        if letter is not None:
            result.dead_lettered += 1
            result.duplicate_rows += int(letter["rows"]) - 1
            for reason in letter["reasons"]:
                result.reasons[reason] = result.reasons.get(reason, 0) + 1
            if not message.reasons:
                result.unexpected_dead.append(f"{message.ident}: {letter['reasons']}")
            elif not set(letter["reasons"]) <= message.reasons:
                result.wrong_reason.append(f"{message.kind}: got {letter['reasons']}, want {sorted(message.reasons)}")
        if event is not None:
            result.stored_events += 1
            if message.reasons:
                result.wrong_reason.append(f"{message.kind}: processed, want a dead letter {sorted(message.reasons)}")
        stored = [r["stored"] for r in (event, letter) if r is not None]
        result.stored_at[message.ident] = min(_epoch(s) for s in stored)
    return result


def _epoch(value: Any) -> float:
    if isinstance(value, str):
        from datetime import datetime

        value = datetime.fromisoformat(value)
    return float(value.timestamp())


def recovery_seconds(accounting: Accounting, sent_at: dict[str, float], fault_end: float) -> float:
    """Seconds from the end of a fault until every reference sent before that moment was stored."""
    waited = [accounting.stored_at[i] - fault_end for i, t in sent_at.items()
              if t <= fault_end and i in accounting.stored_at]
    return max([0.0, *waited])


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "faults": rows}, indent=2, default=str))


@contextmanager
def dedicated_redis(workdir: Path) -> Iterator[tuple[str, int]]:
    """A redis-server of our own on a free port (never the shared one): (url, pid)."""
    url, pid = ensure_redis(f"redis://127.0.0.1:{free_port()}/0", workdir, detach=False)
    assert pid is not None, "ensure_redis must start a server of its own on a free port"
    try:
        yield url, pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        stop_process(pid)


def campaign_settings(base: Settings, *, bootstrap: str, redis_url: str, name: str, data_dir: Path,
                      file_root: Path, http_host: str, database: str) -> Settings:
    from emofleet.core.config import AudioSettings, BatchSettings, ClickHouseSettings, KafkaSettings

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, audio_topic=f"{name}.audio", results_topic=f"{name}.emotions",
        dead_letter_topic=f"{name}.dead-letters", alerts_topic=f"{name}.alerts",
        aggregates_topic=f"{name}.aggregates", partitions=6, processor_group=f"{name}.processors",
        sink_group=f"{name}.sink", session_timeout_ms=3000, heartbeat_interval_ms=500,
        leave_group_on_close=False)  # always Tansu here: tests/test_tansu_group.py
    return replace(
        base, data_dir=data_dir, kafka=kafka,
        audio=replace(AudioSettings(), file_roots=(file_root,), http_hosts=(http_host.split(":")[0],),
                      max_bytes=1_000_000, max_seconds=10.0, fetch_timeout_seconds=5.0, fetch_workers=4),
        cache=replace(base.cache, redis_url=redis_url, key_prefix=f"faults:{name}", claim_seconds=10),
        model=replace(base.model, model="tiny", threads=1),
        batch=BatchSettings(max_wait_ms=50, commit_interval_seconds=0.2, revoke_grace_seconds=5.0),
        clickhouse=replace(ClickHouseSettings(), database=database, batch_rows=5000, batch_seconds=0.3),
    )


def prepare_model(settings: Settings) -> None:
    build_tiny_model(settings.data_dir / "models" / "tiny-emotion2vec")  # once, before members race to it


def broker_losses(settings: Settings, lost_ids: list[str]) -> dict[str, str]:
    """For references without an outcome: was it the broker? ``{id: why}`` for those it was.

    Tansu on S3 (moto) sometimes does not serve a message it acknowledged (acks=all, idempotent), measured
    outside the pipeline too. So a reference the audio topic no longer holds was lost by the broker, and so
    was a result when the processor group committed past its reference but the results topic lacks it.
    Anything else (a result in Kafka but not in ClickHouse, a reference never committed) is left to fail."""
    from confluent_kafka import Consumer, TopicPartition

    from kafka_helpers import TopicReader

    if not lost_ids:
        return {}
    codec = make_codec()
    kafka = settings.kafka

    def everything(topic: str) -> list[Any]:
        reader = TopicReader(kafka.bootstrap_servers, topic)
        try:
            count, quiet = -1, 0
            deadline = time.monotonic() + 60
            while quiet < 3 and time.monotonic() < deadline:
                messages = reader.poll(0.5)
                quiet, count = (quiet + 1, count) if len(messages) == count else (0, len(messages))
            return list(reader.messages)
        finally:
            reader.close()

    positions = {}
    for message in everything(kafka.audio_topic):
        try:
            audio_id = codec.decode("audio_reference", message.value(), topic=kafka.audio_topic)["audio_id"]
        except Exception:  # noqa: BLE001 - poison has no audio id
            continue
        positions[audio_id] = (message.partition(), message.offset())
    results = {codec.decode("emotion_event", m.value(), topic=kafka.results_topic)["audio_id"]
               for m in everything(kafka.results_topic)}
    reader = Consumer(kafka.client_config() | {"group.id": kafka.processor_group, "log_level": 0})
    try:
        committed = {tp.partition: tp.offset for tp in reader.committed(
            [TopicPartition(kafka.audio_topic, p) for p in range(kafka.partitions)], timeout=10)}
    finally:
        reader.close()
    why = {}
    for ident in lost_ids:
        if ident not in positions:
            why[ident] = "acknowledged reference not served by the broker after its restart"
        elif ident not in results and committed.get(positions[ident][0], -1) > positions[ident][1]:
            why[ident] = "acknowledged result not served by the broker (the group had committed past it)"
    return why
