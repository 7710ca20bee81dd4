"""Model inference throughput and accuracy per precision mode and batch size, against funasr per clip.

    python bench/inference.py [--model large-shape|tiny|DIR] [--rounds R] [--clips N] [--seed S]
                              [--min-seconds S] [--max-seconds S] [--precisions fp32,bf16,int8]
                              [--batch-sizes 1,4,8] [--max-padding F] [--what-if-padding F ...]
                              [--max-attention-s2 S2] [--accuracy-clips N] [--threads T]
                              [--attention-probe 1x8,4x8,...] [--no-attention-probe] [--probe-only]
                              [--no-gpu] [--gpu-clips N] [--gpu-batch-sizes 16,64] ...

One process, one fixed set of mixed-length synthetic clips (lengths log-uniform, ``emofleet.samples``
signals), models loaded through ``load_model`` exactly as the processor loads them. ``large-shape`` is
the emotion2vec_plus_large architecture with random weights (built once into ~/.cache/emofleet/bench);
``--model DIR`` takes a real checkpoint directory, to validate precisions on real weights.

Rows (CPU):

* ``funasr generate per clip (fp32)`` -- ``EmotionModel.predict_reference``: funasr ``AutoModel.generate``
  one clip at a time. The baseline for speed AND the reference for accuracy.
* ``<precision>, batch 1`` -- ``EmotionModel.predict([clip])`` per clip (the exact batched forward, B=1).
* ``<precision>, planner <= B clips`` -- ``plan_batches`` over the clip set (length buckets, padding
  waste <= ``--max-padding``, the processor's default 0.15), one ``predict`` per planned batch. Plans
  that come out identical for two B are run once (the row is named ``<= 4/8 clips``).
* ``what-if`` rows: fp32 with looser padding caps (``--what-if-padding``).

Precisions: fp32; bf16 = Linear/Conv weights cast to bf16 at load + ``torch.autocast`` bf16 on CPU;
int8 = dynamic quantization of every Linear (CPU). Each is its own ``load_model(precision=...)``. bf16
runs by default only where the CPU has AVX512-BF16 or AMX (elsewhere torch emulates it, several times
slower than fp32); ``--precisions fp32,bf16,int8`` runs it anyway.

Timing: rounds interleave the rows forward by forward (all rows' forwards sorted by the longest clip
they hold, rows taking turns, the first rotating each round, odd rounds long to short), so every row
meets each clip length within seconds of the others. A row's time = the sum over its forwards of
each forward's median over rounds; per-round totals are shown too. The machine is shared: compare
ratios within one table only (the header prints the load average).

Columns: audio-seconds per second; speed-up over the per-clip baseline; accuracy against the fp32
per-clip reference -- max |score difference| over clips and classes, and top-1 agreement -- on the
timed clips plus ``--accuracy-clips`` untimed short clips (non-fp32 rows; 8 clips alone say little);
peak memory = peak RSS during the row's largest forward, run once more untimed, minus RSS before it
(``/proc/self/status`` VmHWM reset through ``/proc/self/clear_refs``, glibc's free heap trimmed
first): the activations and workspace, not the weights. Compute floor: model FLOPs of the clip set, counted
analytically from the module's shapes (conv feature extractor, positional convs, Linear layers per
frame, attention 4 x N^2 x D per block; cross-checked against ``torch.utils.flop_counter.FlopCounterMode``
on one clip) over this machine's matmul throughput measured after every round (``torch.matmul``
fp32 / bf16; int8 = a dynamically quantized Linear), at ``--threads``. The int8 floor counts the
Linear FLOPs at the int8 rate and the rest (convs, attention) at fp32. "floor %" = floor time /
measured time.

Attention probe (fp32): single forwards of ``count`` equal clips: peak RSS per second of the batch and
per count x longest^2. On CPU the batched forward runs the extractor and attention one clip at a time,
so the peak follows the longest clip; in the padded (GPU) layout the attention materialises B x heads x
N x N scores (N = 50 frames/s + 10 extra tokens), which ``plan_batches(max_attention=...)`` caps, and
the extractor's activations grow with count x longest, which ``max_padded_samples`` caps.

GPU section (only when ``torch.cuda.is_available()``; else it prints that it was skipped): a larger
clip set; fp32/bf16/fp16 at batch 1 and planner-bucketed batches, ``torch.cuda.max_memory_allocated``,
the funasr per-clip path on a subset. ``--gpu-device cpu`` runs that section on the CPU as a dry run.

Targets (PASS/FAIL printed). CPU, large shape: batched fp32 (planner, default padding cap) no slower
than the funasr per-clip path; the best validated mode >= 1.5x the per-clip path, where validated =
top-1 agreement >= 95% and max |score difference| <= 0.05 against the fp32 per-clip reference. GPU
(H100 class): the best validated batched row >= 2,000 audio-s/s and >= 10x the per-clip path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emofleet.processors.batch_plan import plan_batches
from emofleet.processors.model import native_cpu_bf16
from emofleet.samples import synth_clip
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.core.config import ModelSettings

from harness import log, machine_line, markdown_table, median

FRAMES_PER_SECOND = 50
CACHE_ROOT = Path.home() / ".cache" / "emofleet" / "bench"
BASELINE = "funasr generate per clip (fp32)"

CPU_TARGET_BATCHED_VS_PER_CLIP = 1.0
CPU_TARGET_BEST_VS_PER_CLIP = 1.5
GPU_TARGET_AUDIO_S_PER_S = 2_000.0
GPU_TARGET_VS_PER_CLIP = 10.0
ACCURACY_MIN_TOP1 = 0.95
ACCURACY_MAX_ABS_DIFF = 0.05

ACCURACY_CLIPS = {"tiny": (48, 12.0), "large-shape": (16, 4.0)}  # extra untimed clips: count, max s
MODEL_DEFAULTS = {  # clips, min s, max s, rounds, max padded audio seconds per batch
    "tiny": (40, 0.5, 12.0, 5, 240.0),
    "large-shape": (8, 0.5, 12.0, 3, 240.0),
}


# ------------------------------------------------------------------------------------------ memory


_LIBC = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/status") else None


def _proc_status_kb(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) for k in keys}  # type: ignore[union-attr]


class PeakRss:
    """Peak RSS during a block minus RSS at its start, in bytes (Linux /proc; 0 elsewhere)."""

    def __init__(self) -> None:
        self.delta = 0

    def __enter__(self) -> PeakRss:
        if _LIBC is not None:  # give freed heap pages back, so what the block touches again counts
            _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._start = _proc_status_kb("VmRSS")["VmRSS"]
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is not None:
            self.delta = max(0, _proc_status_kb("VmHWM")["VmHWM"] - self._start) * 1024


def rss_bytes() -> int:
    try:
        return _proc_status_kb("VmRSS")["VmRSS"] * 1024
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------ clips


def make_clips(count: int, min_s: float, max_s: float, seed: int = 11) -> list[np.ndarray]:
    """``count`` synthetic voiced clips, lengths log-uniform in [min_s, max_s] (many short, few long)."""
    rng = np.random.default_rng(seed)
    seconds = np.exp(rng.uniform(np.log(min_s), np.log(max_s), count))
    if count >= 2:
        seconds[0], seconds[-1] = min_s, max_s  # the extremes are always in the set
    return [synth_clip(float(s), seed * 1_000 + i) for i, s in enumerate(seconds)]


# ------------------------------------------------------------------------------------------ models


def defaults_key(model: str) -> str:
    return model if model in MODEL_DEFAULTS else "large-shape"


def model_directory(kind: str) -> Path:
    from emofleet.processors.tiny_model import LARGE_CONFIG, TINY_CONFIG, build_random_model

    if Path(kind).expanduser().is_dir():  # a real checkpoint (config.yaml, model.pt, tokens.txt)
        return Path(kind).expanduser()
    if kind == "large-shape":
        return build_random_model(CACHE_ROOT / "large-shape", LARGE_CONFIG, seed=0)
    if kind == "tiny":
        return build_random_model(CACHE_ROOT / "tiny-emotion2vec", TINY_CONFIG, seed=0)
    raise SystemExit(f"unknown --model {kind!r}: use large-shape, tiny or a model directory")


def load(directory: Path, precision: str, device: str, threads: int) -> tuple[Any, float, int]:
    """(EmotionModel, load seconds, RSS growth in bytes) through the production loader."""
    from emofleet.processors.model import load_model

    before, started = rss_bytes(), time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(ModelSettings(model=str(directory), device=device, threads=threads,
                                         precision=precision))
    return model, time.monotonic() - started, rss_bytes() - before


# ------------------------------------------------------------------------------------------ FLOPs


def flops_per_clip(module: Any, num_samples: int) -> dict[str, float]:
    """Forward FLOPs (2 x multiply-adds) of one clip, by component, from the funasr module's shapes."""
    from emofleet.processors.packed_forward import frame_count

    encoder = module.modality_encoders["AUDIO"]
    flops = {"conv": 0.0, "linear": 0.0, "attention": 0.0}
    length, channels = num_samples, 1
    for dim, kernel, stride in encoder.feature_enc_layers:  # conv feature extractor
        length = (length - kernel) // stride + 1
        flops["conv"] += 2.0 * length * channels * kernel * dim
        channels = dim
    frames = frame_count(num_samples, encoder.feature_enc_layers)
    assert frames == length
    for conv in (m for m in encoder.relative_positional_encoder.modules() if isinstance(m, torch.nn.Conv1d)):
        flops["conv"] += 2.0 * frames * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.out_channels
    for linear in (m for m in encoder.project_features.modules() if isinstance(m, torch.nn.Linear)):
        flops["linear"] += 2.0 * frames * linear.in_features * linear.out_features
    tokens = frames + (encoder.extra_tokens.size(1) if encoder.extra_tokens is not None else 0)
    blocks = list(encoder.context_encoder.blocks) + list(module.blocks)
    for block in blocks:
        for linear in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
            flops["linear"] += 2.0 * tokens * linear.in_features * linear.out_features
        dim = block.attn.qkv.in_features
        flops["attention"] += 4.0 * tokens * tokens * dim  # q k^T and attn v
    flops["linear"] += 2.0 * module.proj.in_features * module.proj.out_features
    return flops


