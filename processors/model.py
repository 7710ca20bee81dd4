"""emotion2vec+ (FunASR) loading, strict weight verification and exact batched inference.

Loading (:func:`load_model`):

* ``model`` is ``"tiny"`` (a seeded random test model built locally), a local directory, or a hub id
  (``hub="ms"`` ModelScope, ``"hf"`` Hugging Face). A hub id is looked up in the hub's local cache
  first (``local_files_only``); on a miss we probe the hub host with a 2 s TCP connect and fail at
  once with :class:`ModelLoadError` when it is unreachable, instead of funasr's ~22 s of retries that
  end in a misleading "not registered" error. Reachable -> the hub's own ``snapshot_download``.
* The module is built by funasr ``AutoModel`` (its registry, tokenizer and device handling) from the
  directory's config.yaml and tokens.txt. We hand funasr the parsed config rather than the directory
  so it does NOT load model.pt itself: its loader silently skips missing or mis-shaped weights (random
  weights, no error) and holds ~3 copies of the checkpoint in memory. We load model.pt ourselves with
  ``torch.load(weights_only=True, mmap=True)``, compare keys and shapes strictly, then
  ``load_state_dict(strict=True)`` (on CPU with ``assign=True``: the mmap'd file IS the weights), so
  peak memory stays near one model (large: ~1.9 GB peak RSS vs ~3.1 GB copying, ~4.1 GB via funasr).
* Threads are set once here. funasr's ``generate`` calls ``torch.set_num_threads(ncpu)`` on every
  call; we pass ``ncpu`` equal to the load-time value and restore the count after
  :meth:`EmotionModel.predict_reference` anyway. :meth:`EmotionModel.predict` never goes through
  ``generate`` (see :mod:`.batched`).
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import contextlib
import hashlib
import io
import logging
import os
import re
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import torch
from emofleet.processors.prediction import Prediction
from emofleet.processors.packed_forward import batched_features, frame_count, in_fp32_submodule, min_samples
from emofleet.processors.tiny_model import build_tiny_model
from emofleet.schemas.emotions import EMOTIONS, SAMPLE_RATE
from emofleet.core.config import ModelSettings

if TYPE_CHECKING:
    from emofleet.processors.simulated_model import SimulatedModel

__all__ = [
    "EmotionModel",
    "ModelLoadError",
    "Prediction",
    "build_tiny_model",
    "load_model",
]

log = logging.getLogger(__name__)

GRANULARITIES = ("utterance", "frame")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
TINY_DIR_NAME = "tiny-emotion2vec"
_PROBE_TIMEOUT_S = 2.0
_FUNASR_LOCK = threading.Lock()  # AutoModel construction touches process-global state


class ModelLoadError(UserFacingError):
    """The model cannot be loaded; the message is one line that says what to do."""

    hint = "`--model tiny` runs offline; a hub id needs network or a local copy"


def label_of(token: str) -> str:
    """funasr token -> emotion name: "生气/angry" -> "angry", "<unk>" -> "unknown"."""
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip()


class EmotionModel:
    """A loaded emotion2vec+ model. Not thread-safe: run one predict at a time per instance."""

    def __init__(
        self,
        auto_model: Any,
        *,
        model_id: str,
        revision: str,
        device: str,
        precision: str,
        threads: int,
    ) -> None:
        self._auto = auto_model
        self._module: Any = auto_model.model  # funasr's Emotion2vec
        encoder = self._module.modality_encoders["AUDIO"]
        self._layers: list[tuple[int, int, int]] = list(encoder.feature_enc_layers)
        self.min_samples: int = min_samples(self._layers)
        self.model_id = model_id
        self.revision = revision
        self.device = device
        self.precision = precision
        self.threads = threads
        self.embedding_dim: int = int(self._module.cfg.get("embed_dim"))

    def predict(
        self,
        clips: Sequence[np.ndarray],
        *,
        granularity: str = "utterance",
        embeddings: bool = False,
    ) -> list[Prediction]:
        """Score ``clips`` (float32 mono 16 kHz) in ONE batched forward; per clip equal to generate()."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        if not clips:
            return []
        tensors = [self._tensor(clip, i) for i, clip in enumerate(clips)]
        with torch.inference_mode(), self._numerics():
            feats, counts = batched_features(self._module, tensors)
            valid = (torch.arange(feats.shape[1], device=feats.device)[None, :]
                     < torch.tensor(counts, device=feats.device)[:, None]).float()
        # Mean over each clip's valid frames only and the head, in fp32 (also in bf16/fp16 mode).
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, enabled=False):
            pooled = (feats.float() * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            scores = self._module.proj(pooled).softmax(-1).cpu().numpy()
            frame_scores = None
            if granularity == "frame":
                frame_scores = self._module.proj(feats.float()).softmax(-1).cpu().numpy()
            pooled_np = pooled.cpu().numpy() if embeddings else None
        results = []
        for i, row in enumerate(scores):
            best = int(row.argmax())
            results.append(Prediction(
                scores=row.astype(np.float32),
                label=EMOTIONS[best],
                confidence=float(row[best]),
                embedding=pooled_np[i].astype(np.float32) if pooled_np is not None else None,
                frame_scores=(frame_scores[i, : counts[i]].astype(np.float32)
                              if frame_scores is not None else None),
            ))
        return results

    def predict_reference(self, clip: np.ndarray) -> Prediction:
        """funasr ``AutoModel.generate()`` on one clip: the unbatched reference, for tests/benchmarks.

        generate() resets torch's thread count to its ``ncpu`` on every call; the count is restored
        afterwards. It also grows funasr's ALiBi cache, which is cleared. Runs at the model's
        precision: fp32, int8 if quantized, under autocast for bf16/fp16 (weights cast at load).
        """
        tensor = self._tensor(clip, 0).cpu().numpy()
        threads = torch.get_num_threads()
        try:
            with self._numerics():
                (out,) = self._auto.generate(
                    tensor, granularity="utterance", extract_embedding=True, disable_pbar=True
                )
        finally:
            self._module.alibi_biases.clear()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        scores = np.asarray(out["scores"], dtype=np.float32)
        best = int(scores.argmax())
        return Prediction(
            scores=scores,
            label=EMOTIONS[best],
            confidence=float(scores[best]),
            embedding=np.asarray(out["feats"], dtype=np.float32),
            frame_scores=None,
        )

    def frames(self, num_samples: int) -> int:
        """Frames (20 ms each) the model yields for a clip of ``num_samples``."""
        return frame_count(num_samples, self._layers)

    def _tensor(self, clip: np.ndarray, index: int) -> torch.Tensor:
        array = np.asarray(clip)
        if array.ndim != 1:
            raise ValueError(f"clip {index}: expected mono 1-D samples, got shape {array.shape}")
        if array.shape[0] < self.min_samples:
            raise ValueError(
                f"clip {index}: {array.shape[0]} samples is shorter than the model's minimum "
                f"{self.min_samples} ({self.min_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz)"
            )
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @property
    def _strict_fp32(self) -> bool:
        return self.precision == "fp32" and self.device.startswith("cuda")

    def _numerics(self) -> AbstractContextManager[Any]:
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)
        return _ieee_fp32_convs(self._strict_fp32)


