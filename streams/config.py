"""The one configuration object, built from environment variables and then command-line flags.

Every setting has a default that works on the embedded stack. Environment variables are named
``EMOFLEET_<SECTION>_<FIELD>`` (for example ``EMOFLEET_KAFKA_BOOTSTRAP_SERVERS``); flags override them
through :func:`with_overrides`. Secrets (SASL passwords, ClickHouse passwords) are read from the
environment only and are masked by ``repr`` so they never reach a log line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "EMOFLEET_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


class Secret(str):
    """A string that never shows its value in ``repr`` (and so in logs or tracebacks)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    audio_topic: str = "emofleet.audio"
    results_topic: str = "emofleet.emotions"
    dead_letter_topic: str = "emofleet.dead-letters"
    alerts_topic: str = "emofleet.alerts"
    aggregates_topic: str = "emofleet.aggregates"
    partitions: int = 8
    replication_factor: int = 1
    schema_registry_url: str = ""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: Secret = Secret("")
    processor_group: str = "emofleet-processors"
    sink_group: str = "emofleet-sink"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 300_000
    group_instance_id: str = ""

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every producer, consumer and admin client."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": str(self.sasl_password),
            }
        return config


@dataclass(frozen=True)
class AudioSettings:
    allowed_schemes: tuple[str, ...] = ("file", "http", "https", "s3")
    file_roots: tuple[Path, ...] = ()
    http_hosts: tuple[str, ...] = ()
    s3_endpoint: str = ""
    max_bytes: int = 200 * 1024 * 1024
    max_seconds: float = 4 * 3600.0
    min_seconds: float = 0.025
    window_seconds: float = 30.0
    fetch_timeout_seconds: float = 15.0
    fetch_workers: int = 8


@dataclass(frozen=True)
class CacheSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "emofleet"
    ttl_seconds: int = 7 * 24 * 3600
    claim_seconds: int = 120
    enabled: bool = True


@dataclass(frozen=True)
class ModelSettings:
    model: str = "iic/emotion2vec_plus_large"
    hub: str = "ms"
    revision: str = ""
    device: str = "auto"
    threads: int = 0
    granularity: str = "utterance"
    embeddings: bool = False
    precision: str = "fp32"


@dataclass(frozen=True)
class BatchSettings:
    max_clips: int = 16
    max_audio_seconds: float = 240.0
    max_wait_ms: int = 200
    max_padding_fraction: float = 0.15
    max_in_flight: int = 256
    revoke_grace_seconds: float = 10.0
    commit_interval_seconds: float = 1.0


@dataclass(frozen=True)
class ClickHouseSettings:
    dsn: str = ""
    database: str = "emofleet"
    username: str = "default"
    password: Secret = Secret("")
    batch_rows: int = 20_000
    batch_seconds: float = 1.0


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics/health HTTP endpoint and log format (see streams/metrics.py, streams/logs.py)."""

    metrics_port: int = 0  # /metrics, /healthz, /readyz; 0 = no HTTP server (containers set 9400)
    metrics_host: str = "0.0.0.0"
    stall_seconds: float = 60.0  # /healthz fails when the poll loop has not turned for this long
    startup_seconds: float = 900.0  # ... or when it has not started this long after launch (model download)
    lag_interval_seconds: float = 5.0  # how often consumer lag per partition is recomputed
    log_format: str = "text"  # text | json


@dataclass(frozen=True)
class AggregateSettings:
    """`emofleet aggregate` (streams/aggregator.py, streams/windows.py): windows, grace, alert thresholds."""

    app_id: str = "emofleet-aggregator"  # faust app id: consumer group and prefix of its internal topics
    tumbling_seconds: int = 60  # 0 = no tumbling windows
    hopping_seconds: int = 300  # 0 = no hopping windows
    hop_seconds: int = 60
    grace_seconds: int = 30  # events further behind the partition's event-time watermark are late (dropped)
    negativity_threshold: float = 0.6  # rule (a): negativity >= this ...
    negativity_min_clips: int = 5  # ... over at least this many clips in one window of a source
    negativity_window: str = "hopping"  # which windows rule (a) watches: hopping | tumbling
    angry_streak: int = 3  # rule (b): this many angry clips in a row (event-time order) within one call
    commit_interval_seconds: float = 1.0
    web_port: int = 0  # faust's web server; 0 = off


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".emofleet")
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    clickhouse: ClickHouseSettings = field(default_factory=ClickHouseSettings)
    aggregate: AggregateSettings = field(default_factory=AggregateSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)

    @property
    def clickhouse_dsn(self) -> str:
        """The configured DSN, else the embedded chDB store under the data directory."""
        return self.clickhouse.dsn or f"chdb://{(self.data_dir / 'chdb').resolve()}"


_SECTIONS = {f.name: f.type for f in fields(Settings) if f.name != "data_dir"}


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``EMOFLEET_*`` variables; unknown names are ignored, bad values raise."""
    env = os.environ if env is None else env
    settings = Settings()
    if data_dir := env.get(f"{ENV_PREFIX}DATA_DIR"):
        settings = replace(settings, data_dir=Path(data_dir))
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        changes = {}
        for item in fields(section):
            key = f"{ENV_PREFIX}{section_name}_{item.name}".upper()
            if key in env:
                changes[item.name] = _parse(key, env[key], _field_type(section, item.name))
        if changes:
            settings = replace(settings, **{section_name: replace(section, **changes)})
    return settings


def to_env(settings: Settings) -> dict[str, str]:
    """The inverse of :func:`from_env`: hand the complete settings to a child process."""
    env = {f"{ENV_PREFIX}DATA_DIR": str(settings.data_dir.resolve())}
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        for item in fields(section):
            env[f"{ENV_PREFIX}{section_name}_{item.name}".upper()] = _format(getattr(section, item.name))
    return env


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        separator = os.pathsep if value and isinstance(value[0], Path) else ","
        return separator.join(str(v) for v in value)
    return str(value)


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """Apply flag values given as ``section__field=value``; ``None`` means "flag not given"."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        if dotted == "data_dir":
            settings = replace(settings, data_dir=Path(value))
            continue
        section_name, _, name = dotted.partition("__")
        section = getattr(settings, section_name)
        if isinstance(value, str):
            value = _parse(f"--{name}", value, _field_type(section, name))
        elif isinstance(value, list):
            value = tuple(value)
        settings = replace(settings, **{section_name: replace(section, **{name: value})})
    return settings


def _field_type(section: object, name: str) -> Any:
    hints = get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"unknown setting {type(section).__name__}.{name}")
    return hints[name]


def _parse(key: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind is Secret:
            return Secret(raw)
        if kind == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == tuple[Path, ...]:
            return tuple(Path(part) for part in raw.split(os.pathsep) if part)
        return raw
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets masked, for `emofleet config` and startup logs."""
    return _masked(dataclasses.asdict(settings))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, Secret):
        return "***" if value else ""
    if isinstance(value, (tuple, list)):
        return [_masked(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value and "@" in value:
        return redact_url(value)  # a password inside a URL (redis://:pw@host) is a secret too
    return value


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info part (``scheme://user:pw@host``) replaced by ``***``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1)).geturl()
