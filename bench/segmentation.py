"""What voice-activity segmentation costs and saves, on calls built from real speech with known silences.

    python bench/segmentation.py [--model large-shape|mid-shape|tiny] [--calls N] [--silence 0.4] [--rounds R]

Calls are espeak-ng sentences (tests/speech_fixtures.py) separated by silences drawn so that ``--silence``
of each call is silence (low noise), so every utterance's true start and end are known. Per call, side by
side in one process:

* ``fixed 30 s windows``: the whole call cut into 30 s windows (``processors/audio.windows``), every window
  through the model, as the processor did before segmentation;
* ``vad utterances``: Silero VAD (``VoiceActivity``, timed on its own), then only the utterances through the
  model.

Both forwards use the same model and the same batch planning as the processor (``plan_batches`` with the
default BatchSettings). Printed: the audio seconds the model saw, model time, VAD time and its share of the
model time (target <= 5% with the large shape on CPU), call-seconds scored per second (the throughput
gain), and boundary accuracy (VAD without padding: start and end within 0.25 s of the truth for >= 95% of
utterances).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from emofleet.core.config import BatchSettings
from emofleet.processors.audio import windows
from emofleet.processors.batch_plan import plan_batches
from emofleet.processors.segmentation import UtteranceRules, VoiceActivity
from emofleet.schemas.emotions import SAMPLE_RATE

from harness import log, machine_line, markdown_table, median

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from speech_fixtures import PHRASES, Call, build_call, espeak_available, speak  # noqa: E402
from processor import load_bench_model  # noqa: E402

TARGET_VAD_SHARE = 0.05
TARGET_BOUNDARY_HITS = 0.95
TOLERANCE_SECONDS = 0.25


def cpu_flags() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def make_calls(count: int, silence: float, cache: Path, seed: int = 0) -> list[Call]:
    speech = [speak(text, cache) for text in PHRASES]
    speech_seconds = sum(len(s) for s in speech) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    calls = []
    for index in range(count):
        weights = rng.uniform(0.5, 1.5, len(speech) + 1)
        gaps = list(weights / weights.sum() * speech_seconds * silence / (1 - silence))
        calls.append(build_call(speech, gaps, seed=seed + index))
    return calls


def model_seconds(model, settings, clips: list[np.ndarray]) -> float:  # type: ignore[no-untyped-def]
    """Wall seconds to score ``clips`` in the processor's planned batches."""
    limits = BatchSettings()
    plan = plan_batches([len(c) for c in clips], max_clips=limits.max_clips,
                        max_padded_samples=int(limits.max_audio_seconds * SAMPLE_RATE),
                        max_padding=limits.max_padding_fraction)
    started = time.perf_counter()
    for indices in plan:
        model.predict([clips[i] for i in indices], granularity=settings.granularity)
    return time.perf_counter() - started


def boundary_hits(found: list[tuple[int, int]], truth: list[tuple[float, float]]) -> tuple[int, int]:
    """(utterances whose start and end are within tolerance of the true one, true utterances)."""
    hits = 0
    for true_start, true_end in truth:
        hits += any(abs(s / SAMPLE_RATE - true_start) <= TOLERANCE_SECONDS
                    and abs(e / SAMPLE_RATE - true_end) <= TOLERANCE_SECONDS for s, e in found)
    return hits, len(truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="large-shape", choices=("tiny", "mid-shape", "large-shape"))
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--silence", type=float, default=0.4, help="share of each call that is silence")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "emofleet" / "bench")
    args = parser.parse_args()
    if not espeak_available():
        raise SystemExit("bench/segmentation.py needs espeak-ng and sox (bash infra/dev.sh setup installs them)")
    calls = make_calls(args.calls, args.silence, args.cache / "speech")
    model, settings = load_bench_model(args.model, args.cache)
    vad = VoiceActivity()
    rules = UtteranceRules()
    exact = UtteranceRules(padding_seconds=0.0)
    vad.utterances(calls[0].samples[:SAMPLE_RATE], rules)  # load the VAD and warm its graph
    model_seconds(model, settings, [calls[0].samples[:2 * SAMPLE_RATE]])  # and the model's
    fixed_s, vad_model_s, vad_s = [], [], []
    audio_fixed = audio_vad = 0.0
    hits = total = 0
    for round_index in range(args.rounds):
        for call in calls:
            fixed_clips = [call.samples[s:e] for s, e in windows(len(call.samples), 30.0)]
            started = time.perf_counter()
            utterances = vad.utterances(call.samples, rules)
            vad_s.append(time.perf_counter() - started)
            vad_clips = [call.samples[s:e] for s, e in utterances]
            order = (fixed_clips, vad_clips) if round_index % 2 == 0 else (vad_clips, fixed_clips)
            timed = {id(clips): model_seconds(model, settings, clips) for clips in order}
            fixed_s.append(timed[id(fixed_clips)])
            vad_model_s.append(timed[id(vad_clips)])
            if round_index == 0:
                audio_fixed += sum(len(c) for c in fixed_clips) / SAMPLE_RATE
                audio_vad += sum(len(c) for c in vad_clips) / SAMPLE_RATE
                h, t = boundary_hits(vad.utterances(call.samples, exact), call.truth)
                hits, total = hits + h, total + t
        log(f"round {round_index + 1}/{args.rounds} done")
    call_seconds = sum(c.seconds for c in calls)
    fixed_median, vad_model_median, vad_median = median(fixed_s), median(vad_model_s), median(vad_s)
    per_call = call_seconds / len(calls)
    rows = [
        ["fixed 30 s windows", audio_fixed, fixed_median, 0.0, "-", per_call / fixed_median, 1.0],
        ["vad utterances", audio_vad, vad_model_median, vad_median, f"{vad_median / vad_model_median:.1%}",
         per_call / (vad_model_median + vad_median), fixed_median / (vad_model_median + vad_median)],
    ]
    print(f"\n### Segmentation: {len(calls)} calls of {per_call:.1f} s ({args.silence:.0%} silence, "
          f"{len(PHRASES)} espeak-ng utterances each), model {args.model}, medians over {args.rounds} rounds "
          f"per call\n\n{machine_line()}; CPU flags: {cpu_flags()}\n")
    print(markdown_table(["segmentation", "model audio s (all calls)", "model s / call", "VAD s / call",
                          "VAD / model", "call s scored per s", "ratio vs fixed"], rows))
    share = vad_median / vad_model_median
    print(f"\nboundaries within {TOLERANCE_SECONDS} s: {hits}/{total} = {hits / total:.1%} "
          f"(target >= {TARGET_BOUNDARY_HITS:.0%}): {'PASS' if hits / total >= TARGET_BOUNDARY_HITS else 'FAIL'}")
    verdict = "PASS" if share <= TARGET_VAD_SHARE else "FAIL"
    print(f"VAD time / model time = {share:.1%} (target <= {TARGET_VAD_SHARE:.0%} with large-shape): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