def measured_flops(model: Any, clip: np.ndarray) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.predict([clip])
    return float(counter.get_total_flops())


def gemm_rates(device: str, seconds: float = 0.6) -> dict[str, float]:
    """Matmul FLOP/s on ``device`` with the current thread count: fp32, bf16 where native (emulated
    bf16 takes tens of seconds per matmul on CPU), fp16 on GPU, int8 on CPU."""
    m, k, n = (1024, 1024, 4096) if device == "cpu" else (8192, 8192, 8192)
    rates: dict[str, float] = {}
    dtypes = {"fp32": torch.float32}
    if device != "cpu" or native_cpu_bf16():
        dtypes["bf16"] = torch.bfloat16
    if device != "cpu":
        dtypes["fp16"] = torch.float16
    for name, dtype in dtypes.items():
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        rates[name] = _best_rate(lambda: torch.matmul(a, b), 2.0 * m * k * n, device, seconds)
    if device == "cpu":
        from torch.ao.nn.quantized.dynamic import Linear as QLinear

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qlinear = QLinear(k, n, dtype=torch.qint8)
        x = torch.randn(m, k)
        rates["int8"] = _best_rate(lambda: qlinear(x), 2.0 * m * k * n, device, seconds)
    return rates


def _best_rate(fn: Callable[[], Any], flops: float, device: str, budget: float) -> float:
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    fn()
    sync()
    best, spent = float("inf"), 0.0
    while spent < budget or best == float("inf"):
        started = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    return flops / best


