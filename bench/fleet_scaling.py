"""Fleet scaling with the simulated accelerator: 1 -> 2 -> 4 -> 8 processors on 8 partitions, then 8 -> 4.

    python bench/fleet_scaling.py [--device simulated:10,5] [--phase-seconds 20] [--rate 15] [--plot PATH]

Each member is a real ``emofleet process --model <device>`` process (the simulated accelerator models one GPU
per processor) against one embedded Tansu broker and the local Redis. This 2-core machine cannot run eight
processors feeding eight real GPUs, so the modelled GPU is slow: ``simulated:10,5`` scores 10 audio-s/s
(+5 ms per forward), i.e. ~10 clips/s of the 1 s clips used here, and eight of them (~80 clips/s in all)
leave CPU to spare for the data path. What is measured is the fleet's scaling, not the device.

Load: a backlog of ``--backlog`` references is produced first, then ``--rate`` references/s (above one
member's capacity) for the whole run, every reference a distinct clip (so the dedupe cache never short-cuts
the model). The backlog is sized so every member stays saturated in every phase. Phases of
``--phase-seconds`` (45): 1 member, then members are started to make 2, 4 and 8, then 4 are stopped (SIGTERM: a
clean stop) to leave 4. Production then stops and the remaining members drain the topic.

Printed: throughput per member count (completions/s over the last 30% of each phase) against N x the
one-member throughput (target >= 0.9), the time from a member change until the throughput moved half-way to
its new level, references lost (produced, never answered) and duplicated (answered more than once), and a
PNG of throughput and backlog (produced minus answered: the consumer lag in references) over time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feed_path import CACHE as FEED_CACHE, cpu_capabilities, synth  # noqa: E402
from harness import bench_settings, create_pipeline_topics, log, machine_line, markdown_table, require_redis  # noqa: E402

CLIP_SECONDS = 1.0
PARTITIONS = 8
CACHE = FEED_CACHE.parent / "fleet"
MEMBER_COUNTS = (1, 2, 4, 8)
AFTER_REMOVAL = 4
STEADY_FRACTION = 0.3  # a phase's throughput: its last 30% (a change takes ~20 s to settle on Tansu)


def clips(count: int) -> list[Path]:
    import soundfile as sf

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = [CACHE / f"clip-{i:05d}.wav" for i in range(count)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        log(f"writing {len(missing)} 1 s clips to {CACHE} (once)")
        for index, path in missing:
            sf.write(path, synth(16_000, 1, 7_000_000 + index, CLIP_SECONDS), 16_000, subtype="PCM_16")
    return paths


@dataclass
class Member:
    process: subprocess.Popen
    port: int
    started: float

    def assigned(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("emofleet_assigned_partitions "):
                return int(float(line.split()[1]))
        return 0


class Fleet:
    def __init__(self, env: dict[str, str], device: str, workdir: Path) -> None:
        self._env = env
        self._device = device
        self._workdir = workdir
        self.members: list[Member] = []

    def add(self) -> None:
        from emofleet.infra.local_stack import free_port

        port = free_port()
        index = len(self.members)
        env = {**self._env, "EMOFLEET_OBSERVABILITY_METRICS_PORT": str(port),
               "EMOFLEET_KAFKA_GROUP_INSTANCE_ID": "", "EMOFLEET_OBSERVABILITY_LOG_FORMAT": "text"}
        with open(self._workdir / f"member-{index}.log", "ab") as output:
            process = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "process", "--model", self._device,
                                        "--log-level", "warning"], env=env, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.members.append(Member(process, port, time.monotonic()))

    def remove(self, count: int) -> list[float]:
        """SIGTERM the last ``count`` members (a clean stop); seconds each took to exit (killed after 60 s: inf)."""
        started = time.monotonic()
        for member in self.members[-count:]:
            member.process.send_signal(signal.SIGTERM)
        exits = []
        for member in self.members[-count:]:
            try:
                member.process.wait(max(0.1, started + 60 - time.monotonic()))
                exits.append(time.monotonic() - started)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
                exits.append(float("inf"))
        del self.members[-count:]
        return exits

    def spread(self) -> str:
        """Partitions per member, as their metrics say."""
        return "/".join(str(m.assigned()) for m in self.members)

    def all_assigned(self) -> bool:
        counts = [m.assigned() for m in self.members]
        return sum(counts) == PARTITIONS and all(counts)

    def stop(self) -> None:
        for member in self.members:
            if member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        for member in self.members:
            try:
                member.process.wait(60)
            except subprocess.TimeoutExpired:
                member.process.kill()
        self.members = []


class Answers:
    """Reads whole-clip results; keeps each one's arrival time and audio id."""

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        from confluent_kafka.admin import AdminClient

        from emofleet.schemas.codec import make_codec

        kafka = settings.kafka
        self._codec = make_codec()
        self._topic = kafka.results_topic
        partitions = AdminClient(kafka.client_config()).list_topics(timeout=10).topics[kafka.results_topic].partitions
        self._consumer = Consumer(kafka.client_config() | {"group.id": f"{kafka.processor_group}.answers",
                                                           "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self._consumer.assign([TopicPartition(kafka.results_topic, p, OFFSET_BEGINNING) for p in partitions])
        self.arrivals: list[tuple[float, str]] = []
        self.models: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="answers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(num_messages=1000, timeout=0.05):
                if message.error() is not None:
                    continue
                event = self._codec.decode("emotion_event", message.value(), topic=self._topic)
                if event["segment_index"] == -1:
                    self.arrivals.append((time.monotonic(), event["audio_id"]))
                    self.models.add(event["model_id"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


class Load:
    """The backlog, then ``rate`` references/s from a thread; remembers what it produced and when."""

    def __init__(self, settings, uris: list[str]) -> None:  # type: ignore[no-untyped-def]
        from emofleet.schemas.codec import make_codec
        from emofleet.streams.producer import AudioReferenceProducer

        self._producer = AudioReferenceProducer(settings.kafka, make_codec())
        self._uris = iter(uris)
        self.sent: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, count: int) -> None:
        from emofleet.streams.references import make_reference

        for uri in itertools.islice(self._uris, count):
            reference = make_reference({"uri": uri, "tenant": "bench", "source": "fleet"})
            self._producer.send(reference)
            self.sent.append((time.monotonic(), reference["audio_id"]))

    def start(self, rate: float) -> None:
        def run() -> None:
            started = time.monotonic()
            while not self._stop.is_set():
                due = int((time.monotonic() - started) * rate) - self._steady
                if due > 0:
                    self.send(due)
                    self._steady += due
                self._stop.wait(0.01)

        self._steady = 0
        self._thread = threading.Thread(target=run, name="load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        report = self._producer.flush()
        if report.failed:
            raise RuntimeError(f"producing references failed: {report.failed[:3]}")


def rate_between(arrivals: list[float], start: float, end: float) -> float:
    return sum(1 for t in arrivals if start <= t < end) / (end - start) if end > start else float("nan")


def time_to_change(arrivals: list[float], at: float, before: float, after: float, window: float = 5.0) -> float:
    """Seconds from ``at`` until the rolling ``window`` s throughput first got half-way from ``before`` to ``after``."""
    half = before + (after - before) / 2
    t = at
    last = max(arrivals, default=at)
    while t + window <= last:
        rate = rate_between(arrivals, t, t + window)
        if (after > before and rate >= half) or (after < before and rate <= half):
            return t + window - at
        t += 0.1
    return float("nan")


def plot(path: Path, origin: float, arrivals: list[float], sent: list[float], changes: list[tuple[float, str]],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(arrivals + sent) - origin
    seconds = [i * 0.5 for i in range(int(end / 0.5) + 1)]
    throughput = [rate_between(arrivals, origin + s - 2.0, origin + s + 2.0) for s in seconds]
    backlog = [sum(1 for t in sent if t <= origin + s) - sum(1 for t in arrivals if t <= origin + s) for s in seconds]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.plot(seconds, throughput, color="tab:blue")
    top.set_ylabel("answered references/s (4 s window)")
    bottom.plot(seconds, backlog, color="tab:red")
    bottom.set_ylabel("backlog: produced - answered")
    bottom.set_xlabel("seconds")
    for at, label in changes:
        for axis in (top, bottom):
            axis.axvline(at - origin, color="gray", linestyle="--", linewidth=0.8)
        top.annotate(label, (at - origin, top.get_ylim()[1]), fontsize=8, va="top")
    top.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="simulated:10,5", help="each member's modelled GPU (default simulated:10,5)")
    parser.add_argument("--phase-seconds", type=float, default=45.0)
    parser.add_argument("--rate", type=float, default=15.0, help="steady references/s after the backlog (default 15)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="references produced up front (default: enough to keep every phase saturated)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "out" / "fleet-scaling.png")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    from emofleet.core.config import BatchSettings, to_env
    from emofleet.infra.local_stack import start_broker, stop_process
    from emofleet.processors.simulated_model import parse_simulated
    from harness import delete_redis_prefix, workspace

    device = parse_simulated(args.device)
    one = device.audio_seconds_per_second / CLIP_SECONDS  # clips/s of one modelled device, upper bound
    phase = args.phase_seconds
    consumed = sum(n * one * phase for n in MEMBER_COUNTS) + AFTER_REMOVAL * one * phase
    produced_steady = args.rate * phase * (len(MEMBER_COUNTS) + 1)
    backlog = args.backlog or int(max(0.0, consumed - produced_steady) * 1.2 + one * phase)
    total = backlog + int(produced_steady + args.rate * 120)  # removing members takes a while: spare clips
    redis_url = require_redis(args.redis_url)
    uris = [p.resolve().as_uri() for p in clips(total)]

    with workspace("emofleet-bench-fleet-") as workdir:
        broker, bootstrap = start_broker(workdir / "broker.log")
        settings = bench_settings(bootstrap, redis_url, "fleet", workdir / "data", file_roots=(CACHE,),
                                  partitions=PARTITIONS, batch=BatchSettings(max_wait_ms=50))
        settings = replace(settings, kafka=replace(settings.kafka, leave_group_on_close=False))
        create_pipeline_topics(settings)
        fleet = Fleet({**os.environ, **to_env(settings)}, args.device, workdir)
        answers = Answers(settings)
        load = Load(settings, uris)
        changes: list[tuple[float, str, int, int]] = []  # (time, label, members before, after)
        try:
            fleet.add()
            deadline = time.monotonic() + 90
            while not fleet.all_assigned():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the first member did not get its partitions: see {workdir}/member-0.log")
                time.sleep(0.2)
            log(f"1 member up; producing a backlog of {backlog} references, then {args.rate:g}/s")
            origin = time.monotonic()
            load.send(backlog)
            load.start(args.rate)
            changes.append((origin, "1 member", 0, 1))
            time.sleep(phase)
            spread = [fleet.spread()]
            for count in MEMBER_COUNTS[1:]:
                before = len(fleet.members)
                at = time.monotonic()
                while len(fleet.members) < count:
                    fleet.add()
                changes.append((at, f"+{count - before} -> {count}", before, count))
                log(f"{count} members")
                time.sleep(phase)
                spread.append(fleet.spread())
            at = time.monotonic()
            exits = fleet.remove(len(fleet.members) - AFTER_REMOVAL)
            log(f"removed members exited after {', '.join(f'{e:.1f}' for e in exits)} s")
            changes.append((at, f"-4 -> {AFTER_REMOVAL}", MEMBER_COUNTS[-1], AFTER_REMOVAL))
            log(f"{AFTER_REMOVAL} members")
            time.sleep(phase)
            spread.append(fleet.spread())
            end_of_load = time.monotonic()
            load.stop()
            expected = {audio_id for _, audio_id in load.sent}
            deadline = time.monotonic() + 60 + len(expected) / max(1.0, AFTER_REMOVAL * one)
            while {a for _, a in answers.arrivals} < expected and time.monotonic() < deadline:
                time.sleep(0.5)
            log("drained" if {a for _, a in answers.arrivals} >= expected else "drain timed out")
        finally:
            fleet.stop()
            answers.close()
            stop_process(broker.pid)
            delete_redis_prefix(redis_url, settings.cache.key_prefix)

    ids = [a for _, a in answers.arrivals]
    first_answer: dict[str, float] = {}
    for t, audio_id in answers.arrivals:
        first_answer.setdefault(audio_id, t)
    arrivals = sorted(first_answer.values())  # a duplicate answer is not throughput
    lost = len(expected - set(ids))
    duplicated = len(ids) - len(set(ids))
    bounds = [t for t, *_ in changes] + [end_of_load]
    plateaus = []
    for (at, label, _before, after), end in zip(changes, bounds[1:]):
        steady_from = at + (1 - STEADY_FRACTION) * (end - at)
        plateaus.append((label, after, rate_between(arrivals, steady_from, end)))
    single = plateaus[0][2]
    rows = []
    for index, ((at, label, before, after), (_, members, rate)) in enumerate(zip(changes, plateaus)):
        expected_rate = members * single
        change = time_to_change(arrivals, at, plateaus[index - 1][2], rate) if index else float("nan")
        rows.append([label, members, spread[index], rate, f"{rate / expected_rate:.2f}", change])
    print(f"\n### Fleet scaling: `{args.device}` per member (~{one:g} clips/s of 1 s clips each), {PARTITIONS} "
          f"partitions, backlog {backlog} + {args.rate:g} refs/s, phases of {phase:g} s ({cpu_capabilities()}; "
          f"{machine_line()})\n")
    print(markdown_table(["phase", "members", "partitions per member at the phase's end",
                          "answered refs/s (last 30% of phase)", "vs N x one member",
                          "s until half-way to the new rate (5 s window)"], rows))
    print(f"\nStopped members (SIGTERM) exited after {', '.join(f'{e:.1f}' for e in exits)} s (inf: killed at 60 s).")
    print(f"References produced {len(expected)}, answered {len(set(ids))}: lost {lost}, duplicated {duplicated}. "
          f"Events' model ids: {sorted(answers.models)}.")
    verdict = all(float(r[4]) >= 0.9 for r in rows)
    print(f"Target >= 0.9 x N x one member in every phase: **{'PASS' if verdict else 'FAIL'}**; "
          f"lost = duplicated = 0: **{'PASS' if lost == duplicated == 0 else 'FAIL'}**")
    plot(args.plot, changes[0][0], arrivals, [t for t, _ in load.sent], [(t, label) for t, label, *_ in changes],
         f"{args.device} per member, {PARTITIONS} partitions")
    print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
