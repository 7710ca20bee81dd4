"""One padded forward of funasr's ``Emotion2vec`` for clips of mixed lengths, exact per clip.

funasr's own inference loops one waveform at a time. A naive padded forward drifts for mixed lengths
(cosine ~0.998) because padding leaks into valid frames. This module walks the funasr module's
submodules (nothing in funasr is patched) and closes every leak:

1. ``layer_norm`` of each waveform over its own samples, before padding (as ``inference`` does).
2. Conv feature extractor: in ``layer_norm`` mode every op is per frame, and a valid output frame's
   receptive field lies inside the clip, so valid frames are exact. (``default`` mode group-normalises
   over time, which would leak, so it is run per clip.)
3. Relative positional encoder (depth x [grouped Conv1d k=19 -> LayerNorm -> GELU]): padded frames
   become non-zero after each layer, so the valid-frame mask is multiplied into the input of EVERY
   conv, which then sees exactly the zeros that its own ``padding=k//2`` gives a lone clip.
4. Attention: padded keys are masked with ``padding_mask`` (extra tokens are always valid).
   ALiBi is computed for this call only (1 x H x T x T, broadcast over the batch) instead of through
   funasr's cache, which keeps a batch x H x T x T buffer alive after every call.
5. Pooling and per-frame outputs use only each clip's valid frames (conv length formula).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def frame_count(num_samples: int, layers: Sequence[tuple[int, int, int]]) -> int:
    """Frames the conv feature extractor yields for ``num_samples`` (floor((L - k) / s) + 1 per layer)."""
    length = num_samples
    for _dim, kernel, stride in layers:
        length = (length - kernel) // stride + 1
    return length


def min_samples(layers: Sequence[tuple[int, int, int]]) -> int:
    """Shortest input that yields one frame (400 samples = 25 ms for emotion2vec)."""
    length = 1
    for _dim, kernel, stride in reversed(layers):
        length = (length - 1) * stride + kernel
    return length


@torch.inference_mode()
def batched_features(model: Any, clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Frame features (B x T x D, extra tokens removed) and the valid frame count of each clip.

    ``model`` is funasr's ``Emotion2vec`` (untyped, hence ``Any``) in eval mode; ``clips`` are 1-D
    float tensors on its device, each long enough for one frame. Frames past a clip's count are
    padding: ignore them.
    """
    encoder = model.modality_encoders["AUDIO"]
    cfg = encoder.modality_cfg
    layers = encoder.feature_enc_layers
    counts = [frame_count(int(clip.shape[0]), layers) for clip in clips]
    if min(counts) < 1:
        raise ValueError(f"every clip needs at least {min_samples(layers)} samples")

    if model.cfg.get("normalize", False):
        clips = [F.layer_norm(clip, clip.shape) for clip in clips]
    if cfg.extractor_mode == "layer_norm":
        x = encoder.local_features(nn.utils.rnn.pad_sequence(list(clips), batch_first=True))
    else:
        x = nn.utils.rnn.pad_sequence(
            [encoder.local_features(clip[None])[0] for clip in clips], batch_first=True
        )
    batch, frames, _ = x.shape
    assert frames == max(counts), (frames, counts)
    lengths = torch.tensor(counts, device=x.device)
    valid = torch.arange(frames, device=x.device)[None, :] < lengths[:, None]  # B x T
    padding_mask = ~valid if not bool(valid.all()) else None

    if encoder.relative_positional_encoder is not None:
        x = x + _masked_positional(encoder.relative_positional_encoder, x, valid[:, None, :].to(x.dtype))

    alibi_bias, alibi_scale = _alibi(encoder, frames, x)
    num_extra = 0
    if encoder.extra_tokens is not None:
        num_extra = encoder.extra_tokens.size(1)
        x = torch.cat([encoder.extra_tokens.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        if padding_mask is not None:
            padding_mask = F.pad(padding_mask, (num_extra, 0))
        if alibi_bias is not None:
            alibi_bias = F.pad(alibi_bias, (num_extra, 0, num_extra, 0))

    prenet_depth = cfg.prenet_depth
    x = encoder.context_encoder(
        x,
        padding_mask,
        alibi_bias,
        alibi_scale[:prenet_depth] if alibi_scale is not None else None,
    )
    if alibi_scale is not None and alibi_scale.size(0) > 1:
        alibi_scale = alibi_scale[prenet_depth:]
    for i, block in enumerate(model.blocks):
        bias = alibi_bias
        if bias is not None and alibi_scale is not None:
            scale = alibi_scale[i] if alibi_scale.size(0) > 1 else alibi_scale.squeeze(0)
            bias = bias * scale.type_as(bias)
        x, _ = block(x, padding_mask=padding_mask, alibi_bias=bias)
    if model.norm is not None:
        x = model.norm(x)
    return x[:, num_extra:], counts


def _masked_positional(module: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run the positional conv stack with ``mask`` (B x 1 x T) multiplied into every conv input."""
    for child in module.children() if isinstance(module, nn.Sequential) else (module,):
        if isinstance(child, nn.Sequential):
            x = _masked_positional(child, x, mask)
        elif isinstance(child, nn.Conv1d):
            x = child(x * mask.to(x.dtype))  # conv input is B x C x T
        else:
            x = child(x)
    return x


def _alibi(
    encoder: Any, frames: int, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ALiBi bias (1 x H x T x T) and remaining per-layer scales, as in funasr's encoder."""
    if encoder.get_alibi_bias is None:
        return None, encoder.alibi_scale
    cfg = encoder.modality_cfg
    if cfg.learned_alibi:
        bias = encoder.get_alibi_bias(
            batch_size=1, time_steps=frames, heads=cfg.num_alibi_heads, scale=1.0,
            dtype=torch.float32, device=x.device,
        )
    else:
        from funasr.models.emotion2vec.base import get_alibi

        bias = get_alibi(frames, cfg.num_alibi_heads).to(dtype=torch.float32, device=x.device)[None]
    scale = encoder.alibi_scale
    if scale is not None:
        scale = scale.clamp_min(0)
        if scale.size(0) == 1:
            bias = bias * scale.squeeze(0).type_as(bias)
            scale = None
    return bias, scale
