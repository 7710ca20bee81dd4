"""Connecting to ClickHouse: embedded chDB (``chdb:///abs/path``) or a server (``http(s)://host:port``).

Both give a clickhouse-connect ``Client`` with the same API, so the sink, the migrations and the
analytics never care which one they talk to.

* ``chdb:///abs/path`` - the in-process chDB engine storing its data under that directory (created if
  missing). **One process per data path**: a second process gets "Cannot lock file <path>/status",
  reported here as :class:`ClickHouseError` with a hint; within one process close a client before
  opening another path.
* ``http://host:port`` / ``https://host:port`` - a ClickHouse server. Host, port and TLS come from the
  DSN; the username and password from :class:`~emofleet.core.config.ClickHouseSettings`
  (``EMOFLEET_CLICKHOUSE_USERNAME`` / ``EMOFLEET_CLICKHOUSE_PASSWORD``; the password is a ``Secret`` and
  never appears in messages or logs). A DSN carrying credentials (``https://user:pw@host``) is refused:
  the DSN is printed by ``emofleet config`` and startup logs. TLS certificates are verified; query
  parameters ``ca_cert=/path/ca.pem`` (private CA) and ``verify=false`` (testing only, logged as a
  warning) change that, ``connect_timeout`` / ``send_receive_timeout`` (seconds) tune the timeouts.
* The database (``EMOFLEET_CLICKHOUSE_DATABASE``) is created when missing and made the client's default.
* Datetimes come back timezone-aware (``tz_mode="aware"``); insert aware UTC datetimes (chDB reads naive
  values in the process timezone).

:func:`is_transient` sorts exceptions into "retry later" (network, timeouts, too many parts, overload,
server 5xx without a ClickHouse error code) and "will fail again" (syntax, types, unknown tables, auth).
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import logging
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from emofleet.sinks.migrations import quote_identifier
from emofleet.core.config import ClickHouseSettings, redact_url

log = logging.getLogger(__name__)

# Error codes (ClickHouse src/Common/ErrorCodes.cpp) worth retrying: the same request can succeed later.
TRANSIENT_CODES: dict[int, str] = {
    3: "UNEXPECTED_END_OF_FILE",
    159: "TIMEOUT_EXCEEDED",
    173: "CANNOT_ALLOCATE_MEMORY",
    198: "DNS_ERROR",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    252: "TOO_MANY_PARTS",
    279: "ALL_CONNECTION_TRIES_FAILED",
    285: "TOO_FEW_LIVE_REPLICAS",
    286: "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE",
    319: "UNKNOWN_STATUS_OF_INSERT",
    373: "SESSION_IS_LOCKED",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    999: "KEEPER_EXCEPTION",
    1000: "POCO_EXCEPTION",
}
_TRANSIENT_NAMES = frozenset(TRANSIENT_CODES.values())
# Permanent errors of the table, the user or the settings rather than of the rows: every subset of the rows
# fails the same way, so an insert failing with one is retried (and alerted on), never split into dead letters.
SETUP_CODES: dict[int, str] = {
    8: "THERE_IS_NO_COLUMN",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    47: "UNKNOWN_IDENTIFIER",
    60: "UNKNOWN_TABLE",
    81: "UNKNOWN_DATABASE",
    115: "UNKNOWN_SETTING",
    164: "READONLY",
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    194: "REQUIRED_PASSWORD",
    201: "QUOTA_EXCEEDED",
    218: "TABLE_IS_DROPPED",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
}
_TRANSIENT_TEXT = re.compile(
    r"too many parts|timed? ?out|timeout|connection (refused|reset|aborted)|broken pipe|"
    r"network is unreachable|temporary failure in name resolution|remote end closed|"
    r"max retries exceeded|service unavailable|bad gateway",
    re.IGNORECASE)
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
_CODE = re.compile(r"\bCode:\s*(\d+)")


class ClickHouseError(UserFacingError):
    """ClickHouse could not be reached or set up. ``str()`` is one line with a hint, fit for logs.

    ``transient`` says whether retrying later may help (see :func:`is_transient`).
    """

    hint = "check the DSN (`emofleet config`) and that the sink runs"

    def __init__(self, message: str, *, hint: str = "", transient: bool = False) -> None:
        super().__init__(_one_line(f"{message} (hint: {hint})" if hint else message), hint)
        self.transient = transient

    @property
    def message(self) -> str:
        return str(self).partition(" (hint: ")[0]


def connect(settings: ClickHouseSettings, dsn: str) -> Any:
    """A clickhouse-connect client for ``dsn`` with ``settings.database`` created and selected.

    Raises :class:`ClickHouseError` (one-line message with a hint) when the DSN is unusable or the
    store cannot be reached.
    """
    parts = urlsplit(dsn)
    if parts.scheme == "chdb":
        if parts.netloc or parts.query:
            raise ClickHouseError(f"unsupported chDB DSN {dsn!r}",
                                  hint="write chdb:///absolute/path (three slashes, no host, no options)")
        client = _connect_chdb(parts.path)
        where = f"chDB at {parts.path}"
    elif parts.scheme in ("http", "https"):
        client = _connect_http(settings, dsn)
        where = f"ClickHouse at {redact_url(dsn)}"
    else:
        raise ClickHouseError(f"unsupported ClickHouse DSN {redact_url(dsn)!r}",
                              hint="use chdb:///absolute/path or http(s)://host:port in EMOFLEET_CLICKHOUSE_DSN")
    try:
        database = quote_identifier(settings.database)
    except ValueError as exc:
        client.close()
        raise ClickHouseError(str(exc), hint="set EMOFLEET_CLICKHOUSE_DATABASE") from None
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.database = settings.database
    except Exception as exc:
        client.close()
        raise ClickHouseError(f"cannot create database {settings.database!r} in {where}: "
                              f"{_detail(exc, settings)}",
                              hint="the user needs CREATE DATABASE, or create it beforehand",
                              transient=is_transient(exc)) from None
    return client


def _connect_chdb(path: str) -> Any:
    import clickhouse_connect

    if not path.startswith("/"):
        raise ClickHouseError(f"chDB DSN needs an absolute data path, got {path!r}",
                              hint="write chdb:///absolute/path (three slashes)")
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClickHouseError(f"cannot create chDB data directory {path}: {exc.strerror or exc}",
                              hint="set EMOFLEET_DATA_DIR or EMOFLEET_CLICKHOUSE_DSN to a writable path") from None
    try:
        return clickhouse_connect.get_client(dsn=f"chdb://{path}", tz_mode="aware")
    except Exception as exc:
        text = _first_line(str(exc))
        if "cannot connect with different path" in text:
            raise ClickHouseError(
                f"this process already has chDB open at another path, cannot open {path}",
                hint="close the other client first (chDB allows one data path per process)") from None
        holder = chdb_lock_holder(path)
        if holder is not None:
            raise ClickHouseError(
                f"chDB data path {path} is in use by another process ({holder})",
                hint="chDB allows one process per data path: stop that process (e.g. a running sink), "
                     "or point EMOFLEET_CLICKHOUSE_DSN at another directory",
                transient=True) from None
        raise ClickHouseError(f"cannot open chDB at {path}: {text[:300]}",
                              hint="check that the directory is a chDB data directory and writable") from None


def chdb_lock_holder(path: str | Path) -> str | None:
    """``"PID n"`` (or ``"unknown pid"``) when another process holds the chDB data path, else None.

    chDB, like clickhouse-server, keeps ``<path>/status`` flock()ed while the engine is open. Probing
    from the process that has the engine open itself also reports it locked, so call this only after
    an open failed (or from a process without chDB open).
    """
    import fcntl
    import os

    status = Path(path) / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                match = re.search(r"PID:\s*(\d+)", status.read_text(errors="replace"))
            except OSError:
                match = None
            return f"PID {match.group(1)}" if match else "unknown pid"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _connect_http(settings: ClickHouseSettings, dsn: str) -> Any:
    import clickhouse_connect

    parts = urlsplit(dsn)
    shown = redact_url(dsn)
    if parts.username or parts.password:
        raise ClickHouseError(f"credentials in the ClickHouse DSN {shown}",
                              hint="remove user:password@ from EMOFLEET_CLICKHOUSE_DSN and set "
                                   "EMOFLEET_CLICKHOUSE_USERNAME / EMOFLEET_CLICKHOUSE_PASSWORD")
    if parts.path not in ("", "/"):
        raise ClickHouseError(f"path {parts.path!r} in the ClickHouse DSN {shown}",
                              hint="the database comes from EMOFLEET_CLICKHOUSE_DATABASE; use http(s)://host:port")
    if not parts.hostname:
        raise ClickHouseError(f"no host in the ClickHouse DSN {shown!r}", hint="use http(s)://host:port")
    secure = parts.scheme == "https"
    try:
        port = parts.port or (8443 if secure else 8123)
    except ValueError:
        raise ClickHouseError(f"invalid port in the ClickHouse DSN {shown!r}", hint="use http(s)://host:port") from None
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"verify", "ca_cert", "connect_timeout", "send_receive_timeout", "compress"}
    if unknown:
        raise ClickHouseError(f"unknown option(s) {', '.join(sorted(unknown))} in the ClickHouse DSN {shown}",
                              hint="supported: verify, ca_cert, connect_timeout, send_receive_timeout, compress")
    kwargs: dict[str, Any] = {
        "connect_timeout": float(options.get("connect_timeout", 10)),
        "send_receive_timeout": float(options.get("send_receive_timeout", 300)),
    }
    if "compress" in options:
        kwargs["compress"] = options["compress"]
    if secure:
        verify = options.get("verify", "true").strip().lower() not in ("0", "false", "no", "off")
        if not verify:
            log.warning("TLS certificate verification is OFF for %s (verify=false in the DSN)", shown)
        kwargs["verify"] = verify
        if options.get("ca_cert"):
            kwargs["ca_cert"] = options["ca_cert"]
    password = str(settings.password)
    try:
        return clickhouse_connect.get_client(
            host=parts.hostname, port=port, secure=secure, interface=parts.scheme,
            username=settings.username, password=password, client_name="emofleet",
            tz_mode="aware", **kwargs)
    except Exception as exc:
        detail = _detail(exc, settings)
        code = getattr(exc, "code", None)
        lowered = detail.lower()
        if code in (516, 192, 194) or "authentication failed" in lowered:
            hint = "check EMOFLEET_CLICKHOUSE_USERNAME and EMOFLEET_CLICKHOUSE_PASSWORD"
        elif "certificate" in lowered or "ssl" in lowered:
            hint = "TLS verification failed: add ?ca_cert=/path/ca.pem to the DSN for a private CA"
        else:
            hint = "check EMOFLEET_CLICKHOUSE_DSN (scheme, host, port) and that the server is running"
        raise ClickHouseError(f"cannot connect to ClickHouse at {shown} as {settings.username!r}: {detail}",
                              hint=hint, transient=is_transient(exc)) from None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same operation later may succeed (network, timeouts, overload, too many
    parts, server 5xx without an error code); False for errors that will repeat (syntax, types, unknown
    tables/columns, auth, bad data). Looks through ``ClickHouseError`` and exception chains."""
    if isinstance(exc, ClickHouseError):
        return exc.transient
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
        return False  # serialization of a bad row: the same row fails again
    code = _error_code(exc)
    name = getattr(exc, "name", None)
    text = str(exc)
    if code is not None:
        return code in TRANSIENT_CODES
    if name:
        return name in _TRANSIENT_NAMES
    if match := _HTTP_STATUS.search(text):
        return match.group(1).startswith("5") or match.group(1) in ("408", "429")
    if _TRANSIENT_TEXT.search(text):
        return True
    from clickhouse_connect.driver.exceptions import OperationalError

    if isinstance(exc, OperationalError):
        return True  # transport failures without a server error code
    if isinstance(exc, socket.gaierror):
        return True  # DNS failure: often a blip, and the DSN was already accepted once
    cause = exc.__cause__ or exc.__context__
    return is_transient(cause) if cause is not None and cause is not exc else False


