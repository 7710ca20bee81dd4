"""The one configuration object, built from environment variables and then command-line flags.

Every setting has a default that works on the embedded stack. Environment variables are named
``EMOFLEET_<SECTION>_<FIELD>`` (for example ``EMOFLEET_KAFKA_BOOTSTRAP_SERVERS``); flags override them
through :func:`with_overrides`. Secrets (SASL passwords, ClickHouse passwords) are read from the
environment only and are masked by ``repr`` so they never reach a log line.

Kafka and Schema Registry client properties pass through as :class:`Properties` (``KafkaSettings.config`` and
``.registry_config``), each from three variables (``<P>`` = ``EMOFLEET_KAFKA_CONFIG`` or
``EMOFLEET_KAFKA_REGISTRY_CONFIG``): ``<P>_FILE`` (a properties file, names verbatim), overlaid by
``<P>__<NAME>`` (one property: ``NAME`` lowercased, ``_`` -> ``.``); or ``<P>`` itself, a JSON object of all
properties, which replaces both (that is how :func:`to_env` hands them to child processes).
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "EMOFLEET_"


class ConfigError(UserFacingError, ValueError):
    """A setting has a value that cannot be used; the message names the setting."""

    hint = "see `emofleet config` for the effective settings"


class Secret(str):
    """A string that never shows its value in ``repr`` (and so in logs or tracebacks)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


class Properties(tuple[tuple[str, str], ...]):
    """Client properties as (name, value) pairs in the order given; secret properties' values are Secrets."""

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Properties:
        """Last value per name wins; values of :func:`is_secret_property` names become Secrets."""
        merged = dict(pairs)
        return cls((name, Secret(value) if is_secret_property(name) else value) for name, value in merged.items())

    def as_dict(self) -> dict[str, str]:
        """Plain strings, for a client's configuration."""
        return {name: str(value) for name, value in self}


_SECRET_PROPERTY_ENDINGS = ("password", "passphrase", "secret", "token", "key.pem", "user.info", "jaas.config",
                            "oauthbearer.config")


def is_secret_property(name: str) -> bool:
    """A client property whose value is a secret: masked in `emofleet config` and in every log line."""
    return name.lower().replace("_", ".").endswith(_SECRET_PROPERTY_ENDINGS)


# Properties that have a setting of their own: one place for each fact (the aggregator reads the settings).
_KAFKA_PROPERTY_SETTINGS = {
    "bootstrap.servers": "EMOFLEET_KAFKA_BOOTSTRAP_SERVERS",
    "metadata.broker.list": "EMOFLEET_KAFKA_BOOTSTRAP_SERVERS",
    "security.protocol": "EMOFLEET_KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "EMOFLEET_KAFKA_SASL_MECHANISM",
    "sasl.mechanisms": "EMOFLEET_KAFKA_SASL_MECHANISM",
    "sasl.username": "EMOFLEET_KAFKA_SASL_USERNAME",
    "sasl.password": "EMOFLEET_KAFKA_SASL_PASSWORD",
    "group.id": "EMOFLEET_KAFKA_PROCESSOR_GROUP / EMOFLEET_KAFKA_SINK_GROUP / EMOFLEET_AGGREGATE_APP_ID",
    "group.instance.id": "EMOFLEET_KAFKA_GROUP_INSTANCE_ID",
    "session.timeout.ms": "EMOFLEET_KAFKA_SESSION_TIMEOUT_MS",
    "heartbeat.interval.ms": "EMOFLEET_KAFKA_HEARTBEAT_INTERVAL_MS",
    "max.poll.interval.ms": "EMOFLEET_KAFKA_MAX_POLL_INTERVAL_MS",
}
_REGISTRY_PROPERTY_SETTINGS = {"url": "EMOFLEET_KAFKA_SCHEMA_REGISTRY_URL"}


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
    # False only for brokers that mishandle LeaveGroup (the embedded Tansu: tests/test_tansu_group.py): members
    # then go without close(), and the coordinator evicts them after session_timeout_ms.
    leave_group_on_close: bool = True
    config: Properties = Properties()  # librdkafka properties for every client, see the module docstring
    registry_config: Properties = Properties()  # Schema Registry client properties (basic.auth.user.info, ssl.*)

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every producer, consumer and admin client (``config`` included)."""
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
        return config | self.config.as_dict()


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
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU) | int8 (CPU) | auto: bf16 where native (GPU, AVX512-BF16/AMX CPU)


@dataclass(frozen=True)
class BatchSettings:
    max_clips: int = 16
    max_audio_seconds: float = 240.0
    max_wait_ms: int = 200
    max_padding_fraction: float = 0.15
    max_in_flight: int = 1024  # above the ready queue in short clips plus a batch and the fetch pool (bench/README.md)
    revoke_grace_seconds: float = 10.0
    commit_interval_seconds: float = 1.0


@dataclass(frozen=True)
class ClickHouseSettings:
    dsn: str = ""
    database: str = "emofleet"
    username: str = "default"
    password: Secret = Secret("")
    batch_rows: int = 20_000  # rows per flush, frame rows included
    batch_seconds: float = 1.0
    # Frame rows stored per clip; a longer clip is mean-pooled down to this many (sinks/rows.py frame_rows).
    # 30k = 10 min at 50 frames/s at full resolution; 4 h of audio is then one row per 0.48 s.
    max_frames_per_clip: int = 30_000
    # Retention in days, 0 = keep forever; applied by sinks/migrations.py migrate() on every sink start.
    events_ttl_days: int = 30  # emotion_events, by reference_produced_at
    frames_ttl_days: int = 7  # emotion_frames, by reference_produced_at
    aggregates_ttl_days: int = 365  # emotion_aggregates (window_end) and emotion_minutes (minute): small rollups
    dead_letters_ttl_days: int = 90  # dead_letters rows, by failed_at
    dead_letter_payload_ttl_days: int = 7  # dead_letters.payload emptied after this (the metadata stays)


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics/health HTTP endpoint and log format (see core/metrics.py, core/logs.py)."""

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
class GatewaySettings:
    """`emofleet serve` (gateway/): the HTTP front door, its keys, limits and waits."""

    host: str = "127.0.0.1"  # containers use 0.0.0.0
    port: int = 8000
    # API keys: "tenant:key" pairs, comma-separated, and/or a file of such lines (# comments); never logged.
    api_keys: Secret = Secret("")
    api_keys_file: str = ""
    rate_per_second: float = 10.0  # per API key, shared by every replica (Redis token bucket) ...
    rate_burst: int = 20  # ... with this burst
    max_body_bytes: int = 100 * 1024 * 1024  # request bodies (and the audio in them); also capped by audio.max_bytes
    uri_schemes: tuple[str, ...] = ("http", "https")  # `uri` requests; file:// never (it would read uploads)
    uploads: str = ""  # "" = <data dir>/uploads (must be under an audio file root) | s3://bucket/prefix
    upload_retention_seconds: int = 24 * 3600  # local uploads are swept after this; for s3 a lifecycle rule
    sync_wait_seconds: float = 30.0  # a synchronous request waits this long, then 504 + Location
    async_wait_seconds: float = 600.0  # how long a replica keeps waiting for an accepted request's result
    result_ttl_seconds: int = 24 * 3600  # answers kept in Redis for GET /v1/results/{id} (then ClickHouse)
    max_waiting: int = 10_000  # accepted requests awaiting a result per replica; beyond it 503
    max_lag_messages: int = 5_000  # processor group lag on the audio topic above which new work gets 503
    max_queue_seconds: float = 10.0  # ... or when a new reference would wait longer than this (lag / drain rate)
    max_connections: int = 512  # open requests per replica; uvicorn answers 503 beyond it before any work
    retry_after_seconds: int = 5  # Retry-After of a 503


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
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

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
    kafka = settings.kafka
    return replace(settings, kafka=replace(
        kafka,
        config=_properties_from_env(env, f"{ENV_PREFIX}KAFKA_CONFIG", kafka.config, _KAFKA_PROPERTY_SETTINGS),
        registry_config=_properties_from_env(env, f"{ENV_PREFIX}KAFKA_REGISTRY_CONFIG", kafka.registry_config,
                                             _REGISTRY_PROPERTY_SETTINGS)))


