"""Fetch the bytes behind an audio URI (file://, http(s)://, s3://) under the AudioSettings policy.

Policy, enforced before any byte is read:

* the scheme must be in ``allowed_schemes``;
* ``file:///abs/path`` only (host empty or ``localhost``), and the path with every symlink resolved
  must lie under one of ``file_roots`` (also resolved), so ``..`` and symlinks cannot escape a root;
* ``http(s)://`` only to hosts in ``http_hosts`` (exact, case-insensitive; ``*.example.com`` matches
  any subdomain but not ``example.com`` itself). Redirects are followed by hand, at most
  ``MAX_REDIRECTS``, and every hop's scheme and host is checked again;
* no more than ``max_bytes`` is ever held: files are stat'ed first, HTTP Content-Length / S3
  ContentLength are checked up front and bodies are read in chunks up to the cap.

Errors are :class:`AudioError` with a short ``reason`` and ``permanent`` (False = worth retrying).
Messages show URIs without credentials or query strings (presigned URLs carry signatures).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
import threading
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, unquote, urlsplit

import httpx

from emofleet.core.config import AudioSettings

MAX_REDIRECTS = 5
_CHUNK = 1 << 20


class AudioError(Exception):
    """Why an audio reference could not be turned into samples."""

    def __init__(self, reason: str, message: str, permanent: bool = True) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.permanent = permanent

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.message, self.permanent))


def shown(uri: str) -> str:
    """The URI as it may appear in logs: no user info, query or fragment."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable uri>"
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Exact (case-insensitive) host match, or ``*.suffix`` for any subdomain of suffix (names only)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern.startswith("*.") and not _is_ip(host):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