def floor_seconds(flops: dict[str, float], precision: str, rates: dict[str, float]) -> float:
    """Time at GEMM speed: everything at the precision's rate (int8: Linear at int8, the rest fp32)."""
    total = sum(flops.values())
    if precision == "int8":
        return flops["linear"] / rates["int8"] + (total - flops["linear"]) / rates["fp32"]
    return total / rates[precision] if precision in rates else float("nan")


# ------------------------------------------------------------------------------------------ rows


@dataclass(eq=False)
class Row:
    name: str
    precision: str  # of the model: fp32 / bf16 / fp16 / int8
    model: Any
    plan: list[list[int]]  # the forwards of one pass over the clip set (batches of clip indices)
    reference: bool = False  # funasr generate, one clip per call (plan: one clip each)
    replan: Callable[[list[int]], list[list[int]]] | None = None  # the row's planning, for other clips
    seconds: list[float] = field(default_factory=list)  # per round, the whole clip set
    units: list[list[float]] = field(default_factory=list)  # per round, each forward (or clip)
    cpu_units: list[list[float]] = field(default_factory=list)  # the same in process CPU seconds
    memory: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None  # clips x classes, from the last round

    @property
    def estimate(self) -> float:
        """Seconds for the clip set: each forward's median over rounds, summed. A neighbour's burst
        hits a few forwards of one round and is voted out; with one round this is that round."""
        return float(sum(np.median(np.array(self.units), axis=0)))

    @property
    def best(self) -> float:
        """Each forward's fastest round, summed: the least-disturbed estimate (other jobs only ever
        add time), shown next to the medians."""
        return float(sum(np.min(np.array(self.units), axis=0)))

    @property
    def cpu_estimate(self) -> float:
        """Process CPU seconds (all threads), per-forward medians summed. Time other jobs take from
        this process's threads is not in it, so it varies far less with the load here than wall
        time; 2 threads kept busy would need cpu_estimate / 2 wall seconds."""
        return float(sum(np.median(np.array(self.cpu_units), axis=0)))

    @property
    def batches(self) -> str:
        if self.reference:
            return "1 each"
        sizes = sorted((len(b) for b in self.plan), reverse=True)
        return f"{len(self.plan)} ({'/'.join(map(str, sizes))})" if len(sizes) <= 12 else f"{len(self.plan)}"


def run_unit(row: Row, index: int, clips: Sequence[np.ndarray], device: str,
             measure_rss: bool = False) -> tuple[float, float, int]:
    """One forward of ``row`` (a planned batch, or one funasr generate): wall seconds, process CPU
    seconds (all threads) and peak memory (GPU: always; CPU: only with ``measure_rss``, which trims
    the heap first, so the forward pays page faults that a warm process would not)."""
    unit = row.plan[index]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if row.scores is None:
        row.scores = np.zeros((len(clips), 9), dtype=np.float32)
    with PeakRss() if measure_rss else contextlib.nullcontext() as peak:
        started, cpu_started = time.perf_counter(), time.process_time()
        if row.reference:
            row.scores[unit[0]] = row.model.predict_reference(clips[unit[0]]).scores
        else:
            for i, prediction in zip(unit, row.model.predict([clips[i] for i in unit]), strict=True):
                row.scores[i] = prediction.scores
        if cuda:
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    memory = torch.cuda.max_memory_allocated() - base if cuda else peak.delta if measure_rss else 0  # type: ignore[union-attr]
    return elapsed, cpu, memory


