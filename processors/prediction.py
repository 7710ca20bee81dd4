"""What a model returns for one clip: defined apart from the model so that readers of results (events, the
gateway's cache lookups) need neither torch nor funasr."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # float32 (9,), order of EMOTIONS, sums to 1
    label: str  # argmax of scores
    confidence: float  # max score
    embedding: np.ndarray | None  # (D,) mean of the clip's frame features, when requested
    frame_scores: np.ndarray | None  # (T, 9), one row per 20 ms frame, for granularity "frame"