class Fetcher:
    """Reads URIs under one AudioSettings policy. Thread-safe; call :meth:`close` when done."""

    def __init__(self, settings: AudioSettings) -> None:
        self._settings = settings
        self._schemes = {s.strip().lower() for s in settings.allowed_schemes}
        self._roots = tuple(Path(root).resolve() for root in settings.file_roots)
        self._http = httpx.Client(
            follow_redirects=False,
            timeout=settings.fetch_timeout_seconds,
            headers={"User-Agent": "emofleet-audio-fetch"},
        )
        self._s3: Any = None
        self._s3_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def fetch(self, uri: str) -> bytes:
        try:
            parts = urlsplit(uri)
        except ValueError:
            raise AudioError("bad_uri", f"cannot parse {shown(uri)!r}") from None
        scheme = parts.scheme.lower()
        if not scheme:
            raise AudioError("scheme_not_allowed", f"{shown(uri)!r} is not a URI (use file:///abs/path)")
        if scheme not in self._schemes:
            raise AudioError("scheme_not_allowed", f"scheme {scheme!r} is not in EMOFLEET_AUDIO_ALLOWED_SCHEMES")
        if scheme == "file":
            return self._fetch_file(parts)
        if scheme in ("http", "https"):
            return self._fetch_http(uri)
        if scheme == "s3":
            return self._fetch_s3(parts)
        raise AudioError("scheme_not_allowed", f"no loader for scheme {scheme!r}")

    # ------------------------------------------------------------------ file

    def _fetch_file(self, parts: SplitResult) -> bytes:
        where = shown(parts.geturl())
        if parts.netloc.lower() not in ("", "localhost"):
            raise AudioError("host_not_allowed", f"{where!r}: file:// URIs must name a local path (file:///abs/path)")
        if parts.query or parts.fragment or not parts.path.startswith("/"):
            raise AudioError("bad_uri", f"{where!r}: expected file:///absolute/path (percent-encode '?' and '#')")
        if not self._roots:
            raise AudioError("root_not_allowed", "file:// is disabled: set EMOFLEET_AUDIO_FILE_ROOTS to allowed directories")
        try:
            path = Path(unquote(parts.path)).resolve()
        except (OSError, ValueError) as exc:  # NUL bytes, symlink loops
            raise AudioError("bad_uri", f"{where!r}: {exc}") from None
        if not any(path.is_relative_to(root) for root in self._roots):
            raise AudioError("root_not_allowed", f"{where!r} is outside EMOFLEET_AUDIO_FILE_ROOTS")
        return self._read_file(path, where)

    def _read_file(self, path: Path, where: str) -> bytes:
        # O_NOFOLLOW: the resolved path has no symlinks, so one appearing now is a swap; O_NONBLOCK: a
        # FIFO must not block the open.
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise _os_error(exc, where) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AudioError("not_found", f"{where!r} is not a regular file")
            self._check_size(info.st_size, where)
            with open(fd, "rb", closefd=False) as handle:
                # Ask for the stat'ed size + 1 (a read of max_bytes + 1 would allocate the whole cap first);
                # a file that grew since fstat is read on up to the cap.
                data = handle.read(info.st_size + 1)
                if len(data) > info.st_size:
                    data += handle.read(self._settings.max_bytes + 1 - len(data))
        except OSError as exc:
            raise _os_error(exc, where) from None
        finally:
            os.close(fd)
        self._check_size(len(data), where)  # the file may have grown since fstat
        return data

    # ------------------------------------------------------------------ http

    def _fetch_http(self, uri: str) -> bytes:
        try:
            url = httpx.URL(uri)
        except httpx.InvalidURL as exc:
            raise AudioError("bad_uri", f"{shown(uri)!r}: {exc}") from None
        # Check the host as httpx parsed it, so a parser disagreement cannot smuggle another host in.
        if not self._http_target_allowed(url):
            raise AudioError("host_not_allowed", f"{shown(uri)!r}: host is not in EMOFLEET_AUDIO_HTTP_HOSTS")
        try:
            for _ in range(MAX_REDIRECTS + 1):
                with self._http.stream("GET", url) as response:
                    if not response.is_redirect:
                        return self._read_response(response, shown(str(url)))
                    url = response.url.join(response.headers["location"]).copy_with(fragment=None)
                    if not self._http_target_allowed(url):
                        raise AudioError("redirect_not_allowed", f"{shown(uri)!r} redirects to {shown(str(url))!r}, which is not allowed")
        except httpx.TimeoutException as exc:
            raise AudioError("timeout", f"{shown(uri)!r}: {type(exc).__name__}", permanent=False) from None
        except httpx.InvalidURL as exc:
            raise AudioError("bad_uri", f"{shown(uri)!r}: {exc}") from None
        except httpx.TransportError as exc:
            raise AudioError("fetch_failed", f"{shown(uri)!r}: {type(exc).__name__}: {exc}", permanent=False) from None
        raise AudioError("redirect_not_allowed", f"{shown(uri)!r}: more than {MAX_REDIRECTS} redirects")

    def _http_target_allowed(self, url: httpx.URL) -> bool:
        return url.scheme in ("http", "https") and url.scheme in self._schemes and host_allowed(url.host, self._settings.http_hosts)

    def _read_response(self, response: httpx.Response, where: str) -> bytes:
        status = response.status_code
        if status // 100 != 2:
            raise _http_status_error(status, where)
        declared = response.headers.get("content-length", "")
        if declared.isdigit():
            self._check_size(int(declared), where)
        body = bytearray()
        for chunk in response.iter_bytes(_CHUNK):
            body += chunk
            self._check_size(len(body), where)
        return bytes(body)

    # ------------------------------------------------------------------ s3

    def _fetch_s3(self, parts: SplitResult) -> bytes:
        where = shown(parts.geturl())
        bucket, key = parts.netloc, parts.path.lstrip("/")  # keys are literal, as in the AWS CLI
        if not bucket or not key:
            raise AudioError("bad_uri", f"{where!r}: expected s3://bucket/key")
        client = self._s3_client()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            length = response.get("ContentLength")
            if isinstance(length, int):
                self._check_size(length, where)
            body = response["Body"]
            try:
                return self._read_stream(body, where)
            finally:
                body.close()
        except AudioError:
            raise
        except Exception as exc:  # botocore's exceptions; boto3 is optional so they are classified by shape
            raise _s3_error(exc, where) from None

    def _s3_client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise AudioError("s3_unavailable", "s3:// needs boto3: pip install boto3") from None
                timeout = self._settings.fetch_timeout_seconds
                self._s3 = boto3.client(
                    "s3",
                    endpoint_url=self._settings.s3_endpoint or None,
                    config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"}),
                )
            return self._s3

    def _read_stream(self, stream: BinaryIO, where: str) -> bytes:
        body = bytearray()
        while chunk := stream.read(_CHUNK):
            body += chunk
            self._check_size(len(body), where)
        return bytes(body)

    def _check_size(self, size: int, where: str) -> None:
        if size > self._settings.max_bytes:
            raise AudioError("too_large", f"{where!r} is over EMOFLEET_AUDIO_MAX_BYTES={self._settings.max_bytes}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _os_error(exc: OSError, where: str) -> AudioError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return AudioError("not_found", f"{where!r} does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AudioError("forbidden", f"{where!r}: permission denied")
    if exc.errno == errno.ELOOP:
        return AudioError("root_not_allowed", f"{where!r} became a symlink while being opened")
    return AudioError("fetch_failed", f"{where!r}: {exc.strerror}", permanent=False)


def _http_status_error(status: int, where: str) -> AudioError:
    if status in (404, 410):
        return AudioError("not_found", f"{where!r}: HTTP {status}")
    if status in (401, 403):
        return AudioError("forbidden", f"{where!r}: HTTP {status}")
    transient = status in (408, 425, 429) or status >= 500
    return AudioError("fetch_failed", f"{where!r}: HTTP {status}", permanent=not transient)


def _s3_error(exc: Exception, where: str) -> AudioError:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
            return AudioError("not_found", f"{where!r}: {code or status}")
        if code in ("AccessDenied", "403") or status in (401, 403):
            return AudioError("forbidden", f"{where!r}: {code or status}")
        transient = status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling", "InternalError")
        return AudioError("fetch_failed", f"{where!r}: {code} (HTTP {status})", permanent=not transient)
    name = type(exc).__name__
    if "Timeout" in name:
        return AudioError("timeout", f"{where!r}: {name}", permanent=False)
    if "Credentials" in name:
        return AudioError("s3_unavailable", f"{where!r}: {name}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if name == "ParamValidationError":
        return AudioError("bad_uri", f"{where!r}: {exc}")
    return AudioError("fetch_failed", f"{where!r}: {name}: {exc}", permanent=False)
