"""One forward of funasr's ``Emotion2vec`` for clips of mixed lengths, exact per clip.

funasr's own inference loops one waveform at a time. A naive padded forward drifts for mixed lengths
(cosine ~0.998) because padding leaks into valid frames, and it pays for every padded frame in every
Linear layer. This module walks the funasr module's submodules (nothing in funasr is patched):

1. ``layer_norm`` of each waveform over its own samples, before padding (as ``inference`` does).
2. Conv feature extractor: per clip on CPU (no padded work, one clip's activations at a time). On
   GPUs, in ``layer_norm`` mode, as one padded call: every op is per frame and a valid output frame's
   receptive field lies inside the clip, so valid frames are exact. (``default`` mode group-normalises
   over time, which would leak, so it always runs per clip.)
3. Relative positional encoder (depth x [grouped Conv1d k=19 -> LayerNorm -> GELU]): padded frames
   become non-zero after each layer, so the valid-frame mask is multiplied into the input of EVERY
   conv, which then sees exactly the zeros that its own ``padding=k//2`` gives a lone clip.
4. Transformer blocks run on the valid tokens only, packed into one sequence (the clips' tokens end to
   end): LayerNorm, Linear and MLP are per token, so ~80% of the FLOPs see no padding at all.
   Attention is the one op that mixes tokens; it runs per clip in fp32 on CPU (attention memory of
   one clip, not of the batch) and padded with the padding keys masked on GPUs (one batched call).
   ALiBi is computed for this call only (1 x H x T x T, cropped per clip) instead of through funasr's
   cache, which keeps a batch x H x T x T buffer alive after every call.
5. Pooling and per-frame outputs use only each clip's valid frames (conv length formula).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# Submodules that run in fp32 even in bf16/fp16 mode (their weights are never cast): the positional
# convs, whose rounding feeds every later layer, and the classification head. 1.6% of the large
# model's FLOPs; they take most of bf16's error away (bench/README.md).
FP32_SUBMODULES = ("modality_encoders.AUDIO.relative_positional_encoder", "proj")


def in_fp32_submodule(name: str) -> bool:
    """Whether the submodule called ``name`` (as in ``named_modules``) belongs to ``FP32_SUBMODULES``."""
    return any(name == root or name.startswith(root + ".") for root in FP32_SUBMODULES)


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


@dataclass(frozen=True)
class Packing:
    """Where each clip's tokens sit: ``valid`` (B x N) marks real tokens of the padded layout; the
    packed sequence holds them row by row, clip ``i`` at ``spans[i] = (start, length)``."""

    valid: torch.Tensor
    spans: list[tuple[int, int]]
    padded_attention: bool

    @classmethod
    def of(cls, valid: torch.Tensor, *, padded_attention: bool) -> Packing:
        lengths = valid.sum(1).tolist()
        starts = [0, *accumulate(lengths)][:-1]
        return cls(valid, list(zip(starts, lengths, strict=True)), padded_attention)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed (S x D) -> padded (B x N x D), zeros where ``valid`` is False."""
        dense = packed.new_zeros(*self.valid.shape, packed.shape[-1])
        dense[self.valid] = packed
        return dense


