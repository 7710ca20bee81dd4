"""The HTTP front door under load, the way the seed measured it (Locust: QPS, P95, errors) and beyond it.

One run, side by side on this machine (an embedded Tansu broker, the local Redis, one `emofleet process`
with the tiny model computing frames and embeddings, one `emofleet serve`, and a bare ASGI endpoint on
uvicorn that only reads the body and answers):

1. ``bare``: the bare endpoint, closed loop: what uvicorn + this client do at best on these cores;
2. ``cache-hit``: the gateway answering already-scored audio from the cache (target >= 0.5x of ``bare``);
3. ``miss capacity``: distinct clips, closed loop: the pipeline's capacity C with the tiny model;
4. ``miss steady``: distinct clips, open loop at 0.5 C (target P95 <= 1.5 s);
5. ``miss 10x``: distinct clips, open loop at 10 C (target: shed with 429/503 in <= 100 ms, 0 timeouts).

Requests follow the seed's mix: 3 ``granularity=utterance`` : 1 ``granularity=frame&extract_embedding=true``.
Open-loop latencies count from the scheduled send time (no coordinated omission).

    .venv/bin/python bench/http_load.py [--clients 16] [--seconds 10] [--plot http.png] [--model simulated:10]

On a 2-core machine the tiny model's pipeline is fast enough that 10 x its capacity exceeds what the load client
and uvicorn can even parse (the ``bare`` row), so the 10x phase there measures CPU starvation; ``--model
simulated:10`` (a device scoring 10 audio-s/s) brings the capacity below that, and the 10x phase then measures
the gateway's shedding.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

from emofleet.core.config import GatewaySettings, Secret, to_env
from emofleet.infra.local_stack import free_port, stop_process

from feed_path import cpu_capabilities
from harness import (DEFAULT_REDIS_URL, bench_settings, create_pipeline_topics, delete_redis_prefix, embedded_broker,
                     log, machine_line, markdown_table, require_redis, workspace)

KEY = "bench-key-0123456789abcdef"
MIX = (("utterance", False),) * 3 + (("frame", True),)
CLIENT_TIMEOUT = 15.0
SEED = {"QPS": "12 -> 320 (8 A100s)", "P95": "4.2 s -> 1.5 s", "errors": "23% at 1,000 users (before)"}


@dataclass
class Phase:
    name: str
    mode: str
    offered: float | None = None  # requests/s (open loop)
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    shed_latencies: list[float] = field(default_factory=list)  # 429 / 503 answers
    cache_hits: int = 0
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def clip(seconds: float = 1.0, variant: int = 0) -> bytes:
    """A 16 kHz WAV tone; ``variant`` changes a few samples, so each variant is new audio to the cache."""
    import soundfile as sf

    samples = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(16_000 * seconds)) / 16_000)).astype(np.float32)
    samples[:4] = [((variant >> (14 * k)) & 0x3FFF) / 32768 for k in range(4)]  # survives 16-bit quantization
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def one(client: httpx.AsyncClient, url: str, body: bytes, index: int, phase: Phase, started: float) -> None:
    granularity, embedding = MIX[index % len(MIX)]
    try:
        response = await client.post(url, content=body, params={"granularity": granularity,
                                                                "extract_embedding": str(embedding).lower()},
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "audio/wav"})
        status = str(response.status_code)
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("application/json"):
            phase.cache_hits += bool(response.json().get("cache_hit"))
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.HTTPError as error:
        status = type(error).__name__
    elapsed = time.perf_counter() - started
    phase.statuses[status] += 1
    if status == "200":
        phase.latencies.append(elapsed)
    elif status in ("429", "503"):
        phase.shed_latencies.append(elapsed)


async def closed_loop(url: str, bodies, phase: Phase, clients: int, seconds: float) -> Phase:
    deadline = time.perf_counter() + seconds
    counter = iter(range(10 ** 9))

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            index = next(counter)
            await one(client, url, bodies(index), index, phase, time.perf_counter())

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    phase.seconds = time.perf_counter() - began
    return phase


async def open_loop(url: str, bodies, phase: Phase, rate: float, seconds: float) -> Phase:
    phase.offered = rate
    began = time.perf_counter()
    tasks = []
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=httpx.Limits(max_connections=None)) as client:
        for index in range(int(rate * seconds)):
            scheduled = began + index / rate
            if (delay := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, bodies(index), index, phase, scheduled)))
        await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - began
    return phase


# ---------------------------------------------------------------------------------------------- the bare endpoint


async def bare_app(scope, receive, send) -> None:  # noqa: ANN001 - the ASGI callable, nothing more
    """Reads the whole body, answers a small JSON document: the floor any HTTP handler here stands on."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b'{"received": %d}' % size
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- the run


