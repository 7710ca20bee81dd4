"""Accuracy of each precision mode against fp32 funasr per clip, without timing.

    python bench/precision_accuracy.py [--model large-shape|tiny|DIR] [--precisions bf16,int8]
                                       [--planner-clips 8] [--threads T]

``bench/inference.py`` times precisions and reports their accuracy; this script only scores, so it can
check a mode this CPU cannot run fast (bf16 without AVX512-BF16/AMX is emulated, ~8x slower than fp32)
or a real checkpoint (``--model DIR``) before choosing a mode. Same clips as ``bench/inference.py``
(its 8 timed clips of 0.5-12 s plus its 16 accuracy clips of 0.5-4 s, same seeds); each mode scores
them one clip per forward and in planner batches of <= ``--planner-clips`` (padding cap 0.15, as the
processor), since int8's activation scales depend on the batch. Validated = top-1 agreement >= 95%
and max |score difference| <= 0.05, as in ``bench/inference.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from emofleet.processors.batch_plan import plan_batches
from emofleet.processors.model import EmotionModel
from emofleet.schemas.emotions import EMOTIONS, SAMPLE_RATE

from harness import log, machine_line, markdown_table
from inference import (ACCURACY_MAX_ABS_DIFF, ACCURACY_MIN_TOP1, cpu_features, load, make_clips,
                       model_directory)


def scores_of(model: EmotionModel, clips: list[np.ndarray], plan: list[list[int]]) -> np.ndarray:
    scores = np.zeros((len(clips), len(EMOTIONS)), dtype=np.float32)
    for batch in plan:
        for index, prediction in zip(batch, model.predict([clips[i] for i in batch]), strict=True):
            scores[index] = prediction.scores
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="large-shape", help="large-shape, tiny, or a model directory")
    parser.add_argument("--precisions", default="bf16,int8")
    parser.add_argument("--planner-clips", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    directory = model_directory(args.model)
    clips = make_clips(8, 0.5, 12.0, seed=11) + make_clips(16, 0.5, 4.0, seed=111)
    fp32 = load(directory, "fp32", "cpu", args.threads)[0]
    started = time.monotonic()
    reference = np.stack([fp32.predict_reference(c).scores for c in clips])
    log(f"fp32 per-clip reference for {len(clips)} clips in {time.monotonic() - started:.0f} s")
    del fp32

    singles = [[i] for i in range(len(clips))]
    planned = plan_batches([len(c) for c in clips], max_clips=args.planner_clips,
                           max_padded_samples=240 * SAMPLE_RATE, max_padding=0.15)
    rows = []
    for precision in [p for p in args.precisions.split(",") if p]:
        model = load(directory, precision, "cpu", args.threads)[0]
        for name, plan in ((f"{precision}, batch 1", singles),
                           (f"{precision}, planner <= {args.planner_clips} clips", planned)):
            started = time.monotonic()
            scores = scores_of(model, clips, plan)
            diff = np.abs(scores - reference).max(axis=1)
            agree = int((scores.argmax(1) == reference.argmax(1)).sum())
            ok = agree / len(clips) >= ACCURACY_MIN_TOP1 and diff.max() <= ACCURACY_MAX_ABS_DIFF
            rows.append([name, f"{diff.max():.3g}", f"{diff.mean():.3g}", int((diff > 0.02).sum()),
                         f"{agree}/{len(clips)}", "yes" if ok else "no"])
            log(f"{name}: max |dp| {diff.max():.3g} in {time.monotonic() - started:.0f} s")
        del model
    print(f"\n### Accuracy vs fp32 funasr per clip, {args.model} ({len(clips)} clips; {machine_line()}; "
          f"{cpu_features()})\n")
    print(markdown_table(["mode", "max abs dp", "mean of per-clip max abs dp", "clips over 0.02",
                          "top-1 agree", "validated"], rows))


if __name__ == "__main__":
    main()