def run_rounds(rows: list[Row], clips: Sequence[np.ndarray], rounds: int, device: str,
               rates_log: list[dict[str, float]] | None) -> None:
    """Every row over the clip set ``rounds`` times, interleaved forward by forward.

    Within a round, the forwards of all rows are run in order of the longest clip they hold (short
    to long, long to short in odd rounds), rows taking turns at each length (the first row rotates
    each round). So all rows meet the same clip lengths within seconds of one another, and a burst
    from a neighbour's job lands on every row alike instead of on whichever row ran in that minute.
    """
    rank = {i: r for r, i in enumerate(sorted(range(len(clips)), key=lambda i: len(clips[i])))}
    gc.collect()  # once: ~0.3 s with funasr loaded, and an idle gap makes the next forward slow here
    for r in range(rounds):
        schedule = sorted(
            (max(rank[i] for i in unit) * (-1 if r % 2 else 1), (k - r) % len(rows), k, u)
            for k, row in enumerate(rows) for u, unit in enumerate(row.plan)
        )
        times = {k: [0.0] * len(row.plan) for k, row in enumerate(rows)}
        cpu_times = {k: [0.0] * len(row.plan) for k, row in enumerate(rows)}
        peaks = dict.fromkeys(times, 0)
        for row in rows:  # untimed: the first forward after the GEMM measurement runs slow
            row.model.predict([min(clips, key=len)])
        round_started = time.monotonic()
        for _, _, k, u in schedule:
            times[k][u], cpu_times[k][u], memory = run_unit(rows[k], u, clips, device)
            peaks[k] = max(peaks[k], memory)
        for k, row in enumerate(rows):
            row.units.append(times[k])
            row.cpu_units.append(cpu_times[k])
            row.seconds.append(sum(times[k]))
            if device.startswith("cuda"):
                row.memory.append(peaks[k])
        log(f"round {r + 1}/{rounds} in {time.monotonic() - round_started:.0f} s: "
            + "; ".join(f"{row.name} {row.seconds[-1]:.2f} s" for row in rows))
        if rates_log is not None:
            rates_log.append(gemm_rates(device))
    if not device.startswith("cuda"):
        memory_pass(rows, clips, device)


def memory_pass(rows: list[Row], clips: Sequence[np.ndarray], device: str) -> None:
    """Peak RSS of each row's largest forward (most padded samples), run once more, untimed: the
    heap is trimmed first so the forward's whole footprint counts. Not done in the timed rounds,
    where re-faulting a trimmed heap would cost time that a warm processor does not pay."""
    for row in rows:
        largest = max(range(len(row.plan)), key=lambda u: len(row.plan[u]) * max(len(clips[i]) for i in row.plan[u]))
        row.memory.append(run_unit(row, largest, clips, device, measure_rss=True)[2])

def accuracy(row: Row, reference: Row) -> tuple[float, float, int, int]:
    """max |score diff|, top-1 agreement fraction, agreeing clips, clips compared (rows scored on
    fewer clips than the reference carry NaN rows, which are left out)."""
    assert row.scores is not None and reference.scores is not None
    scored = ~np.isnan(row.scores).any(1)
    mine, theirs = row.scores[scored], reference.scores[scored]
    diff = float(np.abs(mine - theirs).max())
    agree = int((mine.argmax(1) == theirs.argmax(1)).sum())
    return diff, agree / len(mine), agree, len(mine)


def result_table(rows: list[Row], baseline: Row, total_audio: float, flops: dict[str, float],
                 rates: dict[str, float], gpu: bool) -> tuple[str, dict[str, dict[str, float]]]:
    base_rate = total_audio / baseline.estimate
    headers = ["run", "batches", "audio-s/s", "vs per-clip", "vs per-clip, best rounds", "vs per-clip, CPU time",
               "max abs dp", "top-1 agree",
               "peak mem MB" + (" (GPU)" if gpu else " (RSS delta)"), "floor %", "audio-s/s per round"]
    table, stats = [], {}
    for row in rows:
        rate = total_audio / row.estimate
        diff, agree, n_agree, n_scored = accuracy(row, baseline)
        floor = floor_seconds(flops, row.precision, rates)
        cpu_ratio = baseline.cpu_estimate / row.cpu_estimate
        best_ratio = baseline.best / row.best
        stats[row.name] = {"rate": rate, "ratio": rate / base_rate, "cpu_ratio": cpu_ratio,
                           "best_ratio": best_ratio, "diff": diff,
                           "agree": agree, "floor": floor / row.estimate}
        table.append([
            row.name, row.batches, rate, f"{rate / base_rate:.2f}x", f"{best_ratio:.2f}x", f"{cpu_ratio:.2f}x",
            "0 (reference)" if row is baseline else f"{diff:.2g}",
            "-" if row is baseline else f"{n_agree}/{n_scored}",
            median(row.memory) / 2**20, f"{100 * floor / row.estimate:.2g}%",
            ", ".join(f"{total_audio / s:.3g}" for s in row.seconds),
        ])
    return markdown_table(headers, table), stats


def validated(stat: dict[str, float]) -> bool:
    return stat["agree"] >= ACCURACY_MIN_TOP1 and stat["diff"] <= ACCURACY_MAX_ABS_DIFF


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------------------------------ sections