def _properties_from_env(env: Mapping[str, str], variable: str, parsed: Properties,
                         own_settings: Mapping[str, str]) -> Properties:
    """``parsed`` (from the JSON ``variable``) when that is set, else ``<variable>_FILE`` overlaid by
    ``<variable>__<NAME>``; a property that has a setting of its own is refused."""
    if variable not in env:
        file_variable = f"{variable}_FILE"
        from_file = _read_properties(file_variable, Path(env[file_variable])) if env.get(file_variable) else []
        from_variables = [(_property_name(key, variable), value) for key, value in env.items()
                          if key.startswith(f"{variable}__")]
        parsed = Properties.of([*from_file, *from_variables])
    for name, _ in parsed:
        if name in own_settings:
            raise ConfigError(f"{variable}: {name} has a setting of its own: set {own_settings[name]} instead")
    return parsed


def _property_name(key: str, variable: str) -> str:
    """``EMOFLEET_KAFKA_CONFIG__SSL_CA_LOCATION`` -> ``ssl.ca.location`` (for ``variable`` EMOFLEET_KAFKA_CONFIG)."""
    return key.removeprefix(f"{variable}__").lower().replace("_", ".")


def _read_properties(variable: str, path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{variable}={path}: cannot read it ({error.strerror}); fix the path") from None
    return _parse_properties(text, f"{variable}={path}")


def _parse_properties(text: str, source: str) -> list[tuple[str, str]]:
    """Java-properties lines ``name=value`` (or ``name: value``), ``#``/``!`` comments; names are kept verbatim.

    Line continuations and escapes are not supported: librdkafka's properties need neither.
    """
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        separator = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if separator < 0 or line.endswith("\\"):
            raise ConfigError(f"{source} line {number}: expected one name=value per line")
        pairs.append((line[:separator].strip(), line[separator + 1:].strip()))
    return pairs


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
    if isinstance(value, Properties):
        return json.dumps(value.as_dict())
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
    if kind is Properties:
        return _parse_properties_json(key, raw)  # its own error: the value, which holds secrets, is not echoed
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


def _parse_properties_json(key: str, raw: str) -> Properties:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{key} is not a JSON object of property names to string values; fix or unset it")
    return Properties.of(value.items())


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets masked, for `emofleet config` and startup logs."""
    return _masked(dataclasses.asdict(settings))


def _masked(value: Any) -> Any:
    if isinstance(value, Properties):
        return {name: _masked(v) for name, v in value}
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, Secret):
        return "***" if value else ""
    if isinstance(value, (tuple, list)):
        return [_masked(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return redact_url(value)  # a password inside a URL (redis://:pw@host) is a secret too
    return value


def url_password(value: str) -> str | None:
    """The password of a URL's user-info part (``scheme://user:pw@host``); None when there is none."""
    from urllib.parse import urlsplit

    if "://" not in value or "@" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:  # not a URL after all (e.g. an unbalanced "[")
        return None


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info part replaced by ``***``; anything else unchanged."""
    from urllib.parse import urlsplit

    if not (password := url_password(url)):
        return url
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1)).geturl()
