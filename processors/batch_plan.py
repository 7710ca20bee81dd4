"""Model batches from clips of mixed length: pure planning, no tensors.

On a GPU a batch's feature extractor and attention run padded, so they cost its longest clip times
its size (attention with the square of the length); its Linear layers see only real tokens
(``processors/packed_forward.py`` packs them). So clips are sorted by length and a batch is cut when it would
exceed the clip count, the padded size, or waste more than ``max_padding`` of its samples on padding.
On a CPU nothing runs padded but the small positional convs, so the caps there bound memory.

``max_attention`` (optional) bounds ``count x longest^2`` in samples^2 (at 16 kHz one second^2 is
256e6 samples^2). emotion2vec's attention materialises count x heads x N x N fp32 scores per block
(N = frames + extra tokens, 50 frames/s) with several copies alive at once, so a batch's attention
memory grows with the square of its longest clip while ``max_padded_samples`` only bounds it
linearly (bench/README.md measures the bytes per second^2).
"""

from __future__ import annotations


def plan_batches(lengths: list[int], *, max_clips: int, max_padded_samples: int,
                 max_padding: float = 0.15, max_attention: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, shortest first; every index appears once.

    A clip that alone exceeds a cap still gets a batch of its own (long audio is windowed upstream).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in order:
        length = lengths[index]
        size = len(current) + 1
        padded = length * size  # sorted: this clip is the longest so far
        wasted = (padded - total - length) / padded if padded else 0.0
        too_much_attention = max_attention is not None and size * length * length > max_attention
        if current and (size > max_clips or padded > max_padded_samples or wasted > max_padding
                        or too_much_attention):
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += length
    if current:
        batches.append(current)
    return batches