def build_rows(models: dict[str, Any], baseline_model: Any, lengths: list[int], batch_sizes: list[int],
               max_padded: int, max_padding: float, what_if: list[float], max_attention: int | None,
               what_if_audio: Sequence[float] = ()) -> list[Row]:
    kwargs = {"max_attention": max_attention} if max_attention else {}

    def singles(lengths: list[int]) -> list[list[int]]:
        return [[i] for i in sorted(range(len(lengths)), key=lengths.__getitem__)]

    def planner(size: int, padding: float, padded: int = max_padded) -> Callable[[list[int]], list[list[int]]]:
        return lambda lengths: plan_batches(lengths, max_clips=size, max_padded_samples=padded,
                                            max_padding=padding, **kwargs)

    rows = [Row(BASELINE, "fp32", baseline_model, [[i] for i in range(len(lengths))], reference=True)]
    for precision, model in models.items():
        seen: dict[str, Row] = {}
        for size in batch_sizes:
            replan = singles if size == 1 else planner(size, max_padding)
            plan = replan(lengths)
            key = repr(plan)
            if key in seen:  # same plan as a smaller B: run once, say so
                seen[key].name = re.sub(r"<= (\S+) clips", rf"<= \1/{size} clips", seen[key].name)
                continue
            name = f"{precision}, batch 1" if size == 1 else f"{precision}, planner <= {size} clips, pad {max_padding:.2f}"
            seen[key] = Row(name, precision, model, plan, replan=replan)
            rows.append(seen[key])
        if precision == "fp32":
            size = max(batch_sizes)
            for padding in what_if:
                replan = planner(size, padding)
                rows.append(Row(f"what-if: fp32, planner <= {size} clips, pad {padding:.2f}", "fp32",
                                model, replan(lengths), replan=replan))
            for seconds in what_if_audio:
                replan = planner(size, max_padding, int(seconds * SAMPLE_RATE))
                rows.append(Row(f"what-if: fp32, planner <= {size} clips, pad {max_padding:.2f}, "
                                f"<= {seconds:g} s padded", "fp32", model, replan(lengths), replan=replan))
    return rows


