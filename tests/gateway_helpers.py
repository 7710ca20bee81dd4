"""Shared pieces of the gateway tests: settings with keys, the app in-process, a gateway process, requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from emofleet.core.config import GatewaySettings, Secret, Settings, to_env
from emofleet.infra.local_stack import free_port, stop_process

KEY_A = "acme-key-0123456789abcdef"
KEY_B = "globex-key-0123456789abcdef"


def gateway_settings(settings: Settings, **gateway: Any) -> Settings:
    """The test's settings with two tenants' keys and the given gateway overrides."""
    base = GatewaySettings(api_keys=Secret(f"acme:{KEY_A},globex:{KEY_B}"), sync_wait_seconds=30.0)
    return replace(settings, gateway=replace(base, **gateway))


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def gateway_client(settings: Settings) -> Iterator[Any]:
    """The app in this process (lifespan run), its parts at ``client.app.state.parts``, ready to serve."""
    from starlette.testclient import TestClient

    from emofleet.gateway.app import create_app
    from emofleet.gateway.server import build_parts

    with TestClient(create_app(lambda: build_parts(settings))) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, "gateway ready")
        yield client


@contextmanager
def gateway_process(settings: Settings, log: Path) -> Iterator[str]:
    """`emofleet serve` as its own process on a free port; yields its base URL once /readyz answers 200."""
    port = free_port()
    env = {**os.environ, **to_env(settings), "EMOFLEET_GATEWAY_PORT": str(port)}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or process.poll() is not None, "gateway process ready", timeout=60)
        assert process.poll() is None, log.read_text()
        yield url
    finally:
        stop_process(process.pid)


@contextmanager
def sink_process(settings: Settings, log: Path) -> Iterator[None]:
    """`emofleet sink` as its own process (it owns the test's chDB and answers the gateway's queries)."""
    from emofleet.sinks.query_server import owner_runner

    env = {**os.environ, **to_env(settings)}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "sink"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: owner_runner(settings.data_dir) is not None or process.poll() is not None,
                 "the sink serving queries", timeout=60)
        assert process.poll() is None, log.read_text()
        yield
    finally:
        stop_process(process.pid, timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