def wait_ready(url: str, process: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {timeout:.0f}s")


def row(phase: Phase, bare_qps: float | None = None) -> list[object]:
    qps = phase.statuses.get("200", 0) / phase.seconds if phase.seconds else float("nan")
    errors = {s: n for s, n in phase.statuses.items() if s != "200"}
    shed_p95 = float(np.percentile(phase.shed_latencies, 95) * 1000) if phase.shed_latencies else float("nan")
    return [phase.name, phase.mode if phase.offered is None else f"open {phase.offered:.0f}/s", phase.count, qps,
            phase.percentile(50) * 1000, phase.percentile(95) * 1000, phase.percentile(99) * 1000,
            ", ".join(f"{s}: {n / phase.count:.0%}" for s, n in sorted(errors.items())) or "-",
            shed_p95, f"{phase.cache_hits / max(1, phase.statuses.get('200', 0)):.0%}",
            f"{qps / bare_qps:.2f}x" if bare_qps else "-"]


def plot(phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [p.name for p in phases]
    left.bar(names, [p.statuses.get("200", 0) / p.seconds for p in phases], color="#37c")
    left.set_ylabel("answered requests/s (200)")
    left.tick_params(axis="x", rotation=20)
    for q, marker in ((50, "o"), (95, "s"), (99, "^")):
        right.plot(names, [p.percentile(q) * 1000 for p in phases], marker=marker, label=f"P{q}")
    right.axhline(1500, color="#d33", linestyle="--", label="P95 target 1.5 s (miss, steady)")
    right.set_yscale("log")
    right.set_ylabel("latency of 200s, ms")
    right.tick_params(axis="x", rotation=20)
    right.legend()
    figure.suptitle("emofleet serve under load (this machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the closed-loop phases")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--plot", type=Path, default=Path("http-bench.png"), help="PNG written here")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--model", default="tiny",
                        help="the processor's model: tiny (default), or simulated:<audio-s/s> to model a device "
                             "slower than this machine's HTTP path, so that the 10x phase measures shedding rather "
                             "than the load client running out of CPU")
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the bare endpoint child
    args = parser.parse_args()
    if args.bare_server:
        import uvicorn

        uvicorn.run(bare_app, host="127.0.0.1", port=args.bare_server, log_level="warning")
        return
    require_redis(args.redis_url)
    print(f"CPU: {cpu_capabilities()}")
    with workspace("emofleet-http-") as work, embedded_broker(work) as bootstrap:
        settings = bench_settings(bootstrap, args.redis_url, "http", work / "data", file_roots=[work / "data"])
        settings = replace(settings,
                           model=replace(settings.model, model=args.model, granularity="frame", embeddings=True),
                           gateway=GatewaySettings(api_keys=Secret(f"bench:{KEY}"), rate_per_second=0,
                                                   port=free_port(), sync_wait_seconds=10.0, max_lag_messages=64,
                                                   max_waiting=2_000))
        create_pipeline_topics(settings)
        env = os.environ | to_env(settings)
        cli = [sys.executable, "-m", "emofleet.cli"]
        bare_port = free_port()
        logs = {name: open(work / f"{name}.log", "wb") for name in ("processor", "gateway", "bare")}  # noqa: SIM115
        children = {
            "processor": subprocess.Popen([*cli, "process"], env=env, stdout=logs["processor"], stderr=subprocess.STDOUT),
            "gateway": subprocess.Popen([*cli, "serve"], env=env, stdout=logs["gateway"], stderr=subprocess.STDOUT),
            "bare": subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)],
                                     stdout=logs["bare"], stderr=subprocess.STDOUT)}
        gateway = f"http://127.0.0.1:{settings.gateway.port}"
        try:
            wait_ready(f"{gateway}/readyz", children["gateway"], "the gateway")
            wait_ready(f"http://127.0.0.1:{bare_port}/", children["bare"], "the bare endpoint")
            phases = asyncio.run(run_phases(gateway, f"http://127.0.0.1:{bare_port}/", args))
        finally:
            for child in children.values():
                stop_process(child.pid, timeout=15)
            delete_redis_prefix(args.redis_url, settings.cache.key_prefix)
    bare_qps = phases[0].statuses.get("200", 0) / phases[0].seconds
    headers = ["phase", "load", "requests", "QPS (200)", "P50 ms", "P95 ms", "P99 ms", "errors by status",
               "429/503 P95 ms", "cache hits", "vs bare"]
    print(markdown_table(headers, [row(phases[0])] + [row(p, bare_qps if p.name == "cache-hit" else None)
                                                      for p in phases[1:]]))
    print(f"\nthe seed (Locust, 8 A100s): QPS {SEED['QPS']}, P95 {SEED['P95']}, errors {SEED['errors']}")
    print(machine_line())
    plot(phases, args.plot)
    print(f"plot: {args.plot.resolve()}")


async def run_phases(gateway: str, bare: str, args: argparse.Namespace) -> list[Phase]:
    analyze = f"{gateway}/v1/analyze"
    same = clip(1.0)
    miss = iter(range(1, 10 ** 9))
    async with httpx.AsyncClient(timeout=60) as client:  # score the cache-hit clip once (the processor may still load)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "audio/wav", "Prefer": "respond-async"}
        accepted = await client.post(analyze, content=same, headers=headers)
        deadline = time.monotonic() + 120
        while (status := (await client.get(f"{gateway}{accepted.headers['location']}", headers=headers)).status_code) \
                == 202 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if status != 200:
            raise SystemExit(f"priming the cache failed: {status}")
    log("bare endpoint")
    bare_phase = await closed_loop(bare, lambda _i: same, Phase("bare ASGI", "closed"), args.clients, args.seconds)
    log("cache hits")
    hits = await closed_loop(analyze, lambda _i: same, Phase("cache-hit", "closed"), args.clients, args.seconds)
    log("misses, closed loop: capacity")
    capacity_phase = await closed_loop(analyze, lambda _i: clip(1.0, next(miss)), Phase("miss capacity", "closed"),
                                       args.clients, args.seconds)
    capacity = max(1.0, capacity_phase.statuses.get("200", 0) / capacity_phase.seconds)
    await asyncio.sleep(3)  # let the lag of the capacity phase drain before the steady phase
    log(f"misses, open loop at 0.5 x {capacity:.1f}/s")
    steady = await open_loop(analyze, lambda _i: clip(1.0, next(miss)), Phase("miss steady", "open"),
                             0.5 * capacity, args.seconds)
    log(f"misses, open loop at 10 x {capacity:.1f}/s")
    overload = await open_loop(analyze, lambda _i: clip(1.0, next(miss)), Phase("miss 10x", "open"),
                               10 * capacity, args.seconds)
    return [bare_phase, hits, capacity_phase, steady, overload]


if __name__ == "__main__":
    main()