def accuracy_pass(rows: list[Row], clips: Sequence[np.ndarray]) -> None:
    """Score extra clips (untimed) with every non-fp32 row, planned as that row plans, and append them
    to the rows' scores: top-1 agreement over 8 timed clips alone says little."""
    lengths = [len(c) for c in clips]
    checked = [row for row in rows[1:] if row.precision != "fp32" and row.replan is not None]
    if not clips or not checked:
        return
    reference = np.stack([rows[0].model.predict_reference(c).scores for c in clips])
    rows[0].scores = np.concatenate([rows[0].scores, reference])  # type: ignore[list-item]
    for row in checked:
        scores = np.zeros_like(reference)
        for batch in row.replan(lengths):  # type: ignore[misc]
            for i, prediction in zip(batch, row.model.predict([clips[i] for i in batch]), strict=True):
                scores[i] = prediction.scores
        row.scores = np.concatenate([row.scores, scores])  # type: ignore[list-item]
        log(f"accuracy clips: {row.name} done")
    n = len(rows[0].scores)  # type: ignore[arg-type]
    for row in rows[1:]:
        if len(row.scores) < n:  # type: ignore[arg-type]
            row.scores = np.concatenate([row.scores, np.full((n - len(row.scores), 9), np.nan)])  # type: ignore[arg-type]


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    clips_n, min_s, max_s, rounds, max_audio = MODEL_DEFAULTS[defaults_key(args.model)]
    clips_n, min_s, max_s = args.clips or clips_n, args.min_seconds or min_s, args.max_seconds or max_s
    rounds = args.rounds or rounds
    torch.set_num_threads(args.threads)
    directory = model_directory(args.model)
    clips = make_clips(clips_n, min_s, max_s, seed=args.seed)
    lengths = [len(c) for c in clips]
    total_audio = sum(lengths) / SAMPLE_RATE
    log(f"{len(clips)} clips, {total_audio:.1f} s of audio: "
        + ", ".join(f"{n / SAMPLE_RATE:.1f}" for n in sorted(lengths)))

    models: dict[str, Any] = {}
    load_lines = []
    for precision in args.precisions:
        model, seconds, grown = load(directory, precision, "cpu", args.threads)
        models[precision] = model
        load_lines.append(f"{precision} {seconds:.1f} s / +{grown / 2**20:,.0f} MB RSS")
        log(f"loaded {precision} in {seconds:.1f} s")
    baseline_model = models.get("fp32") or load(directory, "fp32", "cpu", args.threads)[0]
    baseline_model.predict_reference(clips[0])  # funasr's first generate warms its own paths

    module = baseline_model._module
    per_clip = [flops_per_clip(module, n) for n in lengths]
    flops = {k: sum(f[k] for f in per_clip) for k in per_clip[0]}
    probe = make_clips(1, 2.0, 2.0, seed=5)[0]
    counted = measured_flops(baseline_model, probe)
    analytic = sum(flops_per_clip(module, len(probe)).values())

    max_padded = int(max_audio * SAMPLE_RATE)
    max_attention = int(args.max_attention_s2 * SAMPLE_RATE**2) if args.max_attention_s2 else None
    rows = build_rows(models, baseline_model, lengths, args.batch_sizes, max_padded, args.max_padding,
                      args.what_if_padding, max_attention, args.what_if_max_audio)
    rates_log: list[dict[str, float]] = []
    started = time.monotonic()
    run_rounds(rows, clips, rounds, "cpu", rates_log)
    log(f"{rounds} rounds in {time.monotonic() - started:.0f} s")
    accuracy_n, accuracy_max_s = ACCURACY_CLIPS[defaults_key(args.model)]
    accuracy_n = args.accuracy_clips if args.accuracy_clips >= 0 else accuracy_n
    accuracy_clips = make_clips(accuracy_n, min_s, accuracy_max_s, seed=args.seed + 100)
    accuracy_pass(rows, accuracy_clips)
    accuracy_audio = sum(len(c) for c in accuracy_clips) / SAMPLE_RATE
    rates = {k: median([r[k] for r in rates_log]) for k in rates_log[0]}

    table, stats = result_table(rows, rows[0], total_audio, flops, rates, gpu=False)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "model": args.model, "threads": args.threads, "clip_seconds": [n / SAMPLE_RATE for n in lengths],
            "load_average": os.getloadavg(), "gemm_flops_per_s": rates_log, "flops": flops,
            "rows": [{"name": r.name, "precision": r.precision, "plan": r.plan, "seconds": r.units,
                      "cpu_seconds": r.cpu_units, "peak_bytes": r.memory, **stats[r.name]} for r in rows],
        }, indent=1))
    total_flops = sum(flops.values())
    print(f"\n### CPU, {args.model}, {args.threads} threads ({len(clips)} clips, {total_audio:.1f} s of "
          f"audio, {min_s:g}-{max_s:g} s log-uniform, {rounds} rounds; {machine_line()}; {cpu_features()})\n")
    print(table)
    if accuracy_clips:
        print(f"\nAccuracy columns of non-fp32 rows also cover {len(accuracy_clips)} untimed clips "
              f"({accuracy_audio:.1f} s, {min_s:g}-{accuracy_max_s:g} s), planned the same way; "
              "fp32 rows: the timed clips only.")
    print(f"\nLoad (time / RSS growth; weights are mmap'd and shared): {'; '.join(load_lines)}.")
    print(f"Compute: {total_flops / total_audio / 1e9:.3g} GFLOP per audio second on this clip set "
          f"(conv {flops['conv'] / total_flops:.0%}, Linear {flops['linear'] / total_flops:.0%}, "
          f"attention {flops['attention'] / total_flops:.0%}); FlopCounterMode on a 2 s clip "
          f"{counted / 1e9:.4g} GFLOP vs analytic {analytic / 1e9:.4g} GFLOP.")
    print("Matmul throughput here (median over rounds, " + f"{args.threads} threads): "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items())
          + ". Floor per mode (whole clip set): "
          + ", ".join(f"{p} {floor_seconds(flops, p, rates):.2f} s" for p in models) + ".")
    return {"stats": stats, "rows": rows, "model": args.model, "clips": clips, "models": models}


def cpu_features() -> str:
    bf16 = "native bf16 (AVX512-BF16/AMX)" if native_cpu_bf16() else "no native bf16: bf16 is emulated"
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def attention_probe(model: Any, seconds_list: Sequence[tuple[int, float]]) -> str:
    """Single forwards of ``count`` equal clips of ``seconds``: peak RSS and time."""
    encoder = model._module.modality_encoders["AUDIO"]
    heads = model._module.blocks[0].attn.num_heads
    extra = encoder.extra_tokens.size(1) if encoder.extra_tokens is not None else 0
    rows = []
    for count, seconds in seconds_list:
        clips = [synth_clip(seconds, 900 + i) for i in range(count)]
        with PeakRss() as peak:
            started = time.perf_counter()
            model.predict(clips)
            elapsed = time.perf_counter() - started
        tokens = model.frames(len(clips[0])) + extra
        scores = count * heads * tokens * tokens * 4  # one fp32 B x H x N x N tensor
        rows.append([f"{count} x {seconds:g} s", f"{count * seconds * seconds:,.0f}", peak.delta / 2**20,
                     peak.delta / 2**20 / (count * seconds), peak.delta / 2**20 / (count * seconds**2),
                     scores / 2**20, f"{peak.delta / scores:.1f}", elapsed])
        log(f"attention probe {count} x {seconds} s: {peak.delta / 2**20:.0f} MB, {elapsed:.1f} s")
    return markdown_table(["batch", "count x longest^2 (s^2)", "peak RSS delta MB", "MB per padded s",
                           "MB per s^2", "one B x H x N x N fp32 tensor MB", "peak / that", "seconds"], rows)


