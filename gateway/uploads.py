"""Uploaded audio, stored where the processors can read it, and deleted after the retention.

* Embedded default: a directory (``<data dir>/uploads``) that must lie under one of the processors' audio file
  roots (``EMOFLEET_AUDIO_FILE_ROOTS``); references point at it with ``file://``. :meth:`LocalUploads.sweep`
  deletes files older than ``upload_retention_seconds`` (the gateway runs it periodically).
* Production: ``EMOFLEET_GATEWAY_UPLOADS=s3://bucket/prefix``; references point at ``s3://bucket/prefix/<id>``
  and a lifecycle rule on the prefix expires them (README: "HTTP front door").

A body is spooled to a file while it is received (:class:`Spool`: bytes counted against the cap and hashed
on the way, so memory stays flat whatever the size) and published under the request's id only when it is
needed: a cache hit discards the spool without the pipeline ever seeing it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from emofleet.core.config import AudioSettings, ConfigError, Settings

log = logging.getLogger(__name__)


class TooLarge(Exception):
    """The body passed the size cap."""


class Spool:
    """A body on its way to disk: counted, capped, hashed (SHA-256, the processors' cache key)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        descriptor, name = tempfile.mkstemp(prefix=".spool-", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        self._hash = hashlib.sha256()
        self._max = max_bytes
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise TooLarge(f"the audio is over the {self._max}-byte cap")
        self._hash.update(chunk)
        self._file.write(chunk)

    def close(self) -> str:
        """Finish writing; returns the SHA-256 of the bytes."""
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Uploads(Protocol):
    spool_dir: Path

    def uri_for(self, name: str) -> str:
        """The URI the processors fetch the upload ``name`` from."""

    def publish(self, spool: Spool, name: str) -> str:
        """Store the spooled audio under ``name``; returns :meth:`uri_for` ``name``. Blocking."""

    def sweep(self) -> int:
        """Delete uploads past the retention; returns how many."""


class LocalUploads:
    def __init__(self, directory: Path, retention_seconds: float) -> None:
        self.spool_dir = directory
        self._retention = retention_seconds
        directory.mkdir(parents=True, exist_ok=True)

    def uri_for(self, name: str) -> str:
        return (self.spool_dir / name).as_uri()

    def publish(self, spool: Spool, name: str) -> str:
        spool.path.replace(self.spool_dir / name)
        return self.uri_for(name)

    def sweep(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self._retention
        removed = 0
        for entry in os.scandir(self.spool_dir):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another replica swept it first
                continue
        return removed


class S3Uploads:
    """Uploads into ``s3://bucket/prefix``; expiry is the bucket's lifecycle rule, so :meth:`sweep` does nothing."""

    def __init__(self, url: str, audio: AudioSettings, spool_dir: Path) -> None:
        parts = urlsplit(url)
        self._bucket, self._prefix = parts.netloc, parts.path.strip("/")
        self.spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._client: Any = None
        self._endpoint = audio.s3_endpoint or None

    def uri_for(self, name: str) -> str:
        return f"s3://{self._bucket}/{self._key(name)}"

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    def publish(self, spool: Spool, name: str) -> str:
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self._endpoint)
        try:
            self._client.upload_file(str(spool.path), self._bucket, self._key(name))
        finally:
            spool.path.unlink(missing_ok=True)
        return self.uri_for(name)

    def sweep(self) -> int:
        return 0


def open_uploads(settings: Settings) -> LocalUploads | S3Uploads:
    """The configured store; a local directory the processors could not read is a configuration error."""
    gateway = settings.gateway
    if gateway.uploads.startswith("s3://"):
        if not urlsplit(gateway.uploads).netloc:
            raise ConfigError(f"EMOFLEET_GATEWAY_UPLOADS={gateway.uploads}: expected s3://bucket/prefix")
        return S3Uploads(gateway.uploads, settings.audio, settings.data_dir / "spool")
    directory = upload_directory(settings)
    roots = [Path(root).resolve() for root in settings.audio.file_roots]
    if "file" not in settings.audio.allowed_schemes or not any(directory.is_relative_to(r) for r in roots):
        raise ConfigError(f"uploads directory {directory} is under no audio file root, so processors could not read "
                          f"it: add it to EMOFLEET_AUDIO_FILE_ROOTS or set EMOFLEET_GATEWAY_UPLOADS=s3://bucket/prefix")
    return LocalUploads(directory, gateway.upload_retention_seconds)


def upload_directory(settings: Settings) -> Path:
    """Where local uploads go: EMOFLEET_GATEWAY_UPLOADS, else ``<data dir>/uploads`` (absolute)."""
    return Path(settings.gateway.uploads or settings.data_dir / "uploads").resolve()
