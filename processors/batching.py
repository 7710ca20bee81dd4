"""Model batches from clips of mixed length: pure planning, no tensors.

A padded batch costs its longest clip times its size (and attention grows with the square of the
length), so clips are sorted by length and a batch is cut when it would exceed the clip count, the
padded size, or waste more than ``max_padding`` of its samples on padding. On a GPU that keeps
batches dense; on a CPU, where batching mixed lengths buys little, tight buckets keep it from
costing more than one clip at a time.
"""

from __future__ import annotations


def plan_batches(lengths: list[int], *, max_clips: int, max_padded_samples: int,
                 max_padding: float = 0.15) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, shortest first; every index appears once."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in order:
        length = lengths[index]
        size = len(current) + 1
        padded = length * size  # sorted: this clip is the longest so far
        wasted = (padded - total - length) / padded if padded else 0.0
        if current and (size > max_clips or padded > max_padded_samples or wasted > max_padding):
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += length
    if current:
        batches.append(current)
    return batches