def gpu_section(args: argparse.Namespace, device: str) -> None:
    """The same comparison on a GPU with a clip set large enough to fill batches."""
    directory = model_directory(args.model)
    clips = make_clips(args.gpu_clips, 0.5, 12.0, seed=12)
    lengths = [len(c) for c in clips]
    total_audio = sum(lengths) / SAMPLE_RATE
    subset = clips[: args.gpu_per_clip]  # the per-clip rows run on these only (audio-s/s is comparable)
    subset_audio = sum(len(c) for c in subset) / SAMPLE_RATE
    precisions = [p for p in ("fp32", "bf16", "fp16") if p in args.gpu_precisions]
    models = {p: load(directory, p, device, args.threads)[0] for p in precisions}
    reference_model = models.get("fp32") or load(directory, "fp32", device, args.threads)[0]
    reference_model.predict_reference(clips[0])

    # Per-clip paths on the subset (slow, short): funasr generate and our predict at B=1.
    per_clip = [Row(BASELINE, "fp32", reference_model, [[i] for i in range(len(subset))], reference=True)]
    per_clip += [Row(f"{p}, batch 1", p, m, [[i] for i in range(len(subset))]) for p, m in models.items()]
    run_rounds(per_clip, subset, args.gpu_rounds, device, None)
    baseline = per_clip[0]
    base_rate = subset_audio / baseline.estimate

    # Batched rows on the whole set; accuracy checked against funasr on the subset clips.
    batched = []
    max_padded = int(args.gpu_max_audio_seconds * SAMPLE_RATE)
    kwargs = {"max_attention": int(args.max_attention_s2 * SAMPLE_RATE**2)} if args.max_attention_s2 else {}
    for p, model in models.items():
        for size in args.gpu_batch_sizes:
            plan = plan_batches(lengths, max_clips=size, max_padded_samples=max_padded,
                                max_padding=args.max_padding, **kwargs)
            batched.append(Row(f"{p}, planner <= {size} clips, pad {args.max_padding:.2f}", p, model, plan))
    for model in models.values():  # warm kernels/allocator for these shapes
        model.predict(clips[:2])
    run_rounds(batched, clips, args.gpu_rounds, device, None)

    rates = gemm_rates(device)
    per_clip_flops = [flops_per_clip(reference_model._module, n) for n in lengths]
    flops = {k: sum(f[k] for f in per_clip_flops) for k in per_clip_flops[0]}
    subset_flops_list = per_clip_flops[: len(subset)]
    subset_flops = {k: sum(f[k] for f in subset_flops_list) for k in flops}
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} (dry run)"
    headers = ["run", "clips", "batches", "audio-s/s", "vs per-clip", "max abs dp", "top-1 agree",
               "peak GPU mem MB", "floor %", "audio-s/s per round"]
    table, best = [], (0.0, "")
    for row in per_clip + batched:
        on_subset = any(row is r for r in per_clip)
        audio = subset_audio if on_subset else total_audio
        rate = audio / row.estimate
        scores = row.scores[: len(subset)]  # type: ignore[index]
        diff = float(np.abs(scores - baseline.scores).max())  # type: ignore[operator]
        agree = int((scores.argmax(1) == baseline.scores.argmax(1)).sum())  # type: ignore[union-attr]
        floor = floor_seconds(subset_flops if on_subset else flops,
                              row.precision if row.precision in rates else "fp32", rates)
        ok = agree / len(subset) >= ACCURACY_MIN_TOP1 and diff <= ACCURACY_MAX_ABS_DIFF
        if not on_subset and ok and rate > best[0]:
            best = (rate, row.name)
        table.append([row.name, len(subset) if on_subset else len(clips), row.batches if not on_subset
                      or row.reference else f"{len(subset)} (1 each)", rate, f"{rate / base_rate:.2f}x",
                      "0 (reference)" if row is baseline else f"{diff:.2g}",
                      "-" if row is baseline else f"{agree}/{len(subset)}", median(row.memory) / 2**20,
                      f"{100 * floor / row.estimate:.2g}%",
                      ", ".join(f"{audio / s:.4g}" for s in row.seconds)])
    print(f"\n### GPU, {name}, {args.model} ({len(clips)} clips, {total_audio:.0f} s of audio, 0.5-12 s; "
          f"per-clip rows on the first {len(subset)} clips, {subset_audio:.0f} s; {args.gpu_rounds} rounds)\n")
    print(markdown_table(headers, table))
    print("\nMatmul throughput: " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in rates.items()))
    rate, label = best
    print(f"\nGPU target >= {GPU_TARGET_AUDIO_S_PER_S:,.0f} audio-s/s (best validated batched row, {label}): "
          f"{rate:,.0f}: {verdict(rate >= GPU_TARGET_AUDIO_S_PER_S)}")
    print(f"GPU target >= {GPU_TARGET_VS_PER_CLIP:.0f}x per-clip: {rate / base_rate:.1f}x: "
          f"{verdict(rate / base_rate >= GPU_TARGET_VS_PER_CLIP)}")


