"""`emofleet bench`: offered load against the pipeline, measured from outside.

What it does:

1. Starts the pipeline as `emofleet up` does (the backend from ``EMOFLEET_BACKEND``, topics, processors,
   sink and aggregator as supervised child processes), or with ``--attach`` uses one that already runs
   (e.g. `emofleet up --keep-running`): the broker and ClickHouse from the settings, the processes found
   in ``/proc`` by their command lines.
2. Writes generated clips (distinct audio unless ``--repeat-fraction`` asks for repeats, which the
   dedupe cache should answer) under ``<data dir>/samples/bench-<run>`` (a directory `emofleet up`
   lets processors read), sends ``--warmup`` references and waits for their rows (model loads, first
   inserts: not measured).
3. Produces references at ``--rate`` per second (0: all at once, as fast as the producer goes) for
   ``--duration`` seconds or ``--refs`` references, each built just before it is sent, so its
   ``produced_at`` is its send time. ``--poison-fraction`` of them name a missing file (dead letters).
4. Meanwhile, every ``--interval`` seconds: CPU (utime+stime deltas) and RSS of every pipeline process
   from ``/proc``, and ClickHouse's count of this run's outcomes; it stops when every reference has a
   row or a dead letter, or ``--timeout`` seconds after the last one was sent.

Measured from ClickHouse afterwards, per reference of the run (``audio_id`` ``bench-<run>-m-<n>``; the
warm-up's are ``bench-<run>-w-<n>``):

* end-to-end latency = ``inserted_at - reference_produced_at`` of its whole-clip row (the sink stamps
  ``inserted_at`` when the insert is sent, so this is produce -> row written), P50/P95/P99/max;
* sustained throughput = stored outcomes / (last ``inserted_at`` - first send), and per second over time;
* dead-letter rate (dead letters / references) and cache hit rate (share of rows with ``cache_hit``).

Writes ``bench.json``, ``bench.md`` and ``bench.png`` (throughput, latency and CPU over time) into
``--out`` (default ``<data dir>/bench/<run>``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

QueryRunner = Callable[[str, dict[str, Any]], list[dict[str, Any]]]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ROLES = {"process": "processor", "sink": "sink", "aggregate": "aggregator"}


class BenchError(RuntimeError):
    """The bench could not measure (the pipeline never answered); the message says what to look at."""


@dataclass(frozen=True)
class BenchOptions:
    rate: float = 10.0  # references per second; 0 = as fast as possible
    duration: float = 30.0  # seconds of load (ignored when refs is set)
    refs: int = 0  # exact number of references (0: rate x duration)
    min_seconds: float = 1.0  # clip length range
    max_seconds: float = 4.0
    repeat_fraction: float = 0.0  # share of references that reuse an earlier clip (cache hits)
    poison_fraction: float = 0.0  # share of references naming a missing file (dead letters)
    warmup: int = 5
    timeout: float = 600.0  # give up this long after the last reference was sent
    interval: float = 1.0  # sampling period (processes, progress)
    out: Path | None = None

    @property
    def total(self) -> int:
        if self.refs:
            return self.refs
        return max(1, round(self.rate * self.duration)) if self.rate > 0 else 200


# ---------------------------------------------------------------------------------------- processes


def read_proc(pid: int) -> tuple[float, float] | None:
    """(cpu seconds used so far, RSS in MB) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status", "rb") as handle:
            rss_kb = next((int(line.split()[1]) for line in handle if line.startswith(b"VmRSS:")), 0)
    except (OSError, ValueError, IndexError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)
    return cpu, rss_kb / 1024


def find_pipeline_processes() -> dict[str, int]:
    """Running `emofleet process|sink|aggregate` processes, by role and order of start (for --attach)."""
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            words = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        for i, word in enumerate(words[:-1]):
            if word in ("emofleet.cli", "emofleet") or word.endswith("/emofleet"):
                if words[i + 1] in _ROLES:
                    found.append((int(entry), _ROLES[words[i + 1]]))
                break
    names: dict[str, int] = {}
    for pid, label in sorted(found):
        count = sum(1 for name in names if name.startswith(label))
        names[f"{label}-{count}"] = pid
    return names


