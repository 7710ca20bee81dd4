"""Read-only queries through the process that owns an embedded chDB directory.

chDB allows one process per data directory. While the sink owns it, `emofleet query` and
`emofleet report` from another terminal reach the data through this server: loopback only, a random
bearer token in an owner file only the user can read, every query run with ``readonly=1``.
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import json
import math
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen
from uuid import UUID

OWNER_FILE = "chdb-owner.json"
MAX_REQUEST_BYTES = 1 << 20
QueryRunner = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


class QueryError(UserFacingError, RuntimeError):
    """A query failed or was refused; the message is ClickHouse's first line."""

    hint = "queries are read-only; tables: emotion_events, dead_letters, emotion_minutes, emotion_frames"


def direct_runner(client: Any, lock: threading.Lock | None = None, *, readonly: bool = True) -> QueryRunner:
    """Run queries on a clickhouse-connect client, as rows of dicts."""
    guard = lock or threading.Lock()
    settings = {"readonly": 1} if readonly else {}

    def run(sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            with guard:
                result = client.query(sql, parameters=parameters or None, settings=settings)
        except Exception as error:
            raise QueryError(_first_line(error)) from None
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    return run


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:500]


def json_value(value: Any, *, finite: bool) -> Any:
    """A query value (nested in mappings, lists and tuples too) as plain JSON data.

    Datetimes and dates become ISO 8601, bytes UTF-8 text with undecodable bytes escaped (``\\xff``),
    Decimal and UUID strings, numpy values their Python values, mapping keys strings, anything else its
    ``str()``. ``finite=True`` turns NaN and infinities into None, for JSON that other tools read; with
    ``finite=False`` they stay floats, which Python's json writes and reads back (the query server's replies
    and the report's data keep them).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if finite and not math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {str(k): json_value(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, finite=finite) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return json_value(value.tolist(), finite=finite)
    return str(value)


class QueryServer:
    def __init__(self, run: QueryRunner, data_dir: Path) -> None:
        self._run = run
        self._owner_path = data_dir / OWNER_FILE
        self._token = secrets.token_hex(16)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="query-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        self._owner_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._owner_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"port": self.port, "token": self._token, "pid": os.getpid()}, handle)

    def stop(self) -> None:
        self._owner_path.unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        run, token = self._run, self._token

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if self.path != "/query":
                    return self._reply(404, {"error": "not found"})
                if not secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                    return self._reply(403, {"error": "bad token"})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_REQUEST_BYTES:
                    return self._reply(413, {"error": "request too large"})
                try:
                    request = json.loads(self.rfile.read(length))
                    rows = run(str(request["sql"]), dict(request.get("parameters") or {}))
                except Exception as error:  # the client shows the server's one-line reason
                    return self._reply(400, {"error": _first_line(error)})
                self._reply(200, {"rows": json_value(rows, finite=False)})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:  # queries are not logged (they may hold data)
                pass

        return Handler


def owner_runner(data_dir: Path, timeout: float = 300.0) -> QueryRunner | None:
    """A runner that goes through the owning process, or None when no live process owns the data."""
    try:
        owner = json.loads((data_dir / OWNER_FILE).read_text())
        os.kill(int(owner["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None

    def run(sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        request = Request(f"http://127.0.0.1:{owner['port']}/query", method="POST",
                          data=json.dumps({"sql": sql, "parameters": json_value(parameters, finite=False)}).encode(),
                          headers={"Authorization": f"Bearer {owner['token']}", "Content-Type": "application/json"})
        try:
            with urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URL built above
                return list(json.loads(response.read())["rows"])
        except HTTPError as error:
            raise QueryError(json.loads(error.read() or b"{}").get("error", str(error))) from None
        except URLError as error:
            raise QueryError(f"the process owning {data_dir} did not answer: {error.reason}") from None

    return run
