"""The processor's data path at accelerator speed: one processor process, the real broker and Redis.

    python bench/feed_path.py [--clips 1000] [--formats wav16k,wav44k-stereo,flac48k,mp3,ogg]
                              [--device simulated:5000,2] [--baseline-rev HEAD] [--rounds 2]

Everything around the model is measured: Avro decode, fetch, decode, resample, hashing, the Redis cache,
events, produce and commit. The model is the simulated accelerator (``processors/simulated_model.py``) twice:

* ``simulated:inf`` -- an infinitely fast model: the data path alone, its ceiling in clips/s;
* ``--device`` (default ``simulated:5000,2``: one H100 running emotion2vec+ large in bf16, ~5,000 audio-s/s,
  2 ms per forward) -- how busy the path keeps one such device ("device busy" = model stage / wall).

Per format, ``--clips`` distinct 5 s clips (noise + a tone, one seed each), cached under
``.emofleet/bench-cache/feed-path`` so reruns start at once: 16 kHz mono WAV, 44.1 kHz stereo WAV, 48 kHz
mono FLAC, 44.1 kHz mono MP3 (128 kb/s), 48 kHz mono Ogg Vorbis.

Each run is a fresh child process (``--serve``) holding one processor (``build_processor`` with the model
injected, its consumer loop in a thread) on fresh topics (8 partitions) and a fresh Redis key prefix (every
clip a cache miss). Once it owns every partition the references are produced in one burst; throughput is
counted between the first and the last whole-clip result a reader of the results topic sees (a steady
backlog: start-up and Tansu's first-fetch wait are outside the window). Per-thread CPU time comes from
``/proc/<pid>/task/*/stat`` over the same window; thread names from the child's ``threading``.
``--baseline-rev REV`` runs the same rows on the code at REV, checked out with ``git worktree add`` under
/tmp (the main working tree is not touched), imported through a package directory of symlinks on
PYTHONPATH; both children get the simulated model from THIS tree's file, so only the data path differs.
Rows alternate between the trees within each round; tables show medians over rounds.

Where the GIL is held: a Python thread's CPU time is an upper bound on the time it held the GIL (native
decoding, hashing and resampling release it); "GIL wait" is how late a probe thread in the child wakes
from a 1 ms sleep (median and 90th percentile): ~0 on an idle interpreter, up to the 5 ms switch
interval when other threads keep the GIL busy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".emofleet" / "bench-cache" / "feed-path"
CLIP_SECONDS = 5.0
PARTITIONS = 8
INFINITE = "simulated:inf"
TARGETS = {"wav16k": 1000.0, "wav44k-stereo": 200.0, "flac48k": 200.0, "mp3": 200.0, "ogg": 200.0}
PACKAGES = ("core", "streams", "processors", "schemas", "sinks", "infra")


@dataclass(frozen=True)
class ClipFormat:
    name: str
    suffix: str
    rate: int
    channels: int
    sf_format: str
    subtype: str | None

    def describe(self) -> str:
        return f"{self.sf_format} {self.subtype or ''} {self.rate / 1000:g} kHz {'stereo' if self.channels == 2 else 'mono'}"


FORMATS = {f.name: f for f in (
    ClipFormat("wav16k", "wav", 16_000, 1, "WAV", "PCM_16"),
    ClipFormat("wav44k-stereo", "wav", 44_100, 2, "WAV", "PCM_16"),
    ClipFormat("flac48k", "flac", 48_000, 1, "FLAC", "PCM_16"),
    ClipFormat("mp3", "mp3", 44_100, 1, "MP3", "MPEG_LAYER_III"),
    ClipFormat("ogg", "ogg", 48_000, 1, "OGG", "VORBIS"),
)}


# ------------------------------------------------------------------------------------------ clips


def synth(rate: int, channels: int, seed: int, seconds: float = CLIP_SECONDS) -> Any:
    """Quiet noise plus a tone whose pitch and level depend on the seed: distinct bytes per clip."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * rng.uniform(120, 600) * t)
    signal = tone[:, None] + rng.normal(0, 0.03, (len(t), channels))
    return (signal * rng.uniform(0.5, 1.0)).astype(np.float32)


def write_clip(job: tuple[str, str, int]) -> None:
    import soundfile as sf

    name, path, seed = job
    spec = FORMATS[name]
    sf.write(path, synth(spec.rate, spec.channels, seed), spec.rate, format=spec.sf_format, subtype=spec.subtype)