class ProcessSampler:
    """CPU % (of one core) and RSS per named process, sampled on demand; names may change pid (restarts)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float, float]] = {}  # name: (pid, monotonic, cpu seconds)
        self.samples: dict[str, list[tuple[float, float, float]]] = {}  # name: [(t, cpu %, rss MB)]
        self.pids: dict[str, list[int]] = {}

    def sample(self, processes: dict[str, int], t: float) -> None:
        now = time.monotonic()
        for name, pid in processes.items():
            reading = read_proc(pid)
            if reading is None:
                continue
            cpu, rss = reading
            if pid not in self.pids.setdefault(name, []):
                self.pids[name].append(pid)
            last = self._last.get(name)
            if last is not None and last[0] == pid and now - last[1] < 0.2:
                continue  # too short an interval to say anything
            self._last[name] = (pid, now, cpu)
            if last is None or last[0] != pid:
                continue  # first reading of this pid: no interval yet
            self.samples.setdefault(name, []).append((t, 100.0 * (cpu - last[2]) / (now - last[1]), rss))

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, rows in self.samples.items():
            cpu = [r[1] for r in rows]
            rss = [r[2] for r in rows]
            out[name] = {"pids": self.pids.get(name, []), "cpu_percent_mean": round(sum(cpu) / len(cpu), 1),
                         "cpu_percent_max": round(max(cpu), 1), "rss_mb_mean": round(sum(rss) / len(rss), 1),
                         "rss_mb_max": round(max(rss), 1), "restarts": max(0, len(self.pids.get(name, [])) - 1)}
        return out


# ---------------------------------------------------------------------------------------- load


@dataclass
class Sent:
    at: list[float] = field(default_factory=list)  # epoch seconds per reference sent
    failed: list[str] = field(default_factory=list)


def make_clips(directory: Path, options: BenchOptions, count: int) -> list[str]:
    """One file:// URI per reference: distinct clips, some repeated (--repeat-fraction), some missing."""
    import random

    from emofleet.samples import write_samples

    distinct = max(1, round(count * (1 - options.repeat_fraction)))
    rng = random.Random()
    seed = rng.randrange(1, 10**6)  # audio no earlier run (and so no cache) has seen
    paths = [p.resolve().as_uri() for p in write_samples(directory, distinct, min_seconds=options.min_seconds,
                                                         max_seconds=options.max_seconds, seed=seed)]
    uris = []
    for n in range(count):
        if int((n + 1) * options.poison_fraction) > int(n * options.poison_fraction):  # exactly that share
            uris.append((directory / f"missing-{n}.wav").resolve().as_uri())
        elif n < distinct:
            uris.append(paths[n])
        else:
            uris.append(paths[rng.randrange(min(n, distinct))])
    return uris


def produce(settings: Any, run: str, uris: list[str], rate: float, sent: Sent, *,
            stop: threading.Event | None = None) -> None:
    """Send one reference per URI at ``rate`` per second (0: unpaced); ids ``bench-<run>-<n>``."""
    from emofleet.schemas.codec import make_codec
    from emofleet.streams.producer import AudioReferenceProducer
    from emofleet.streams.references import make_reference

    stop = stop or threading.Event()
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    with AudioReferenceProducer(settings.kafka, codec,
                                **{"linger.ms": 5}) as producer:
        began = time.monotonic()
        for i, uri in enumerate(uris):
            if rate > 0 and (delay := began + i / rate - time.monotonic()) > 0:
                if stop.wait(delay):  # pacing the offered load
                    break
            reference = make_reference({"uri": uri, "audio_id": f"bench-{run}-{i}",
                                        "tenant": "bench", "source": run})
            sent.at.append(reference["produced_at"] / 1000)
            producer.send(reference)
    sent.failed += [f"{audio_id}: {reason}" for audio_id, reason in producer.report.failed]


# ---------------------------------------------------------------------------------------- ClickHouse


def settled(run: QueryRunner, database: str, prefix: str) -> int:
    (events,) = run(f"SELECT uniqExact(audio_id) AS n FROM {database}.emotion_events "
                    "WHERE segment_index = -1 AND startsWith(audio_id, {p:String})", {"p": prefix})
    (dead,) = run(f"SELECT uniqExact(audio_id) AS n FROM {database}.dead_letters "
                  "WHERE startsWith(audio_id, {p:String})", {"p": prefix})
    return int(events["n"]) + int(dead["n"])