@contextmanager
def _ieee_fp32_convs(enabled: bool) -> Iterator[None]:
    """cuDNN runs fp32 convs in TF32 by default (matmuls not): pin them to IEEE fp32 for the call,
    so fp32 on a GPU means fp32 and batched results match generate() there too."""
    if not enabled:
        yield
        return
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


def load_model(settings: ModelSettings, *, cache_dir: Path | None = None) -> EmotionModel | SimulatedModel:
    """Resolve, build, strictly verify, warm up. Raises :class:`ModelLoadError` with a hint.

    ``simulated:<audio-s/s>[,<ms>]`` is the simulated accelerator (``simulated_model.py``), for benchmarks.
    """
    from emofleet.processors.simulated_model import is_simulated  # it imports this module: not at the top

    if is_simulated(settings.model):
        return _load_simulated(settings)
    device = _resolve_device(settings.device)
    precision = _check_precision(resolve_precision(settings.precision, device, cpu_flags()), device)
    if settings.granularity not in GRANULARITIES:
        raise ModelLoadError(f"granularity={settings.granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if settings.threads < 0:
        raise ModelLoadError(f"threads={settings.threads}: use 0 (torch default) or a positive count")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    threads = torch.get_num_threads()

    started = time.monotonic()
    with _undo_funasr_side_effects():
        directory = _resolve_directory(settings, cache_dir)
        model_id = settings.model
        config = _read_config(directory)
        auto_model = _build(directory, config, device=device, threads=threads)
    _load_weights_strict(auto_model.model, directory / "model.pt")
    auto_model.model.eval()
    if precision == "int8":
        _quantize_int8(auto_model.model)
    if precision in ("bf16", "fp16"):
        _cast_matmul_weights(auto_model.model, torch.bfloat16 if precision == "bf16" else torch.float16)
    model = EmotionModel(
        auto_model,
        model_id=model_id,
        revision=settings.revision or _fingerprint(directory),
        device=device,
        precision=precision,
        threads=threads,
    )
    model.predict([np.zeros(SAMPLE_RATE, dtype=np.float32)])  # warm-up: allocator, kernels
    log.info("loaded %s (revision %s) from %s on %s, %s, %d threads, in %.1f s", model_id,
             model.revision, directory, device, precision, threads, time.monotonic() - started)
    return model


def _load_simulated(settings: ModelSettings) -> SimulatedModel:
    from emofleet.processors.simulated_model import SimulatedModel, SimulatedSpecError, parse_simulated

    if settings.precision not in (*PRECISIONS, "auto"):
        raise ModelLoadError(f"precision={settings.precision!r}: use one of auto, {', '.join(PRECISIONS)}")
    try:
        device = parse_simulated(settings.model)
    except SimulatedSpecError as error:
        raise ModelLoadError(str(error)) from None
    log.warning("model %s is the SIMULATED accelerator (benchmarks only): its scores are not emotions",
                device.model_id)
    return SimulatedModel(device, precision=settings.precision)


# --- resolution ---------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ModelLoadError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device={device!r} but torch sees no CUDA GPU: use device=auto or cpu")
        if int(index) >= torch.cuda.device_count():
            raise ModelLoadError(f"device={device!r} but only {torch.cuda.device_count()} GPU(s) exist")
        return f"cuda:{index}"
    raise ModelLoadError(f"device={device!r}: use auto, cpu, cuda or cuda:N")


def _check_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision={precision!r}: use one of auto, {', '.join(PRECISIONS)}")
    on_cuda = device.startswith("cuda")
    if precision == "fp16" and not on_cuda:
        raise ModelLoadError("precision=fp16 needs a CUDA device: use bf16 or int8 on CPU")
    if precision == "int8" and on_cuda:
        raise ModelLoadError("precision=int8 (dynamic quantization) is CPU-only: use bf16/fp16 on CUDA")
    if precision == "bf16" and not on_cuda and not native_cpu_bf16():
        log.warning("precision=bf16 on a CPU without AVX512-BF16 or AMX: torch emulates it, several "
                    "times slower than fp32 (bench/README.md); use fp32 here")
    return precision


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names of native bf16 matmuls


def resolve_precision(precision: str, device: str, flags: frozenset[str]) -> str:
    """``auto`` -> bf16 on GPUs and on CPUs with native bf16 (``flags`` from :func:`cpu_flags`), else fp32;
    any other value is returned as given."""
    if precision != "auto":
        return precision
    if device.startswith("cuda") or flags & NATIVE_BF16_FLAGS:
        return "bf16"
    return "fp32"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty where there is none."""
    try:
        with cpuinfo.open(encoding="ascii", errors="replace") as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), by /proc/cpuinfo or torch."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return bool(cpu_flags() & NATIVE_BF16_FLAGS) or any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _resolve_directory(settings: ModelSettings, cache_dir: Path | None) -> Path:
    if settings.model == "tiny":
        root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "emofleet"
        return build_tiny_model(root / TINY_DIR_NAME)
    local = Path(settings.model).expanduser()
    if local.is_dir():
        return local.resolve()
    model_id = settings.model
    if model_id.startswith("emotion2vec_plus_"):  # funasr's short aliases
        model_id = f"iic/{model_id}"
    if local.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") != 1:
        raise ModelLoadError(
            f"model={settings.model!r} is not a directory and not a hub id like "
            "'iic/emotion2vec_plus_large': check the path"
        )
    return _resolve_hub(model_id, settings.hub, settings.revision)


def _resolve_hub(model_id: str, hub: str, revision: str) -> Path:
    """Cached snapshot -> fast reachability probe -> download; every failure is a ModelLoadError."""
    if hub in ("ms", "modelscope"):
        from modelscope.hub.snapshot_download import snapshot_download

        # Same precedence as modelscope's HubConfig (MODELSCOPE_DOMAIN is the deprecated name).
        endpoint = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN")
                    or "https://modelscope.cn")

        def fetch(local_only: bool) -> str:
            return snapshot_download(model_id, revision=revision or "master", local_files_only=local_only)
    elif hub in ("hf", "huggingface"):
        import huggingface_hub
        from huggingface_hub import constants

        # The emotion2vec+ checkpoints are "iic/..." on ModelScope and "emotion2vec/..." on HF
        # (funasr's name map; importing funasr here would cost ~6 s before we can fail).
        if model_id.startswith("iic/emotion2vec"):
            model_id = "emotion2vec/" + model_id.partition("/")[2]
        endpoint = constants.ENDPOINT

        def fetch(local_only: bool) -> str:
            return huggingface_hub.snapshot_download(
                model_id, revision=revision or None, local_files_only=local_only
            )
    else:
        raise ModelLoadError(f"hub={hub!r}: use 'ms' (ModelScope) or 'hf' (Hugging Face)")

    try:
        return Path(fetch(True))
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    hint = ("pre-download it (e.g. on a connected host, then copy the hub cache) or set the model "
            "setting to a local directory with config.yaml, model.pt and tokens.txt")
    reason = _unreachable(endpoint)
    if reason:
        raise ModelLoadError(f"{model_id} is not in the local {hub} cache and {reason}: {hint}")
    try:
        return Path(fetch(False))
    except Exception as exc:  # noqa: BLE001 - hub libraries raise many types
        raise ModelLoadError(f"downloading {model_id} from {hub} failed ({_one_line(exc)}): {hint}") from exc


def _unreachable(endpoint: str) -> str:
    """Why the hub cannot be reached (offline flags, DNS, TCP connect), or '' when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and "huggingface" in endpoint:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    proxy = os.environ.get(f"{url.scheme}_proxy") or os.environ.get(f"{url.scheme.upper()}_PROXY")
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else url
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(_one_line(exc))

    # In a thread because the timeout above does not cover DNS resolution, which can hang for long.
    worker = threading.Thread(target=probe, name="emofleet-hub-probe", daemon=True)
    worker.start()
    worker.join(_PROBE_TIMEOUT_S + 1.0)
    error = outcome[0] if outcome else f"no answer within {_PROBE_TIMEOUT_S + 1.0:.0f} s"
    return f"{'proxy ' if proxy else ''}{host}:{port} is unreachable ({error})" if error else ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


# --- building and strict weights ----------------------------------------------------------------


def _read_config(directory: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for name in ("config.yaml", "tokens.txt", "model.pt"):
        if not (directory / name).is_file():
            raise ModelLoadError(f"{directory / name} is missing: the model directory must hold "
                                 "config.yaml, model.pt and tokens.txt (re-download or rebuild it)")
    try:
        config = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"), resolve=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{directory / 'config.yaml'} is unreadable ({_one_line(exc)})") from exc
    if not isinstance(config, dict) or config.get("model") != "Emotion2vec" or "model_conf" not in config:
        raise ModelLoadError(f"{directory / 'config.yaml'} is not an emotion2vec config "
                             "(needs model: Emotion2vec and model_conf)")
    tokens = (directory / "tokens.txt").read_text(encoding="utf-8").split()
    if tuple(label_of(t) for t in tokens) != EMOTIONS:
        raise ModelLoadError(f"{directory / 'tokens.txt'} lists {tokens}, expected the 9 emotion2vec+ "
                             f"classes {list(EMOTIONS)} (last one literally '<unk>')")
    return {str(k): v for k, v in config.items()}


def _build(directory: Path, config: dict[str, Any], *, device: str, threads: int) -> Any:
    """funasr AutoModel from the parsed config, without funasr's own (lenient) weight loading."""
    from funasr import AutoModel

    kwargs = dict(config)
    kwargs["tokenizer_conf"] = {**(config.get("tokenizer_conf") or {}),
                                "token_list": str(directory / "tokens.txt")}
    kwargs.pop("init_param", None)
    kwargs.update(
        model_path=str(directory),
        device=device,
        ncpu=threads,  # funasr sets torch threads to this on load and on every generate()
        disable_update=True,  # else it queries the package index
        disable_pbar=True,
        log_level="ERROR",
    )
    try:
        # AutoModel prints "funasr version: ..." to stdout: send it to the log (stdout would break JSON logs)
        with _FUNASR_LOCK, contextlib.redirect_stdout(io.StringIO()) as printed:
            auto_model = AutoModel(**kwargs)
        if printed.getvalue().strip():
            log.debug("%s", printed.getvalue().strip())
        return auto_model
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"funasr could not build the model from {directory} "
                             f"({_one_line(exc)}): check config.yaml") from exc


