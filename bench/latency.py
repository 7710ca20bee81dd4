"""End-to-end latency: a reference produced -> its row visible in ClickHouse, at a steady moderate rate.

    python bench/latency.py [--rate R] [--seconds S] [--processors N] [--min-seconds A] [--max-seconds B]

The real pipeline as ``emofleet up`` runs it: an embedded Tansu broker, the real Redis (unique key
prefix, deleted afterwards), and child processes ``python -m emofleet.cli process`` (N of them) and
``python -m emofleet.cli sink``, supervised by ``emofleet.up.Supervisor`` with the environment
``emofleet.up.child_env(settings)`` (= ``core.config.to_env``), the sink owning a fresh chDB
directory under a temporary data directory. The tiny model is built once into
``<data_dir>/models/tiny-emotion2vec`` before the children start (each processor loads it from there).
Production defaults for batching: processor ``BatchSettings()`` (max wait 200 ms, 16 clips), sink
``batch_rows`` 20k / ``batch_seconds`` 1.0. No aggregator (it does not sit between produce and the row).

Each child serves /readyz on its own port; the bench waits for all of them (model loaded, partitions
assigned, ClickHouse accepting inserts), then sends a few warm-up references (first inference, first
insert) and waits for their rows; none of that is measured.

Then it produces R references/s for S seconds (each made with ``make_reference`` just before
``AudioReferenceProducer.send``, so its ``produced_at`` is the send time), every one a distinct clip
(no cache hits), and a poller thread asks ClickHouse every 50 ms through the sink's read-only query
server (``sinks.query_server.owner_runner(data_dir)``, the same path `emofleet query` takes) for new
whole-clip rows. Per reference:

* **produce -> row visible**: the wall-clock start of the first poll that returned the row, minus
  ``reference_produced_at``. The headline number; polling adds 0-50 ms plus the query's own time.
* **produce -> processed**: ``processed_at - reference_produced_at`` (processor: fetch wait, batching,
  audio load, model, encode).
* **processed -> inserted_at**: ``inserted_at - processed_at``. NOTE: the sink stamps ``inserted_at``
  when it *consumes* the message (``sinks/service.py`` ``_accept``), not when the insert lands, so this
  is "processed -> consumed by the sink".
* **inserted_at -> visible**: the rest: the sink's batch wait (up to ``batch_seconds``), the insert, and
  the poll.

Target: none set by the issue (report P50/P95/P99 and throughput).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from typing import Any

from emofleet.schemas.codec import make_codec
from emofleet.core.config import BatchSettings, ClickHouseSettings, ModelSettings, Settings
from emofleet.streams.producer import AudioReferenceProducer
from emofleet.streams.references import make_reference

from harness import (
    DEFAULT_REDIS_URL, bench_settings, create_pipeline_topics, delete_redis_prefix, embedded_broker, log,
    machine_line, markdown_table, require_redis, workspace,
)

POLL_SECONDS = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:  # noqa: S310
            return response.status == 200
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


class RowPoller:
    """Polls ClickHouse through the sink's query server for new whole-clip rows of this run's topic."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (source_partition, source_offset) -> row
        self.polls = 0
        self.errors = 0
        self.query_seconds: list[float] = []
        self._after: dict[int, int] = {}  # kafka_partition -> highest kafka_offset seen
        self._thread = threading.Thread(target=self._run, name="row-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        from emofleet.sinks.query_server import QueryError, owner_runner

        database = self._settings.clickhouse.database
        topic = self._settings.kafka.audio_topic
        run = None
        while not self._stop.is_set():
            if run is None:
                run = owner_runner(self._settings.data_dir)
            if run is not None:
                seen = " AND ".join(f"NOT (kafka_partition = {p} AND kafka_offset <= {o})"
                                    for p, o in sorted(self._after.items())) or "1"
                sql = (f"SELECT source_partition, source_offset, kafka_partition, kafka_offset, "
                       f"toUnixTimestamp64Milli(reference_produced_at) AS produced_ms, "
                       f"toUnixTimestamp64Milli(processed_at) AS processed_ms, "
                       f"toUnixTimestamp64Milli(inserted_at) AS inserted_ms "
                       f"FROM {database}.emotion_events "
                       f"WHERE source_topic = {{topic:String}} AND segment_index = -1 AND {seen}")
                started = time.time()
                try:
                    rows = run(sql, {"topic": topic})
                except QueryError:
                    self.errors += 1  # the sink is still migrating or restarting
                    run = None
                    rows = []
                self.query_seconds.append(time.time() - started)
                self.polls += 1
                for row in rows:
                    key = (int(row["source_partition"]), int(row["source_offset"]))
                    if key not in self.rows:
                        self.rows[key] = row | {"visible_ms": started * 1000}
                    partition, offset = int(row["kafka_partition"]), int(row["kafka_offset"])
                    self._after[partition] = max(self._after.get(partition, -1), offset)
            self._stop.wait(POLL_SECONDS)


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="references per second (default 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to produce (default 30)")
    parser.add_argument("--processors", type=int, default=1, help="processor child processes (default 1)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="shortest clip (default 1 s)")
    parser.add_argument("--max-seconds", type=float, default=4.0, help="longest clip (default 4 s)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    redis_url = require_redis(args.redis_url)
    count = int(args.rate * args.seconds)

    from emofleet.processors.tiny_model import build_tiny_model
    from emofleet.samples import write_samples
    from emofleet.up import Supervisor, child_env

    with workspace("emofleet-bench-latency-") as workdir, embedded_broker(workdir) as bootstrap:
        clip_dir = workdir / "clips"
        data_dir = workdir / "data"
        base = bench_settings(bootstrap, redis_url, "latency", data_dir, file_roots=(clip_dir,))
        settings = replace(base, model=ModelSettings(model="tiny", device="cpu"), batch=BatchSettings(),
                           clickhouse=ClickHouseSettings())  # production batching defaults
        create_pipeline_topics(settings)
        started = time.monotonic()
        warmup_paths = write_samples(clip_dir, 4, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                                     seed=1)
        paths = write_samples(clip_dir, count, min_seconds=args.min_seconds, max_seconds=args.max_seconds, seed=2)
        build_tiny_model(data_dir / "models" / "tiny-emotion2vec")  # once, before the children load it
        log(f"{count} + {len(warmup_paths)} clips and the tiny model ready in {time.monotonic() - started:.1f} s")

        cli = [sys.executable, "-m", "emofleet.cli"]
        ports = {f"processor-{i}": free_port() for i in range(args.processors)} | {"sink": free_port()}
        commands = {name: [*cli, "process" if name.startswith("processor") else "sink",
                           "--metrics-port", str(port), "--log-level", "warning"]
                    for name, port in ports.items()}
        supervisor = Supervisor(commands, child_env(settings), workdir / "logs")
        poller = RowPoller(settings)
        producer = AudioReferenceProducer(settings.kafka, make_codec())
        started = time.monotonic()
        supervisor.start()
        try:
            def all_ready() -> bool:
                supervisor.check()
                if supervisor.restarts:
                    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                                      for p in (workdir / "logs").glob("*.log"))
                    raise RuntimeError(f"a child exited during startup:\n{tails}")
                return all(ready(port) for port in ports.values())

            wait_for(all_ready, 120, "every child's /readyz")
            log(f"children ready in {time.monotonic() - started:.1f} s (processors loaded the model, "
                "partitions assigned, sink accepting inserts)")
            poller.start()
            for path in warmup_paths:
                producer.send(make_reference({"uri": path.resolve().as_uri(), "source": "bench-warmup"}))
            producer.flush(30)
            wait_for(lambda: len(poller.rows) >= len(warmup_paths), 60, "the warm-up rows")
            warm_keys = set(poller.rows)
            log(f"warm-up rows visible; producing {args.rate:g} references/s for {args.seconds:g} s")

            interval = 1.0 / args.rate
            begin = time.perf_counter()
            late = 0.0
            for index, path in enumerate(paths):
                due = begin + index * interval
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                else:
                    late = max(late, -pause)
                producer.send(make_reference({"uri": path.resolve().as_uri(), "tenant": "bench",
                                              "source": f"line-{index % 5}"}))
            produce_seconds = time.perf_counter() - begin
            report = producer.flush(30)
            if report.failed:
                raise RuntimeError(f"producing failed: {report.failed[:3]}")
            log(f"produced {count} in {produce_seconds:.1f} s (at most {late * 1000:.0f} ms behind schedule); "
                "waiting for the rows")
            deadline = time.monotonic() + 60
            while len(poller.rows) - len(warm_keys) < count and time.monotonic() < deadline:
                supervisor.check()
                time.sleep(0.1)
            poller.stop()
        finally:
            poller.stop()
            supervisor.stop()
            producer.flush(5)
            del producer  # close its connections before the broker stops
            delete_redis_prefix(redis_url, settings.cache.key_prefix)
        rows = [row for key, row in poller.rows.items() if key not in warm_keys]
        if supervisor.restarts:
            log(f"WARNING: {supervisor.restarts} child restart(s) during the run; logs in {workdir / 'logs'}")
        if len(rows) < count:
            tail = (workdir / "logs" / "sink.log").read_text()[-1500:]
            raise RuntimeError(f"only {len(rows)} of {count} rows became visible within 60 s; sink log tail:\n{tail}")
    report_latency(args, rows, produce_seconds, poller)


def report_latency(args: argparse.Namespace, rows: list[dict[str, Any]], produce_seconds: float,
                   poller: RowPoller) -> None:
    def ms(row: dict[str, Any], name: str) -> float:
        return float(row[name])

    spans = {
        "produce -> row visible in ClickHouse (polled)": [r["visible_ms"] - ms(r, "produced_ms") for r in rows],
        "produce -> processed_at (processor)": [ms(r, "processed_ms") - ms(r, "produced_ms") for r in rows],
        "processed_at -> inserted_at (= consumed by the sink)": [ms(r, "inserted_ms") - ms(r, "processed_ms")
                                                                  for r in rows],
        "inserted_at -> row visible (sink batch wait + insert + poll)": [r["visible_ms"] - ms(r, "inserted_ms")
                                                                          for r in rows],
        "produce -> inserted_at": [ms(r, "inserted_ms") - ms(r, "produced_ms") for r in rows],
    }
    table = []
    for name, values in spans.items():
        table.append([name, len(values), percentile(values, 50), percentile(values, 95), percentile(values, 99),
                      max(values), sum(values) / len(values)])
    first_produced = min(ms(r, "produced_ms") for r in rows)
    last_visible = max(r["visible_ms"] for r in rows)
    print(f"\n### End-to-end latency, tiny model: {args.rate:g} references/s for {args.seconds:g} s "
          f"({len(rows)} distinct clips of {args.min_seconds:g}-{args.max_seconds:g} s, {args.processors} processor "
          f"process(es) + the sink as child processes; {machine_line()})\n")
    print(markdown_table(["span (ms)", "refs", "P50", "P95", "P99", "max", "mean"], table))
    queries = sorted(poller.query_seconds)
    print(f"\nthroughput: produced {len(rows) / produce_seconds:.1f} refs/s; stored {len(rows)} rows in "
          f"{(last_visible - first_produced) / 1000:.1f} s from the first produce to the last row visible "
          f"({len(rows) / ((last_visible - first_produced) / 1000):.1f} rows/s). Poller: {poller.polls} polls every "
          f"{POLL_SECONDS * 1000:.0f} ms, query P50 {percentile(queries, 50) * 1000:.0f} ms / "
          f"max {queries[-1] * 1000:.0f} ms through the sink's query server.")


if __name__ == "__main__":
    main()
