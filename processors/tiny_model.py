"""Build emotion2vec-shaped model directories with random weights, for tests and benchmarks.

The directory has the hub layout (config.yaml, model.pt, tokens.txt, configuration.json), is built
with funasr's own ``Emotion2vec`` class, and is loaded through the same :func:`load_model` path as
the real checkpoints. Weights are random but seeded, so a directory is byte-for-byte reproducible.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

# tokens.txt of the real emotion2vec+ checkpoints, in class order. The 9th token is literally
# "<unk>": funasr's CharTokenizer requires that symbol to exist ("<unk>/unknown" breaks loading).
TOKENS: tuple[str, ...] = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)

# Same conv kernels/strides as the real model (320-sample hop: 50 frames/s, 400-sample minimum).
FEATURE_ENCODER_SPEC = "[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c},2,2)] + [({c},2,2)]"

# Bumped whenever the builder's output changes, so stale cached tiny models are rebuilt.
_BUILDER_VERSION = 1
_MARKER = ".emofleet-built.json"


def emotion2vec_config(
    *,
    embed_dim: int,
    num_heads: int,
    depth: int,
    prenet_depth: int,
    extractor_dim: int = 512,
    normalize: bool = True,
) -> dict[str, Any]:
    """A config.yaml (as a dict) with the emotion2vec+ / data2vec 2.0 audio structure.

    The large checkpoint is ``embed_dim=1024, num_heads=16, depth=16, prenet_depth=8``
    (24 transformer blocks). Training-only fields are kept so funasr builds the same modules.
    """
    audio = {
        "type": "AUDIO",
        "prenet_depth": prenet_depth,
        "prenet_layerdrop": 0.0,
        "prenet_dropout": 0.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "num_extra_tokens": 10,
        "init_extra_token_zero": False,
        "mask_noise_std": 0.01,
        "mask_prob_min": None,
        "mask_prob": 0.5,
        "inverse_mask": False,
        "mask_prob_adjust": 0.05,
        "keep_masked_pct": 0.0,
        "mask_length": 5,
        "add_masks": False,
        "remove_masks": False,
        "mask_dropout": 0.0,
        "encoder_zero_mask": True,
        "mask_channel_prob": 0.0,
        "mask_channel_length": 64,
        "ema_local_encoder": False,
        "local_grad_mult": 1.0,
        "use_alibi_encoder": True,
        "alibi_scale": 1.0,
        "learned_alibi": False,
        "alibi_max_pos": None,
        "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": False,
        "num_alibi_heads": num_heads,
        "model_depth": depth,
        "decoder": None,
        "extractor_mode": "layer_norm",
        "feature_encoder_spec": FEATURE_ENCODER_SPEC.format(c=extractor_dim),
        "conv_pos_width": 95,
        "conv_pos_groups": 16,
        "conv_pos_depth": 5,
        "conv_pos_pre_ln": False,
    }
    return {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0,
            "loss_scale": None,
            "depth": depth,
            "start_drop_path_rate": 0.0,
            "end_drop_path_rate": 0.0,
            "num_heads": num_heads,
            "norm_eps": 1e-05,
            "norm_affine": True,
            "encoder_dropout": 0.1,
            "post_mlp_drop": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.0,
            "dropout_input": 0.0,
            "layerdrop": 0.0,
            "embed_dim": embed_dim,
            "mlp_ratio": 4.0,
            "layer_norm_first": False,
            "average_top_k_layers": depth,
            "end_of_block_targets": False,
            "clone_batch": 1,
            "normalize": normalize,
            "modalities": {"audio": audio},
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


TINY_CONFIG = emotion2vec_config(embed_dim=64, num_heads=4, depth=1, prenet_depth=1, extractor_dim=32)
LARGE_CONFIG = emotion2vec_config(embed_dim=1024, num_heads=16, depth=16, prenet_depth=8)


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write the tiny test model (64-d, 2 blocks, ~0.6 MB) into ``directory``; idempotent."""
    return build_random_model(directory, TINY_CONFIG, seed=seed)


def build_random_model(
    directory: Path, config: dict[str, Any], *, seed: int = 0, proj_scale: float = 30.0
) -> Path:
    """Write a hub-layout model directory for ``config`` with seeded random weights.

    Idempotent: an existing directory built from the same (config, seed, builder version) is
    reused. The directory is assembled next to its final place and renamed in, so concurrent
    builders and interrupted builds never leave a half-written model behind.
    """
    directory = Path(directory).expanduser()
    recipe = {"version": _BUILDER_VERSION, "seed": seed, "proj_scale": proj_scale, "config": config}
    marker = directory / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == recipe:
                return directory
        except (OSError, ValueError):
            pass
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _write_model(staging, config, seed, proj_scale)
        (staging / _MARKER).write_text(json.dumps(recipe))
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process won the race; its directory is equivalent if its marker matches.
            if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_model(directory: Path, config: dict[str, Any], seed: int, proj_scale: float) -> None:
    from funasr.models.emotion2vec.model import Emotion2vec

    conf = copy.deepcopy(config)
    # fork_rng: funasr's initialisers draw from the global RNG; keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Emotion2vec(model_conf=conf["model_conf"], vocab_size=len(TOKENS))
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                # Non-trivial values for parameters that default to constants, so tests exercise
                # them (LayerNorm affine, ALiBi scales, extra tokens) and outputs are not degenerate.
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith("alibi_scale"):
                    param.copy_(0.5 + torch.rand(param.shape, generator=generator))
                elif param.ndim == 1 and ("norm" in name or "project_features.1" in name):
                    param.add_(0.1 * noise)
                elif name.endswith("extra_tokens"):
                    param.copy_(noise)
            assert model.proj is not None
            # Random features average out over time; a larger head makes labels vary across inputs.
            model.proj.weight.mul_(proj_scale)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, directory / "model.pt")
    (directory / "config.yaml").write_text(
        "# emotion2vec-shaped model with seeded random weights (emofleet test fixture)\n"
        + OmegaConf.to_yaml(OmegaConf.create(conf))
    )
    (directory / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    (directory / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "task": "emotion-recognition",
                "model": {"type": "emotion2vec"},
                "file_path_metas": {
                    "init_param": "model.pt",
                    "config": "config.yaml",
                    "tokenizer_conf": {"token_list": "tokens.txt"},
                },
            },
            indent=2,
        )
    )