@contextmanager
def _undo_funasr_side_effects() -> Iterator[None]:
    """Importing funasr installs an INFO handler on the root logger (so a later logging.basicConfig
    in the application silently does nothing) and AutoModel reseeds the global RNGs: undo both."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        random.setstate(saved[2])
        np.random.set_state(saved[3])


# The released emotion2vec+ configs build a pretraining decoder whose weights the checkpoints do not
# ship (upstream emotion2vec issue #84: funasr warns "miss key in ckpt: modality_encoders.AUDIO.
# decoder..."). Inference never runs it, so it is removed before the strict check and its keys, when
# a checkpoint does carry them, are ignored. Every other tensor must match exactly.
_PRETRAINING_ONLY = re.compile(r"^modality_encoders\.[^.]+\.decoder\.")


def _drop_pretraining_modules(module: torch.nn.Module) -> None:
    for encoder in getattr(module, "modality_encoders", {}).values():
        encoder.remove_pretraining_modules(keep_decoder=False)


def _load_weights_strict(module: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``module``; any missing/unexpected key or shape mismatch is an error
    (pretraining-only decoder weights aside, see ``_PRETRAINING_ONLY``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable torch state dict ({_one_line(exc)}): "
                             "re-download the model") from exc
    for wrapper in ("state_dict", "model_state_dict", "model"):  # containers funasr also accepts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict: re-download the model")
    _drop_pretraining_modules(module)
    state = {k: v for k, v in state.items() if not _PRETRAINING_ONLY.match(k)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    problems = [
        f"{label} {len(items)} (e.g. {', '.join(items[:3])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ModelLoadError(f"{path} does not match config.yaml: {'; '.join(problems)}: "
                             "use the config.yaml shipped with these weights")
    # On CPU the checkpoint's mmap'd storage becomes the parameters (assign=True): one copy of the
    # weights in RAM, file-backed and shared between processes that load the same file. Copying into
    # the module's own tensors instead (GPU, or a dtype that differs) needs the file pages on top.
    on_cpu = all(p.device.type == "cpu" for p in expected.values())
    assign = on_cpu and all(state[k].dtype == v.dtype for k, v in expected.items())
    module.load_state_dict(state, strict=True, assign=assign)


def _cast_matmul_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every Linear/Conv weight and bias to ``dtype`` once, but those of ``FP32_SUBMODULES``.
    Autocast casts exactly these to ``dtype`` on every call (~300M parameters per forward for the
    large model), so the scores are the same and the per-call cast is gone; norms stay fp32, as
    autocast runs them."""
    with torch.no_grad():
        for name, child in module.named_modules():
            if in_fp32_submodule(name):
                continue
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                for attribute in ("weight", "bias"):
                    param = getattr(child, attribute)
                    if param is not None:
                        setattr(child, attribute, torch.nn.Parameter(param.to(dtype), requires_grad=False))