@torch.inference_mode()
def batched_features(
    model: Any, clips: Sequence[torch.Tensor], *, padded: bool | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Frame features (B x T x D, extra tokens removed) and the valid frame count of each clip.

    ``model`` is funasr's ``Emotion2vec`` (untyped, hence ``Any``) in eval mode; ``clips`` are 1-D
    float tensors on its device, each long enough for one frame. Frames past a clip's count are
    zeros: ignore them. ``padded`` runs the extractor and attention as one padded call each (the GPU
    layout; default: on unless the clips are on the CPU); results are the same either way.
    """
    encoder = model.modality_encoders["AUDIO"]
    cfg = encoder.modality_cfg
    layers = encoder.feature_enc_layers
    counts = [frame_count(int(clip.shape[0]), layers) for clip in clips]
    if min(counts) < 1:
        raise ValueError(f"every clip needs at least {min_samples(layers)} samples")

    if model.cfg.get("normalize", False):
        clips = [F.layer_norm(clip, clip.shape) for clip in clips]
    if padded is None:
        padded = clips[0].device.type != "cpu"
    if padded and cfg.extractor_mode == "layer_norm":
        x = encoder.local_features(nn.utils.rnn.pad_sequence(list(clips), batch_first=True))
    else:
        x = nn.utils.rnn.pad_sequence(
            [encoder.local_features(clip[None])[0] for clip in clips], batch_first=True
        )
    batch, frames, _ = x.shape
    assert frames == max(counts), (frames, counts)
    lengths = torch.tensor(counts, device=x.device)
    valid = torch.arange(frames, device=x.device)[None, :] < lengths[:, None]  # B x T

    if encoder.relative_positional_encoder is not None:
        with torch.autocast(x.device.type, enabled=False):  # fp32 under bf16 too: see FP32_SUBMODULES
            x = x.float()
            x = x + _masked_positional(encoder.relative_positional_encoder, x, valid[:, None, :].float())

    alibi_bias, alibi_scale = _alibi(encoder, frames, x)
    num_extra = 0
    if encoder.extra_tokens is not None:
        num_extra = encoder.extra_tokens.size(1)
        x = torch.cat([encoder.extra_tokens.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        valid = F.pad(valid, (num_extra, 0), value=True)
        if alibi_bias is not None:
            alibi_bias = F.pad(alibi_bias, (num_extra, 0, num_extra, 0))

    packing = Packing.of(valid, padded_attention=padded)
    tokens = x[valid]
    prenet_depth = cfg.prenet_depth
    tokens = _run_context_encoder(
        encoder.context_encoder, tokens, packing, alibi_bias,
        alibi_scale[:prenet_depth] if alibi_scale is not None else None,
    )
    if alibi_scale is not None and alibi_scale.size(0) > 1:
        alibi_scale = alibi_scale[prenet_depth:]
    for i, block in enumerate(model.blocks):
        tokens = _run_block(block, tokens, packing, _scaled_bias(alibi_bias, alibi_scale, i))
    if model.norm is not None:
        tokens = model.norm(tokens)
    return packing.unpack(tokens)[:, num_extra:], counts


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


def _scaled_bias(bias: torch.Tensor | None, scale: torch.Tensor | None, index: int) -> torch.Tensor | None:
    if bias is None or scale is None:
        return bias
    layer_scale = scale[index] if scale.size(0) > 1 else scale.squeeze(0)
    return bias * layer_scale.type_as(bias)


def _run_context_encoder(
    context: Any, tokens: torch.Tensor, packing: Packing,
    bias: torch.Tensor | None, scale: torch.Tensor | None,
) -> torch.Tensor:
    """funasr's ``BlockEncoder.forward`` in eval mode, on packed tokens."""
    if context.norm is not None and not context.layer_norm_first:
        tokens = context.norm(tokens)
    for i, block in enumerate(context.blocks):
        tokens = _run_block(block, tokens, packing, _scaled_bias(bias, scale, i))
    if context.norm is not None and context.layer_norm_first:
        tokens = context.norm(tokens)
    return tokens


def _run_block(block: Any, x: torch.Tensor, packing: Packing, bias: torch.Tensor | None) -> torch.Tensor:
    """funasr's ``AltBlock.forward`` in eval mode (dropouts and drop-path are identities), on packed
    tokens; mirrors both residual layouts as written upstream."""
    if block.layer_norm_first:
        x = x + _attention(block.attn, block.norm1(x), packing, bias)
        mlp_out = block.mlp(block.norm2(x))
        return mlp_out + mlp_out
    x = block.norm1(x + _attention(block.attn, x, packing, bias))
    return block.norm2(x + block.mlp(x))


def _attention(attn: Any, x: torch.Tensor, packing: Packing, bias: torch.Tensor | None) -> torch.Tensor:
    """funasr's ``AltAttention.forward`` on packed tokens: per clip, or padded with padding keys masked.
    funasr's ``Emotion2vec`` never enables cosine attention, so that branch is not mirrored."""
    if attn.cosine_attention:
        raise ValueError("cosine attention is not supported by the batched forward")
    heads = attn.num_heads
    width = x.shape[-1]
    qkv = attn.qkv(x)
    if not packing.padded_attention:
        context = qkv.new_empty(x.shape[0], width)
        for start, length in packing.spans:
            q, k, v = qkv[start:start + length].view(length, 3, heads, width // heads).permute(1, 2, 0, 3)
            clip_bias = bias[0, :, :length, :length] if bias is not None else None
            clip_context = _clip_attention(attn, q, k, v, clip_bias)
            context[start:start + length] = clip_context.transpose(0, 1).reshape(length, width)
    else:
        batch, tokens = packing.valid.shape
        dense = packing.unpack(qkv).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = dense[0], dense[1], dense[2]
        padding = ~packing.valid[:, None, None, :] if not bool(packing.valid.all()) else None
        probs = _attention_probs(attn, q, k, bias, padding)
        context = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)[packing.valid]
    return attn.proj(context)


def _clip_attention(
    attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """One clip's attention (heads x tokens x head_dim), always in fp32: the scale and the ALiBi add
    ride in one ``baddbmm`` (~1.5x faster on CPU than separate passes over the H x N x N scores, same
    values), and under bf16 the scores, bias and softmax keep fp32 precision for ~6% of the FLOPs."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        if bias is None:
            scores = torch.bmm(q * attn.scale, k.transpose(-2, -1))
        else:
            scores = torch.baddbmm(bias, q, k.transpose(-2, -1), alpha=attn.scale)
        return torch.bmm(scores.softmax(dim=-1), v)


def _attention_probs(
    attn: Any, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, padding: torch.Tensor | None,
) -> torch.Tensor:
    """Softmaxed attention scores exactly as ``AltAttention`` computes them (heads on dim -3)."""
    dtype = q.dtype
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores.type_as(bias) + bias
    if padding is not None:
        scores = scores.masked_fill(padding, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
