"""emotion2vec+ loading, strict weights and exact batching, on locally built random-weight models.

The first test in a session pays funasr's import (~6 s: it imports all its submodules). The
full large shape (24 x 1024-d blocks, 1.3 GB) is too heavy for the suite; a "mid" model with the
large model's per-layer shapes but 2 blocks stands in, and EMOFLEET_TEST_LARGE=1 runs the real shape.
"""

from __future__ import annotations

import copy
import logging

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from emofleet.processors.packed_forward import batched_features, in_fp32_submodule
from emofleet.processors.model import (
    EmotionModel,
    ModelLoadError,
    Prediction,
    build_tiny_model,
    load_model,
)
from emofleet.processors.tiny_model import (
    LARGE_CONFIG,
    TINY_CONFIG,
    build_random_model,
    emotion2vec_config,
)
from emofleet.schemas.emotions import EMOTIONS
from emofleet.core.config import ModelSettings

SR = 16_000
SCORE_TOL = 1e-5
COSINE_MIN = 0.99999


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> EmotionModel:
    return load_model(ModelSettings(model="tiny"), cache_dir=cache_dir)


def _clips(seconds: list[float], seed: int = 0) -> list[np.ndarray]:
    """Noise, tones and silence gaps at varied levels, so clips differ in more than length."""
    rng = np.random.default_rng(seed)
    clips = []
    for s in seconds:
        n = max(int(s * SR), 400)
        t = np.arange(n) / SR
        wave = rng.uniform(0.01, 1.0) * rng.standard_normal(n)
        wave += rng.uniform(0, 2) * np.sin(2 * np.pi * rng.uniform(80, 3000) * t)
        wave[: rng.integers(0, n // 4 + 1)] *= 0.01
        clips.append(wave.astype(np.float32))
    return clips


def _assert_matches_reference(model: EmotionModel, clips: list[np.ndarray]) -> tuple[float, float]:
    preds = model.predict(clips, embeddings=True)
    worst_diff, worst_cos = 0.0, 1.0
    for clip, pred in zip(clips, preds, strict=True):
        ref = model.predict_reference(clip)
        diff = float(np.abs(pred.scores - ref.scores).max())
        cos = float(pred.embedding @ ref.embedding
                    / (np.linalg.norm(pred.embedding) * np.linalg.norm(ref.embedding)))
        assert diff <= SCORE_TOL, (len(clip), diff)
        assert cos >= COSINE_MIN, (len(clip), cos)
        assert pred.label == ref.label
        worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
    return worst_diff, worst_cos


def test_tiny_model_builds_idempotently_and_loads(tiny: EmotionModel, cache_dir: Path) -> None:
    directory = cache_dir / "tiny-emotion2vec"
    names = {p.name for p in directory.iterdir()}
    assert {"config.yaml", "model.pt", "tokens.txt", "configuration.json"} <= names
    assert (directory / "tokens.txt").read_text(encoding="utf-8").split() == [
        "生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
        "其他/other", "难过/sad", "吃惊/surprised", "<unk>",
    ]
    stamp = (directory / "model.pt").stat().st_mtime_ns
    assert build_tiny_model(directory) == directory
    assert (directory / "model.pt").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert tiny.model_id == "tiny" and tiny.device == "cpu" and tiny.embedding_dim == 64
    assert tiny.revision.startswith("sha256:")
    assert tiny.frames(SR) == 49 and tiny.frames(400) == 1 and tiny.frames(399) == 0


def test_same_seed_same_weights(tmp_path: Path, cache_dir: Path) -> None:
    build_tiny_model(tmp_path / "again")
    a = torch.load(tmp_path / "again" / "model.pt", weights_only=True)
    b = torch.load(cache_dir / "tiny-emotion2vec" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predictions_are_well_formed_and_varied(tiny: EmotionModel) -> None:
    preds = tiny.predict(_clips([0.5 + 0.37 * i for i in range(24)], seed=3))
    for p in preds:
        assert isinstance(p, Prediction)
        assert p.scores.dtype == np.float32 and p.scores.shape == (len(EMOTIONS),)
        assert abs(float(p.scores.sum()) - 1.0) < 1e-5
        assert p.label == EMOTIONS[int(p.scores.argmax())] and p.confidence == p.scores.max()
        assert p.embedding is None and p.frame_scores is None
    assert len({p.label for p in preds}) >= 3  # the tiny model is not degenerate


def test_batched_equals_reference_on_mixed_lengths(tiny: EmotionModel) -> None:
    rng = np.random.default_rng(7)
    seconds = [0.5, 30.0, *rng.uniform(0.5, 30.0, size=6).tolist(), 400 / SR, 719 / SR]
    _assert_matches_reference(tiny, _clips(seconds, seed=1))


def test_batched_equals_reference_in_any_order(tiny: EmotionModel) -> None:
    clips = _clips([1.0, 4.2, 0.03, 2.5])
    forward = tiny.predict(clips, embeddings=True)
    backward = tiny.predict(clips[::-1], embeddings=True)[::-1]
    for a, b in zip(forward, backward, strict=True):
        assert np.abs(a.scores - b.scores).max() <= SCORE_TOL


def test_mid_size_large_structure_equals_reference(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The large model's per-layer shapes (1024-d, 16 heads, 512-channel extractor, 5 x k19/g16
    # positional convs, 10 extra tokens) with 2 blocks instead of 24, to keep the suite fast.
    config = emotion2vec_config(embed_dim=1024, num_heads=16, depth=1, prenet_depth=1)
    directory = build_random_model(tmp_path_factory.mktemp("mid") / "mid", config, seed=5)
    model = load_model(ModelSettings(model=str(directory)))
    assert model.embedding_dim == 1024
    _assert_matches_reference(model, _clips([0.5, 3.1, 1.7, 0.05], seed=2))


def test_config_variants_equal_reference(tmp_path: Path) -> None:
    # Branches the emotion2vec+ configs do not use but funasr supports: per-layer ALiBi scales,
    # pre-LN positional encoder, group-norm ("default") extractor, no waveform normalisation.
    config = copy.deepcopy(TINY_CONFIG)
    audio = config["model_conf"]["modalities"]["audio"]
    audio.update(learned_alibi_scale_per_layer=True, conv_pos_pre_ln=True, extractor_mode="default")
    config["model_conf"]["normalize"] = False
    root = logging.getLogger()
    handlers = list(root.handlers)
    model = load_model(ModelSettings(model=str(build_random_model(tmp_path / "variant", config))))
    assert root.handlers == handlers  # funasr's import-time logging setup was undone
    _assert_matches_reference(model, _clips([0.03, 0.5, 3.3, 7.7], seed=6))


def test_pre_layer_norm_blocks_equal_reference(tmp_path: Path) -> None:
    # layer_norm_first blocks have their own residual layout (and a final norm instead of the
    # context encoder's); the packed block forward mirrors it.
    config = copy.deepcopy(TINY_CONFIG)
    config["model_conf"]["layer_norm_first"] = True
    model = load_model(ModelSettings(model=str(build_random_model(tmp_path / "prenorm", config))))
    _assert_matches_reference(model, _clips([0.2, 1.9, 4.4, 0.9], seed=8))


def test_padded_layout_equals_packed(tiny: EmotionModel) -> None:
    """The GPU layout (one padded extractor call, padded masked attention) gives the CPU layout's
    features on every valid frame, so whichever device runs, the results are the same."""
    clips = [torch.from_numpy(c) for c in _clips([0.4, 6.1, 2.7, 0.03, 11.0], seed=9)]
    packed, counts = batched_features(tiny._module, clips, padded=False)
    padded, padded_counts = batched_features(tiny._module, clips, padded=True)
    assert counts == padded_counts and packed.shape == padded.shape
    for i, count in enumerate(counts):
        assert torch.allclose(packed[i, :count], padded[i, :count], atol=1e-5, rtol=0)
        assert not packed[i, count:].any() and not padded[i, count:].any()


@pytest.mark.slow
def test_large_shape_equals_reference(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The full emotion2vec_plus_large shape (random weights); mixed lengths kept short for CPU time,
    the mid-size test above covers 30 s clips."""
    directory = build_random_model(tmp_path_factory.mktemp("large") / "large", LARGE_CONFIG)
    model = load_model(ModelSettings(model=str(directory)))
    assert model.embedding_dim == 1024
    _assert_matches_reference(model, _clips([0.5, 6.3, 2.2, 9.0], seed=4))


def test_frame_granularity(tiny: EmotionModel) -> None:
    clips = _clips([0.5, 2.0, 1.23])
    preds = tiny.predict(clips, granularity="frame", embeddings=True)
    proj = tiny._module.proj  # noqa: SLF001 - compare against funasr's own frame features
    for clip, p in zip(clips, preds, strict=True):
        assert p.frame_scores is not None and p.frame_scores.shape == (tiny.frames(len(clip)), 9)
        assert np.allclose(p.frame_scores.sum(axis=1), 1.0, atol=1e-5)
        assert p.embedding is not None and p.embedding.shape == (64,)
        (ref,) = tiny._auto.generate(clip, granularity="frame", extract_embedding=True)  # noqa: SLF001
        with torch.inference_mode():
            expected = proj(torch.from_numpy(ref["feats"])).softmax(-1).numpy()
        assert np.abs(p.frame_scores - expected).max() <= SCORE_TOL
    assert preds[1].frame_scores.shape[0] == 99  # 2 s at 50 frames/s (conv edges drop one)


def test_short_and_malformed_clips_rejected(tiny: EmotionModel) -> None:
    with pytest.raises(ValueError, match="399 samples"):
        tiny.predict([np.zeros(SR, np.float32), np.zeros(399, np.float32)])
    with pytest.raises(ValueError, match="mono"):
        tiny.predict([np.zeros((2, SR), np.float32)])
    with pytest.raises(ValueError, match="granularity"):
        tiny.predict([np.zeros(SR, np.float32)], granularity="word")
    assert tiny.predict([]) == []


def test_predict_keeps_thread_count(tiny: EmotionModel) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny.predict(_clips([1.0, 2.0]))
        assert torch.get_num_threads() == 1
        tiny.predict_reference(_clips([1.0])[0])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_set_once_at_load(cache_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        model = load_model(ModelSettings(model="tiny", threads=1), cache_dir=cache_dir)
        assert torch.get_num_threads() == 1 and model.threads == 1
    finally:
        torch.set_num_threads(before)


def _copy_tiny(cache_dir: Path, target: Path) -> Path:
    shutil.copytree(cache_dir / "tiny-emotion2vec", target)
    return target


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_weight_check(tiny: EmotionModel, cache_dir: Path, tmp_path: Path, damage: str) -> None:
    directory = _copy_tiny(cache_dir, tmp_path / "bad")
    state = torch.load(directory / "model.pt", weights_only=True)
    if damage == "missing":
        del state["proj.weight"]
    elif damage == "unexpected":
        state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    else:
        state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:-1]
    torch.save(state, directory / "model.pt")
    with pytest.raises(ModelLoadError, match={"missing": "missing 1", "unexpected": "unexpected 1",
                                              "shape": "shape mismatch 1"}[damage]):
        load_model(ModelSettings(model=str(directory)))


def test_missing_weights_file(tiny: EmotionModel, cache_dir: Path, tmp_path: Path) -> None:
    directory = _copy_tiny(cache_dir, tmp_path / "noweights")
    (directory / "model.pt").unlink()  # configuration.json stays: funasr would load random weights
    with pytest.raises(ModelLoadError, match="model.pt is missing"):
        load_model(ModelSettings(model=str(directory)))


def test_config_that_does_not_fit_the_weights(tiny: EmotionModel, cache_dir: Path, tmp_path: Path) -> None:
    directory = _copy_tiny(cache_dir, tmp_path / "otherconfig")
    config = (directory / "config.yaml").read_text()
    (directory / "config.yaml").write_text(config.replace("embed_dim: 64", "embed_dim: 128"))
    with pytest.raises(ModelLoadError, match="does not match config.yaml"):
        load_model(ModelSettings(model=str(directory)))


def test_wrong_tokens_rejected(tiny: EmotionModel, cache_dir: Path, tmp_path: Path) -> None:
    directory = _copy_tiny(cache_dir, tmp_path / "tokens")
    tokens = (directory / "tokens.txt").read_text(encoding="utf-8")
    (directory / "tokens.txt").write_text(tokens.replace("开心/happy", "开心/joy"), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokens.txt"):
        load_model(ModelSettings(model=str(directory)))


@pytest.mark.parametrize("hub", ["ms", "hf"])
def test_offline_hub_id_fails_fast(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hub id that is in no local cache, and a hub endpoint nothing listens on (port 9, discard):
    # this must fail at once, not after funasr's ~22 s of retries.
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the local .* cache and 127.0.0.1:9 is unreachable"):
        load_model(ModelSettings(model="iic/emotion2vec_plus_never_cached", hub=hub))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(device="tpu"), "device"),
        (dict(precision="fp8"), "precision"),
        (dict(granularity="word"), "granularity"),
        (dict(threads=-1), "threads"),
        (dict(hub="github", model="iic/emotion2vec_plus_large"), "hub"),
        (dict(model="/no/such/dir"), "not a directory"),
    ],
)
def test_bad_settings_are_one_line_errors(settings: dict, message: str, cache_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(ModelSettings(**{"model": "tiny", **settings}), cache_dir=cache_dir)
    assert "\n" not in str(info.value)


def test_cpu_precisions(cache_dir: Path) -> None:
    clips = _clips([1.0, 2.5])
    fp32 = load_model(ModelSettings(model="tiny"), cache_dir=cache_dir).predict(clips)
    if torch.cuda.is_available():
        pytest.skip("CPU-only precision checks")
    with pytest.raises(ModelLoadError, match="fp16 needs a CUDA"):
        load_model(ModelSettings(model="tiny", precision="fp16"), cache_dir=cache_dir)
    for precision in ("bf16", "int8"):
        model = load_model(ModelSettings(model="tiny", precision=precision), cache_dir=cache_dir)
        for a, b in zip(model.predict(clips), fp32, strict=True):
            assert abs(float(a.scores.sum()) - 1) < 1e-4
            assert np.abs(a.scores - b.scores).max() < 0.2  # loose: a 30x-scaled random head
        assert np.abs(model.predict_reference(clips[0]).scores - fp32[0].scores).max() < 0.2


def test_bf16_weights_cast_once_at_load(cache_dir: Path) -> None:
    model = load_model(ModelSettings(model="tiny", precision="bf16"), cache_dir=cache_dir)
    named = list(model._module.named_modules())
    matmuls = {name: m for name, m in named if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))}
    kept = {name for name in matmuls if in_fp32_submodule(name)}
    assert "proj" in kept and any("relative_positional_encoder" in name for name in kept)
    assert all(m.weight.dtype == (torch.float32 if name in kept else torch.bfloat16) for name, m in matmuls.items())
    norms = [m for _, m in named if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    clips = _clips([0.7, 3.0], seed=12)
    for batched, alone in zip(model.predict(clips), [model.predict([c])[0] for c in clips], strict=True):
        assert np.abs(batched.scores - alone.scores).max() < 0.02


def test_fp32_conv_pin_is_scoped() -> None:
    from emofleet.processors.model import _ieee_fp32_convs

    before = torch.backends.cudnn.conv.fp32_precision
    with _ieee_fp32_convs(True):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda(precision: str, cache_dir: Path) -> None:
    model = load_model(ModelSettings(model="tiny", device="cuda", precision=precision), cache_dir=cache_dir)
    assert model.device == "cuda:0"
    clips = _clips([0.5, 7.0, 2.2])
    if precision == "fp32":
        _assert_matches_reference(model, clips)
    cpu = load_model(ModelSettings(model="tiny", device="cpu"), cache_dir=cache_dir)
    for a, b in zip(model.predict(clips), cpu.predict(clips), strict=True):
        assert np.abs(a.scores - b.scores).max() < (1e-4 if precision == "fp32" else 0.2)


@pytest.mark.parametrize("checkpoint_has_decoder", [False, True])
def test_pretraining_decoder_is_neither_required_nor_used(tmp_path: Path, checkpoint_has_decoder: bool) -> None:
    """The released configs build a pretraining decoder the checkpoints do not ship (upstream
    emotion2vec issue #84); such a model must load, and a checkpoint that carries it must too."""
    import copy

    from emofleet.processors.tiny_model import TINY_CONFIG, build_random_model

    config = copy.deepcopy(TINY_CONFIG)
    config["model_conf"]["modalities"]["audio"]["decoder"] = {
        "decoder_dim": 32, "decoder_groups": 4, "decoder_kernel": 5, "decoder_layers": 2, "input_dropout": 0.0,
        "add_positions_masked": False, "add_positions_all": False, "decoder_residual": True,
        "projection_layers": 1, "projection_ratio": 2.0}
    directory = build_random_model(tmp_path / "with-decoder", config)
    state = torch.load(directory / "model.pt", weights_only=True)
    assert any(".decoder." in key for key in state)
    if not checkpoint_has_decoder:
        torch.save({k: v for k, v in state.items() if ".decoder." not in k}, directory / "model.pt")

    model = load_model(ModelSettings(model=str(directory)))

    assert model.predict([np.zeros(16_000, dtype=np.float32)])[0].scores.shape == (9,)