def _quantize_int8(module: torch.nn.Module) -> None:
    """Dynamic int8 of every Linear but the head (``FP32_SUBMODULES``), in place (CPU). Activation
    scales are computed per call over all the batch's tokens, so int8 results are NOT
    batch-invariant; accuracy vs fp32 is the caller's to check. torch marks this API deprecated; its
    warnings are silenced here."""
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:
        raise ModelLoadError(f"precision=int8 needs torch.ao.quantization ({_one_line(exc)}): "
                             "use fp32 or bf16") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        linears = {name: default_dynamic_qconfig for name, child in module.named_modules()
                   if isinstance(child, torch.nn.Linear) and not in_fp32_submodule(name)}
        quantize_dynamic(module, linears, dtype=torch.qint8, inplace=True)


def _fingerprint(directory: Path) -> str:
    """Cheap content id for a model directory without a hub revision: config, tokens, weights' size
    and first/last MiB (hashing all of a 2 GB model.pt would add seconds to every start)."""
    digest = hashlib.sha256()
    for name in ("config.yaml", "tokens.txt"):
        digest.update((directory / name).read_bytes())
    weights = directory / "model.pt"
    size = weights.stat().st_size
    digest.update(str(size).encode())
    with weights.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"sha256:{digest.hexdigest()[:16]}"