def clips_for(spec: ClipFormat, count: int) -> list[Path]:
    """``count`` distinct clips of this format, generated once (2 processes) and reused."""
    from concurrent.futures import ProcessPoolExecutor

    directory = CACHE / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"clip-{i:05d}.{spec.suffix}" for i in range(count)]
    missing = [(spec.name, str(p), 1_000_003 * FORMATS_ORDER[spec.name] + i)
               for i, p in enumerate(paths) if not p.exists()]
    if missing:
        log(f"writing {len(missing)} {spec.name} clips to {directory} (once)")
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(write_clip, missing, chunksize=32))
    return paths


FORMATS_ORDER = {name: i for i, name in enumerate(FORMATS)}


# ------------------------------------------------------------------------------------------ code trees


@contextmanager
def baseline_tree(rev: str) -> Iterator[tuple[Path, Path, str]]:
    """(package directory to put on PYTHONPATH, worktree, short commit) for ``rev``: a detached
    ``git worktree`` under /tmp for the duration (the main working tree is not touched)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True,
                            text=True, check=True).stdout.strip()
    worktree = Path(tempfile.mkdtemp(prefix=f"feed-baseline-{commit}-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(worktree), commit],
                   check=True, capture_output=True)
    farm = Path(tempfile.mkdtemp(prefix=f"feed-baseline-{commit}-pkg-"))
    try:
        package = farm / "emofleet"
        package.mkdir()
        for entry in (worktree / "emofleet").iterdir():
            (package / entry.name).symlink_to(entry)
        for name in PACKAGES:
            (package / name).symlink_to(worktree / name)
        yield farm, worktree, commit
    finally:
        shutil.rmtree(farm, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                       check=False, capture_output=True)


# ------------------------------------------------------------------------------------------ the child


def serve(args: argparse.Namespace) -> None:
    """One processor until told to stop on stdin; reports on stdin's "report" to ``args.report``."""
    import emofleet.processors
    from emofleet.core.config import from_env
    from emofleet.core.metrics import Metrics
    from emofleet.processors.service import build_processor

    expected = Path(args.expect_tree).resolve()
    actual = Path(emofleet.processors.__file__).resolve().parent.parent
    if actual != expected:
        raise SystemExit(f"the child imported emofleet from {actual}, not {expected}")
    spec = importlib.util.spec_from_file_location("feed_path_simulated_model",
                                                  REPO / "processors" / "simulated_model.py")
    assert spec is not None and spec.loader is not None
    simulated = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = simulated  # dataclasses look their module up there
    spec.loader.exec_module(simulated)
    model = simulated.SimulatedModel(simulated.parse_simulated(args.serve_model))

    settings = from_env()
    metrics = Metrics("processor")
    processor = build_processor(settings, model=model, metrics=metrics)
    loop = threading.Thread(target=processor.loop.run, name="poll-loop", daemon=True)
    loop.start()
    probe = GilProbe()
    deadline = time.monotonic() + 60
    while len(processor.loop.assigned) < settings.kafka.partitions:
        if time.monotonic() > deadline or not loop.is_alive():
            raise SystemExit("the processor did not get its partitions within 60 s")
        time.sleep(0.01)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "window":
            probe.start_window()
        elif command == "report":
            probe.end_window()
            registry = metrics.registry
            stages = {stage: [registry.get_sample_value(f"emofleet_stage_seconds_{kind}", {"stage": stage}) or 0.0
                              for kind in ("sum", "count")]
                      for stage in ("fetch", "decode", "cache", "model", "produce")}
            report = {"threads": {t.native_id: t.name for t in threading.enumerate()},
                      "stages": stages, "gil_wait_ms": probe.percentiles(),
                      "forwards": registry.get_sample_value("emofleet_model_batch_windows_count") or 0.0,
                      "batches": registry.get_sample_value("emofleet_batch_clips_count") or 0.0}
            Path(args.report).write_text(json.dumps(report))
            print("reported", flush=True)
        elif command == "stop":
            break
    probe.stop()
    processor.loop.stop()
    loop.join(30)