def rejects_rows(exc: BaseException) -> bool:
    """True when an insert failed for what is in its rows (a constraint, a value the type cannot hold, a
    row the client cannot serialize), so the same insert without the offending rows can succeed. False
    for transient errors, client usage errors (``ProgrammingError``: unknown column names, wrong row
    width) and :data:`SETUP_CODES`, which no subset of the rows avoids."""
    from clickhouse_connect.driver.exceptions import ProgrammingError

    if is_transient(exc) or isinstance(exc, (ClickHouseError, ProgrammingError)):
        return False
    return _error_code(exc) not in SETUP_CODES


def error_line(exc: BaseException) -> str:
    """The error as one short line (its first line, transport noise removed), fit for a record or a log."""
    return _detail(exc)


def _error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code: the client's ``code`` attribute, else ``Code: N`` in the message."""
    code = getattr(exc, "code", None)
    if code is None and (match := _CODE.search(str(exc))):
        code = int(match.group(1))
    return code


def insert_rows(client: Any, database: str, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                *, dedup_token: str | None = None) -> int:
    """Insert ``rows`` into ``database.table``; with ``dedup_token`` a repeat of the same insert (same token,
    within the table's deduplication window) is dropped by the server. Returns the rows sent."""
    if not rows:
        return 0
    settings = dedup_settings(dedup_token) if dedup_token else None
    client.insert(f"{quote_identifier(database)}.{quote_identifier(table)}", rows,
                  column_names=list(columns), settings=settings)
    return len(rows)