def cpu_targets(stats: dict[str, dict[str, float]]) -> None:
    batched = {k: v for k, v in stats.items() if k.startswith("fp32, planner")}
    if batched:
        name, stat = max(batched.items(), key=lambda kv: kv[1]["ratio"])
        print(f"\nCPU target: batched fp32 (default padding cap) >= {CPU_TARGET_BATCHED_VS_PER_CLIP:.1f}x "
              f"per-clip: {stat['ratio']:.2f}x median, {stat['best_ratio']:.2f}x best rounds, {stat['cpu_ratio']:.2f}x CPU time ({name}): "
              f"{verdict(stat['ratio'] >= CPU_TARGET_BATCHED_VS_PER_CLIP)}")
    candidates = {k: v for k, v in stats.items()
                  if k != BASELINE and not k.startswith("what-if") and validated(v)}
    rejected = [k for k, v in stats.items() if k != BASELINE and not validated(v)]
    if candidates:
        name, stat = max(candidates.items(), key=lambda kv: kv[1]["ratio"])
        print(f"CPU target: best validated mode (top-1 >= {ACCURACY_MIN_TOP1:.0%}, max |dp| <= "
              f"{ACCURACY_MAX_ABS_DIFF}) >= {CPU_TARGET_BEST_VS_PER_CLIP:.1f}x per-clip fp32: "
              f"{stat['ratio']:.2f}x median, {stat['best_ratio']:.2f}x best rounds, {stat['cpu_ratio']:.2f}x CPU time ({name}): "
              f"{verdict(stat['ratio'] >= CPU_TARGET_BEST_VS_PER_CLIP)}")
    if rejected:
        print(f"Not validated (accuracy): {'; '.join(rejected)}")
    modes = {k: v for k, v in stats.items() if k != BASELINE and not k.startswith("what-if")}
    if modes:
        name, stat = max(modes.items(), key=lambda kv: kv[1]["ratio"])
        print(f"Fastest mode, validated or not: {name}: {stat['ratio']:.2f}x wall, {stat['cpu_ratio']:.2f}x "
              f"CPU time, max |dp| {stat['diff']:.2g}, top-1 agreement {stat['agree']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    csv_int = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    csv_str = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--model", default="large-shape",
                        help="large-shape (random weights), tiny, or a model directory (e.g. the real "
                             "emotion2vec_plus_large, to validate precisions on real weights)")
    parser.add_argument("--clips", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--accuracy-clips", type=int, default=-1,
                        help="extra untimed clips for the accuracy columns of non-fp32 rows (default per model)")
    parser.add_argument("--seed", type=int, default=11, help="clip set (lengths and signals)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", type=csv_str, default=None,
                        help="default fp32,bf16,int8 (bf16 only where the CPU has native bf16)")
    parser.add_argument("--batch-sizes", type=csv_int, default=[1, 4, 8])
    parser.add_argument("--max-padding", type=float, default=0.15, help="planner padding cap (processor default 0.15)")
    parser.add_argument("--what-if-padding", type=float, nargs="*", default=[],
                        help="extra fp32 rows with these padding caps")
    parser.add_argument("--what-if-max-audio", type=float, nargs="*", default=[],
                        help="extra fp32 rows with the planner's padded audio per batch capped at these seconds")
    parser.add_argument("--max-attention-s2", type=float, default=0.0,
                        help="planner attention cap, count x longest^2 in seconds^2 (0: none)")
    parser.add_argument("--no-attention-probe", action="store_true")
    parser.add_argument("--probe-only", action="store_true", help="only the attention memory probe")
    parser.add_argument("--attention-probe", type=str, default="1x8,4x8,1x16,1x30",
                        help="COUNTxSECONDS,... single forwards for the attention memory table")
    parser.add_argument("--json", default="", help="also write the raw per-forward timings here")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--gpu-clips", type=int, default=512)
    parser.add_argument("--gpu-per-clip", type=int, default=48)
    parser.add_argument("--gpu-rounds", type=int, default=3)
    parser.add_argument("--gpu-batch-sizes", type=csv_int, default=[16, 64])
    parser.add_argument("--gpu-max-audio-seconds", type=float, default=960.0)
    parser.add_argument("--gpu-precisions", type=csv_str, default=["fp32", "bf16", "fp16"])
    parser.add_argument("--gpu-device", default="cuda:0",
                        help="device of the GPU section; 'cpu' runs it as a dry run (testing the script)")
    args = parser.parse_args()
    if args.precisions is None:
        args.precisions = ["fp32", "bf16", "int8"] if native_cpu_bf16() else ["fp32", "int8"]

    if args.probe_only:
        torch.set_num_threads(args.threads)
        models = {"fp32": load(model_directory(args.model), "fp32", "cpu", args.threads)[0]}
    else:
        result = cpu_section(args)
        cpu_targets(result["stats"])
        models = result.pop("models")
        del result
    if not args.no_attention_probe and "fp32" in models:
        probes = [(int(c), float(s)) for c, s in (p.split("x") for p in args.attention_probe.split(","))]
        print(f"\n#### Attention memory, {args.model}, fp32, one forward each ({machine_line()})\n")
        print(attention_probe(models["fp32"], probes))
    del models
    gc.collect()

    if args.no_gpu:
        print("\nGPU section: skipped (--no-gpu).")
    elif args.gpu_device == "cpu":
        gpu_section(args, "cpu")
    elif not torch.cuda.is_available():
        print("\nGPU section: skipped (torch.cuda.is_available() is False on this machine).")
    else:
        gpu_section(args, args.gpu_device)


if __name__ == "__main__":
    main()