def _epoch(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def outcomes(run: QueryRunner, database: str, prefix: str) -> tuple[list[tuple[float, float, bool]], list[float]]:
    """([(produced, inserted, cache_hit)] of whole-clip rows, [inserted] of dead letters) of this run."""
    rows = run(f"SELECT reference_produced_at AS produced, min(inserted_at) AS inserted, max(cache_hit) AS hit "
               f"FROM {database}.emotion_events WHERE segment_index = -1 AND startsWith(audio_id, {{p:String}}) "
               "GROUP BY audio_id, reference_produced_at", {"p": prefix})
    dead = run(f"SELECT min(inserted_at) AS inserted FROM {database}.dead_letters "
               "WHERE startsWith(audio_id, {p:String}) GROUP BY audio_id", {"p": prefix})
    return ([(_epoch(r["produced"]), _epoch(r["inserted"]), bool(r["hit"])) for r in rows],
            [_epoch(r["inserted"]) for r in dead])


# ---------------------------------------------------------------------------------------- the run


def run_bench(settings: Any, options: BenchOptions, *, runner: Callable[[], QueryRunner | None],
              processes: Callable[[], dict[str, int]], check: Callable[[], None] = lambda: None,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm up, offer the load, follow it into ClickHouse, sample processes; returns the report."""
    from emofleet.sinks.query_server import QueryError

    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    out = options.out or settings.data_dir / "bench" / run_id
    clips = (settings.data_dir / "samples" / f"bench-{run_id}").resolve()
    database = settings.clickhouse.database
    total = options.total
    say(f"bench {run_id}: writing {total + options.warmup} clips under {clips}")
    uris = make_clips(clips, options, total + options.warmup)

    def follow(prefix: str, expected: int, timeout: float, sampler: ProcessSampler | None = None, t0: float = 0.0,
               progress: list[tuple[float, int]] | None = None, producing: threading.Thread | None = None) -> int:
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            check()
            now = time.time()
            if sampler is not None:
                sampler.sample(processes(), now - t0)
            if (run := runner()) is not None:
                try:
                    done = settled(run, database, prefix)
                except QueryError:
                    pass  # the sink is starting or restarting
            if progress is not None:
                progress.append((now - t0, done))
            if done >= expected or (time.monotonic() > deadline and not (producing and producing.is_alive())):
                return done
            if producing is not None and producing.is_alive():
                deadline = time.monotonic() + timeout  # the timeout runs from the last reference sent
            time.sleep(options.interval)  # sampling cadence

    if options.warmup:
        warm = Sent()
        produce(settings, f"{run_id}-w", uris[:options.warmup], 0, warm)
        say(f"warm-up: {options.warmup} references sent, waiting for their rows (model load, first insert)")
        if follow(f"bench-{run_id}-w-", options.warmup, options.timeout) < options.warmup:
            raise BenchError(f"warm-up references did not reach ClickHouse within {options.timeout:.0f} s; "
                               f"see the logs under {settings.data_dir / 'logs'}")
    expected = total
    prefix = f"bench-{run_id}-m-"
    sent = Sent()
    sampler = ProcessSampler()
    progress: list[tuple[float, int]] = []
    t0 = time.time()
    sampler.sample(processes(), 0.0)
    say(f"offering {total} references at {options.rate or 'max'}/s")
    producer = threading.Thread(target=produce, name="bench-producer", daemon=True,
                                args=(settings, f"{run_id}-m", uris[options.warmup:], options.rate, sent))
    producer.start()
    done = follow(prefix, expected, options.timeout, sampler, t0, progress, producer)
    producer.join()
    run = runner()
    if run is None:
        raise BenchError("no way to query ClickHouse (is the sink running?)")
    rows, dead = outcomes(run, database, prefix)
    report = build_report(run_id, settings, options, t0, sent, rows, dead, sampler, progress, done, expected)
    write_outputs(report, Path(out))
    say(f"report: {out}/bench.md, bench.json, bench.png")
    return report


def build_report(run_id: str, settings: Any, options: BenchOptions, t0: float, sent: Sent,
                 rows: list[tuple[float, float, bool]], dead: list[float], sampler: ProcessSampler,
                 progress: list[tuple[float, int]], done: int, expected: int) -> dict[str, Any]:
    measured = rows
    latencies = [inserted - produced for produced, inserted, _ in measured]
    dead_measured = dead
    stored_times = sorted([inserted for _, inserted, _ in measured] + dead_measured)
    first_sent = min(sent.at) if sent.at else t0
    last_sent = max(sent.at) if sent.at else t0
    span = (stored_times[-1] - first_sent) if stored_times else 0.0
    outcomes_n = len(measured) + len(dead_measured)
    seconds = int(max([0.0, *(t - t0 for t in stored_times), *(t - t0 for t in sent.at)])) + 1
    per_second = []
    for second in range(seconds):
        lo, hi = t0 + second, t0 + second + 1
        window = [i - p for p, i, _ in measured if lo <= i < hi]
        per_second.append({
            "t": second,
            "sent": sum(1 for s in sent.at if lo <= s < hi),
            "stored": sum(1 for s in stored_times if lo <= s < hi),
            "latency_p50": round(percentile(window, 50), 3) if window else None,
            "latency_p95": round(percentile(window, 95), 3) if window else None,
        })
    return {
        "run": run_id,
        "started": datetime.fromtimestamp(t0, UTC).isoformat(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "model": settings.model.model,
        "pipeline": {"bootstrap_servers": settings.kafka.bootstrap_servers, "audio_topic": settings.kafka.audio_topic,
                     "partitions": settings.kafka.partitions, "clickhouse_database": settings.clickhouse.database},
        "references": len(sent.at),
        "send_failures": sent.failed,
        "stored": len(measured),
        "dead_lettered": len(dead_measured),
        "missing": max(0, len(sent.at) - outcomes_n),
        "complete": done >= expected,
        "offered_refs_per_s": round(len(sent.at) / (last_sent - first_sent), 2) if last_sent > first_sent else None,
        "sustained_refs_per_s": round(outcomes_n / span, 2) if span > 0 else None,
        "latency_seconds": ({"p50": round(percentile(latencies, 50), 3), "p95": round(percentile(latencies, 95), 3),
                             "p99": round(percentile(latencies, 99), 3), "max": round(max(latencies), 3),
                             "mean": round(sum(latencies) / len(latencies), 3)} if latencies else None),
        "dead_letter_rate": round(len(dead_measured) / len(sent.at), 4) if sent.at else None,
        "cache_hit_rate": round(sum(1 for *_, hit in measured if hit) / len(measured), 4) if measured else None,
        "processes": sampler.summary(),
        "timeline": per_second,
        "process_timeline": {name: [[round(t, 2), round(c, 1), round(r, 1)] for t, c, r in samples]
                             for name, samples in sampler.samples.items()},
        "progress": [[round(t, 2), n] for t, n in progress],
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }


# ---------------------------------------------------------------------------------------- outputs


def markdown(report: dict[str, Any]) -> str:
    latency = report["latency_seconds"] or {}
    opts = report["options"]

    def num(value: Any, unit: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, int) or abs(value) >= 100:
            return f"{value:,.0f}{unit}"
        return f"{value:.3g}{unit}"

    lines = [
        f"# emofleet bench {report['run']}",
        "",
        f"Model `{report['model']}`, {report['pipeline']['partitions']} partitions, offered "
        f"{opts['rate'] or 'max'} refs/s, clips {opts['min_seconds']}-{opts['max_seconds']} s, repeat fraction "
        f"{opts['repeat_fraction']}, poison fraction {opts['poison_fraction']}; started {report['started']}; "
        f"{report['machine']['cpus']} CPUs, load average at the end {report['machine']['load_average']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| references sent | {num(report['references'])} |",
        f"| stored / dead-lettered / missing | {num(report['stored'])} / {num(report['dead_lettered'])} / "
        f"{num(report['missing'])} |",
        f"| offered refs/s | {num(report['offered_refs_per_s'])} |",
        f"| sustained refs/s (outcomes / (last row - first send)) | {num(report['sustained_refs_per_s'])} |",
        f"| end-to-end latency P50 / P95 / P99 / max (produce -> row inserted) | {num(latency.get('p50'), ' s')} / "
        f"{num(latency.get('p95'), ' s')} / {num(latency.get('p99'), ' s')} / {num(latency.get('max'), ' s')} |",
        f"| dead-letter rate | {num(report['dead_letter_rate'])} |",
        f"| cache hit rate | {num(report['cache_hit_rate'])} |",
        "",
        "| process | pids | CPU % mean (of one core) | CPU % max | RSS MB mean | RSS MB max | restarts |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in sorted(report["processes"].items()):
        lines.append(f"| {name} | {', '.join(map(str, p['pids']))} | {p['cpu_percent_mean']} | "
                     f"{p['cpu_percent_max']} | {p['rss_mb_mean']} | {p['rss_mb_max']} | {p['restarts']} |")
    if not report["complete"]:
        lines += ["", f"**Incomplete**: {report['missing']} references had no outcome when the bench gave up."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    t = [row["t"] for row in timeline]
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    top.plot(t, [row["sent"] for row in timeline], label="sent refs/s", drawstyle="steps-post")
    stored = [row["stored"] for row in timeline]
    top.plot(t, stored, label="stored refs/s", drawstyle="steps-post", alpha=0.4)
    smooth = [sum(stored[max(0, i - 4):i + 1]) / len(stored[max(0, i - 4):i + 1]) for i in range(len(stored))]
    top.plot(t, smooth, label="stored refs/s (5 s mean)")
    top.set_ylabel("references / s")
    top.legend(loc="upper right")
    top.set_title(f"emofleet bench {report['run']} ({report['model']})")
    for key, label in (("latency_p50", "P50"), ("latency_p95", "P95")):
        points = [(row["t"], row[key]) for row in timeline if row[key] is not None]
        if points:
            middle.plot(*zip(*points, strict=True), marker=".", label=f"latency {label}")
    middle.set_ylabel("produce -> row (s)")
    middle.legend(loc="upper right")
    for name, samples in sorted(report["process_timeline"].items()):
        if samples:
            bottom.plot([s[0] for s in samples], [s[1] for s in samples], label=name)
    bottom.set_ylabel("CPU % (one core)")
    bottom.set_xlabel("seconds since the load started")
    if report["process_timeline"]:
        bottom.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")


# ---------------------------------------------------------------------------------------- command line


def stack_processes(data_dir: Path) -> dict[str, int]:
    """The embedded stack's broker (and the Redis it started), when one runs."""
    from emofleet.infra.local_stack import LocalStack

    state = LocalStack(data_dir, "").read_state()
    if state is None:
        return {}
    return {"broker": state.broker_pid} | ({"redis": state.redis_pid} if state.redis_pid else {})


def _fraction(text: str) -> float:
    import argparse

    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    import argparse

    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_arguments(parser: Any) -> None:
    """`emofleet bench` options (the CLI adds --data-dir and --bootstrap-servers)."""
    parser.add_argument("--rate", type=_non_negative, default=10.0,
                        help="references per second (0: as fast as possible; default 10)")
    parser.add_argument("--duration", type=_non_negative, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--refs", type=int, default=0,
                        help="send exactly this many references (default: rate x duration; 200 with --rate 0)")
    parser.add_argument("--attach", action="store_true",
                        help="measure a pipeline that already runs (e.g. `emofleet up --keep-running`) instead of "
                             "starting one; its processors must be allowed to read <data dir>/samples")
    parser.add_argument("--processors", type=int, default=2, help="processor processes to start (default 2)")
    parser.add_argument("--model", dest="model__model",
                        help="tiny | a local model dir | a hub id (default iic/emotion2vec_plus_large)")
    parser.add_argument("--min-seconds", type=_non_negative, default=1.0, help="shortest clip (default 1)")
    parser.add_argument("--max-seconds", type=_non_negative, default=4.0, help="longest clip (default 4)")
    parser.add_argument("--repeat-fraction", type=_fraction, default=0.0,
                        help="share of references that repeat an earlier clip, for the cache (default 0)")
    parser.add_argument("--poison-fraction", type=_fraction, default=0.0,
                        help="share of references naming a missing file, for dead letters (default 0)")
    parser.add_argument("--warmup", type=int, default=5, help="references sent and awaited first, not measured")
    parser.add_argument("--timeout", type=_non_negative, default=600.0,
                        help="give up this many seconds after the last reference was sent (default 600)")
    parser.add_argument("--interval", type=_non_negative, default=1.0, help="sampling period in seconds (default 1)")
    parser.add_argument("--out", type=Path, help="report directory (default <data dir>/bench/<run>)")


def options_from(args: Any) -> BenchOptions:
    if args.min_seconds > args.max_seconds or args.max_seconds <= 0:
        raise ValueError(f"--min-seconds {args.min_seconds} / --max-seconds {args.max_seconds}: "
                         "need 0 <= min <= max and max > 0")
    return BenchOptions(rate=args.rate, duration=args.duration, refs=args.refs, min_seconds=args.min_seconds,
                        max_seconds=args.max_seconds, repeat_fraction=args.repeat_fraction,
                        poison_fraction=args.poison_fraction, warmup=args.warmup, timeout=args.timeout,
                        interval=max(0.1, args.interval), out=args.out)