_ROOT_CAUSES = (
    re.compile(r"\[SSL: [A-Z_]+\][^'\")]*"),
    re.compile(r"\[Errno -?\d+\] [^'\")]*"),
    re.compile(r"(?:Read|Connect) timed out[^'\")]*"),
)
_NOISE = (
    re.compile(r"^Received ClickHouse exception, code: \d+, server response: "),
    re.compile(r"\s*\(for url [^)]*\)"),
    re.compile(r"\s*\(version [^()]*(\([^()]*\))?[^()]*\)"),
)


def dedup_settings(token: str) -> dict[str, Any]:
    """Insert settings that make a repeated insert with ``token`` a no-op, in the materialized views'
    targets too (``deduplicate_blocks_in_dependent_materialized_views`` is 1 by default on chDB 26.9 but
    0 on older servers, where the MV would count the dropped repeat)."""
    return {"insert_deduplication_token": token, "deduplicate_blocks_in_dependent_materialized_views": 1}


def _detail(exc: BaseException, settings: ClickHouseSettings | None = None) -> str:
    """A short one-line description: the root cause of transport errors, else the first line."""
    text = _first_line(str(exc) or type(exc).__name__)
    for pattern in _ROOT_CAUSES:
        if match := pattern.search(text):
            text = match.group(0).strip(" .")
            break
    for noise in _NOISE:
        text = noise.sub("", text)
    if settings is not None and settings.password and str(settings.password) in text:
        text = text.replace(str(settings.password), "***")
    return text[:300]


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())