class GilProbe:
    """How late a thread wakes from a 1 ms sleep: the wait to get the GIL back, sampled continuously."""

    def __init__(self) -> None:
        self._delays: list[float] = []
        self._recording = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            if self._recording:
                self._delays.append(time.perf_counter() - started - 0.001)

    def start_window(self) -> None:
        self._delays = []
        self._recording = True

    def end_window(self) -> None:
        self._recording = False

    def percentiles(self) -> list[float]:
        delays = sorted(self._delays) or [0.0]
        return [1000 * delays[len(delays) // 2], 1000 * delays[int(len(delays) * 0.9)]]

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------------ the parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (kernel thread name, CPU seconds) for every thread of ``pid``."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return threads


def process_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_group(python_name: str | None, kernel_name: str) -> str:
    if python_name is None:
        return "librdkafka" if kernel_name.startswith("rdk:") else "other native"
    if python_name.startswith("fetch"):
        return "fetch pool (prepare)"
    return {"inference": "inference", "delivery": "delivery", "poll-loop": "poll loop",
            "gil-probe": "gil probe"}.get(python_name, "other python")


@dataclass
class Run:
    tree: str
    model: str
    clip_format: str
    clips: int
    seconds: float
    cpu_by_group: dict[str, float]
    python_cpu: float
    stages: dict[str, list[float]]
    gil_wait_ms: list[float]
    broker_cpu: float
    redis_cpu: float
    forwards: float
    batches: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return (self.clips - 1) / self.seconds  # results counted after the first one


def redis_pid(url: str) -> int | None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return pid if Path(f"/proc/{pid}").exists() else None  # a Redis elsewhere: its CPU is not visible


def one_run(tree: str, pythonpath: Path | None, expect_tree: Path, model: str, spec: ClipFormat,
            uris: list[str], bootstrap: str, broker_pid: int, redis_url: str, workdir: Path,
            batch: Any, fetch_workers: int, py_spy: str) -> Run:
    from processor import ResultWatcher  # bench/processor.py: the whole-clip result reader

    from emofleet.core.config import to_env
    from emofleet.processors.simulated_model import parse_simulated
    from emofleet.schemas.codec import make_codec
    from emofleet.streams.producer import AudioReferenceProducer
    from emofleet.streams.references import make_reference
    from harness import bench_settings, create_pipeline_topics, delete_redis_prefix

    settings = bench_settings(bootstrap, redis_url, f"feed-{spec.name}", workdir / "data",
                              file_roots=(CACHE,), partitions=PARTITIONS, batch=batch)
    if fetch_workers:
        settings = replace(settings, audio=replace(settings.audio, fetch_workers=fetch_workers))
    create_pipeline_topics(settings)
    env = {**os.environ, **to_env(settings), "EMOFLEET_OBSERVABILITY_LOG_FORMAT": "text"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    report_path = workdir / "report.json"
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--serve-model", model, "--report", str(report_path),
         "--expect-tree", str(expect_tree)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "child.log", "ab"), text=True,
        env=env, cwd="/", bufsize=1)
    redis = redis_pid(redis_url)
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the processor child failed to start:\n{tail(workdir / 'child.log')}")
        references = [make_reference({"uri": uri, "tenant": "bench", "source": "feed-path"}) for uri in uris]
        watcher = ResultWatcher(settings, len(references))
        producer = AudioReferenceProducer(settings.kafka, make_codec())
        for reference in references:
            producer.send(reference)
        if (report := producer.flush()).failed:
            raise RuntimeError(f"enqueueing references failed: {report.failed[:3]}")
        deadline = time.monotonic() + 60 + 0.2 * len(uris)
        while watcher.first_at is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        child.stdin.write("window\n")
        before = (thread_cpu(child.pid), process_cpu(broker_pid), process_cpu(redis) if redis else 0.0)
        profiler = subprocess.Popen(
            [py_spy, "record", "--pid", str(child.pid), "--gil", "--threads", "--format", "raw", "--rate", "200",
             "--output", str(workdir / "py-spy.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ) if py_spy else None
        if not watcher.done.wait(max(1.0, deadline - time.monotonic())):
            raise RuntimeError(f"only {len(watcher.whole)} results and {len(watcher.dead)} dead letters of "
                               f"{len(references)} in time:\n{tail(workdir / 'child.log')}")
        after = (thread_cpu(child.pid), process_cpu(broker_pid), process_cpu(redis) if redis else 0.0)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
            print_profile(workdir / "py-spy.txt", f"{spec.name} {model} {tree}")
        watcher.close()
        if watcher.dead:
            raise RuntimeError(f"{len(watcher.dead)} dead letters ({ {d['reason'] for d in watcher.dead.values()} })")
        models = {e["model_id"] for e in watcher.whole.values()}
        if models != {parse_simulated(model).model_id}:
            raise RuntimeError(f"events carry model ids {models}, expected {model}")
        child.stdin.write("report\n")
        if child.stdout.readline().strip() != "reported":
            raise RuntimeError("the processor child did not report")
        report = json.loads(report_path.read_text())
        child.stdin.write("stop\n")
        child.stdin.flush()
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        delete_redis_prefix(redis_url, settings.cache.key_prefix)
    names = {int(k): v for k, v in report["threads"].items()}
    by_group: dict[str, float] = {}
    python_cpu = 0.0
    for tid, (kernel_name, cpu) in after[0].items():
        used = cpu - before[0].get(tid, (kernel_name, 0.0))[1]
        group = thread_group(names.get(tid), kernel_name)
        by_group[group] = by_group.get(group, 0.0) + used
        if tid in names:
            python_cpu += used
    assert watcher.first_at is not None and watcher.done_at is not None
    return Run(tree, model, spec.name, len(uris), watcher.done_at - watcher.first_at, by_group, python_cpu,
               report["stages"], report["gil_wait_ms"], after[1] - before[1], after[2] - before[2],
               report["forwards"], report["batches"])


def print_profile(raw: Path, title: str, top: int = 25) -> None:
    """Top frames of a py-spy raw (collapsed) profile: self samples (leaf) and by thread."""
    leaves: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(count)
        total += samples
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + samples
        threads[frames[0]] = threads.get(frames[0], 0) + samples
    print(f"\n#### py-spy --gil, {title}: {total} samples holding the GIL\n")
    for name, samples in sorted(threads.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {samples / max(total, 1):6.1%}  {name}")
    print()
    for name, samples in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {samples / max(total, 1):6.1%}  {name}")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cpu_capabilities() -> str:
    flags = set()
    model_name = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        if key.strip() == "model name" and not model_name:
            model_name = value.strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "sha_ni")
    have = ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512"
    return f"{model_name}, {os.cpu_count()} CPUs, {have}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000, help="distinct references per format (default 1000)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--device", default="simulated:5000,2",
                        help="the modelled accelerator for the second row (default simulated:5000,2: one H100)")
    parser.add_argument("--no-device", action="store_true", help="only the infinitely fast model")
    parser.add_argument("--baseline-rev", default="HEAD",
                        help="git revision to compare against in the same run (default HEAD); '' for none")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-clips", type=int, default=64, help="BatchSettings.max_clips (a GPU deployment's)")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="BatchSettings.max_in_flight (default: the setting's default)")
    parser.add_argument("--fetch-workers", type=int, default=0,
                        help="AudioSettings.fetch_workers (default: the setting's default)")
    parser.add_argument("--py-spy", default="", metavar="BIN",
                        help="record the current tree's infinitely-fast runs with this py-spy binary (--gil: only "
                             "samples holding the GIL) and print the top functions")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-model", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--expect-tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: broker, children, worktree
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    unknown = set(args.formats.split(",")) - set(FORMATS) - {""}
    if unknown:
        raise SystemExit(f"unknown --formats {sorted(unknown)}: use {', '.join(FORMATS)}")
    formats = [FORMATS[name] for name in args.formats.split(",") if name]
    if args.clips < 2:
        raise SystemExit("--clips must be at least 2")
    models = [INFINITE] + ([] if args.no_device else [args.device])

    from harness import require_redis

    redis_url = require_redis(args.redis_url)
    with ExitStack() as stack:
        trees: list[tuple[str, Path | None, Path]] = [("current", None, REPO)]
        if args.baseline_rev:
            farm, worktree, commit = stack.enter_context(baseline_tree(args.baseline_rev))
            trees.append((f"baseline {commit}", farm, worktree))
        runs = run_all(args, formats, models, trees, redis_url)
    print_report(runs, formats, models, [t[0] for t in trees], args)


def run_all(args: argparse.Namespace, formats: list[ClipFormat], models: list[str],
            trees: list[tuple[str, Path | None, Path]], redis_url: str) -> list[Run]:
    from emofleet.core.config import BatchSettings
    from emofleet.infra.local_stack import start_broker, stop_process
    from harness import workspace

    clip_uris = {spec.name: [p.resolve().as_uri() for p in clips_for(spec, args.clips)] for spec in formats}
    batch = BatchSettings(max_clips=args.max_clips, max_audio_seconds=args.max_clips * CLIP_SECONDS,
                          max_wait_ms=50, commit_interval_seconds=0.2)
    if args.max_in_flight:
        batch = replace(batch, max_in_flight=args.max_in_flight)
    runs: list[Run] = []
    with workspace("emofleet-bench-feed-") as workdir:
        broker, bootstrap = start_broker(workdir / "broker.log")
        try:
            for round_index in range(args.rounds):
                for spec in formats:
                    for model in models:
                        order = trees if round_index % 2 == 0 else list(reversed(trees))
                        for tree, pythonpath, root in order:
                            profile = args.py_spy if tree == "current" and model == INFINITE else ""
                            run = one_run(tree, pythonpath, root, model, spec, clip_uris[spec.name], bootstrap,
                                          broker.pid, redis_url, workdir, batch, args.fetch_workers, profile)
                            runs.append(run)
                            log(f"round {round_index + 1}/{args.rounds} {spec.name} {model} {tree}: "
                                f"{run.rate:.0f} clips/s, python CPU {run.python_cpu / run.seconds:.2f} x wall")
        finally:
            stop_process(broker.pid)
    return runs


def median_of(runs: list[Run], value: Any) -> float:
    return statistics.median(value(r) for r in runs) if runs else float("nan")


def print_report(runs: list[Run], formats: list[ClipFormat], models: list[str], trees: list[str],
                 args: argparse.Namespace) -> None:
    from harness import machine_line, markdown_table

    def select(spec: ClipFormat, model: str, tree: str) -> list[Run]:
        return [r for r in runs if (r.clip_format, r.model, r.tree) == (spec.name, model, tree)]

    print(f"\n### Feed path: one processor, {args.clips} distinct 5 s clips per format, {args.rounds} rounds, "
          f"medians ({cpu_capabilities()}; {machine_line()})\n")
    print(f"Batch: max_clips {args.max_clips}, max_audio_seconds {args.max_clips * CLIP_SECONDS:g}, max_wait_ms 50. "
          f"Device row: `{models[-1]}`. \"device busy\" = the model stage's seconds / wall.\n")
    rows = []
    for spec in formats:
        for model in models:
            base = select(spec, model, trees[-1]) if len(trees) > 1 else []
            for tree in trees:
                chosen = select(spec, model, tree)
                rate = median_of(chosen, lambda r: r.rate)
                ratio = rate / median_of(base, lambda r: r.rate) if base and tree != trees[-1] else float("nan")
                target = TARGETS[spec.name]
                verdict = "" if model != INFINITE else ("PASS" if rate >= target else "FAIL")
                rows.append([spec.name, model, tree, rate, rate * CLIP_SECONDS,
                             f"{ratio:.2f}x" if ratio == ratio else "-",
                             f"{median_of(chosen, lambda r: r.stages['model'][0] / r.seconds):.0%}",
                             median_of(chosen, lambda r: 1000 * sum(r.cpu_by_group.values()) / r.clips),
                             median_of(chosen, lambda r: r.python_cpu / r.seconds),
                             "/".join(f"{median_of(chosen, lambda r, i=i: r.gil_wait_ms[i]):.2f}" for i in (0, 1)),
                             f"{target:g} {verdict}".strip() if model == INFINITE else "-",
                             ", ".join(f"{r.rate:.0f}" for r in chosen)])
    print(markdown_table(["format", "model", "code", "clips/s", "audio-s/s", "vs baseline", "device busy",
                          "processor CPU ms/clip", "python threads CPU / wall", "GIL wait ms p50/p90", "target clips/s", "per round"], rows))

    print("\nStage seconds per clip (ms; emofleet_stage_seconds sums / clips; fetch and decode are summed over "
          "the fetch pool's threads and overlap the rest; cache, model, produce run on the inference thread), "
          "infinitely fast model:\n")
    stage_rows = []
    for spec in formats:
        for tree in trees:
            chosen = select(spec, INFINITE, tree)
            stage_rows.append([spec.name, tree, *[
                median_of(chosen, lambda r, s=s: 1000 * r.stages[s][0] / r.clips)
                for s in ("fetch", "decode", "cache", "model", "produce")],
                median_of(chosen, lambda r: r.clips / max(r.batches, 1)),
                median_of(chosen, lambda r: r.clips / max(r.forwards, 1))])
    print(markdown_table(["format", "code", "fetch", "decode", "cache", "model", "produce", "clips/batch",
                          "clips/forward"], stage_rows))

    groups = ["fetch pool (prepare)", "inference", "delivery", "poll loop", "librdkafka", "other python",
              "other native", "gil probe"]
    print("\nCPU ms per clip by thread (from /proc/<pid>/task/*/stat over the measured window), plus the "
          "broker and Redis processes, infinitely fast model:\n")
    cpu_rows = []
    for spec in formats:
        for tree in trees:
            chosen = select(spec, INFINITE, tree)
            cpu_rows.append([spec.name, tree, *[
                median_of(chosen, lambda r, g=g: 1000 * r.cpu_by_group.get(g, 0.0) / r.clips) for g in groups],
                median_of(chosen, lambda r: 1000 * r.broker_cpu / r.clips),
                median_of(chosen, lambda r: 1000 * r.redis_cpu / r.clips)])
    print(markdown_table(["format", "code", *groups, "broker", "redis"], cpu_rows))


if __name__ == "__main__":
    main()
