"""AudioReference records from paths, globs and manifests: pure validation, no Kafka.

Every input item becomes either a valid reference or an :class:`ItemError` naming the item and the
reason, so a caller can send the good ones and report each bad one.
"""

from __future__ import annotations

import csv
import glob
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

URI_SCHEMES = ("file", "http", "https", "s3")
MAX_URI_CHARS = 4096
MAX_ID_CHARS = 256
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_VALUE_CHARS = 4096
METADATA_FIELDS = ("tenant", "source", "channel", "call_id")
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".webm",
                            ".aiff", ".aif", ".au", ".caf", ".wma", ".mka", ".mp4"})
_AUDIO_ID_NAMESPACE = uuid.UUID("6f0e2b8a-3c55-4d0b-9a51-7d8e9e1f4a10")


@dataclass(frozen=True)
class ItemError:
    """One input item that could not become a reference."""

    item: str
    reason: str


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True)
class PathMapping:
    """file:// paths under ``source`` (as the producer sees them) are published under ``target`` (as the
    processors see them), like a container's volume mount ``source:target``."""

    source: PurePosixPath
    target: PurePosixPath


def parse_path_mapping(text: str) -> PathMapping:
    """``SOURCE:TARGET`` (split at the last colon; TARGET absolute) into a :class:`PathMapping`. A relative
    SOURCE is the caller's to resolve: :func:`map_file_uri` matches absolute paths."""
    source, colon, target = text.rpartition(":")
    if not colon or not source or not target:
        raise InvalidReference(f"path map {text!r} must be SOURCE:TARGET, e.g. ./audio:/audio")
    if not target.startswith("/"):
        raise InvalidReference(f"path map {text!r}: the target {target!r} must be an absolute path")
    return PathMapping(PurePosixPath(source), PurePosixPath(target))


def map_file_uri(uri: str, mappings: Sequence[PathMapping]) -> str:
    """``uri`` with its path moved by the mapping with the longest matching source; other schemes unchanged.

    With mappings given, a file:// path under none of them is an error: the processors could not read it.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file" or not mappings:
        return uri
    path = PurePosixPath(unquote(parsed.path))
    matching = [m for m in mappings if path.is_relative_to(m.source)]
    if not matching:
        raise InvalidReference(f"{path} is under none of the mapped directories "
                               f"({', '.join(str(m.source) for m in mappings)})")
    mapping = max(matching, key=lambda m: len(m.source.parts))
    return (mapping.target / path.relative_to(mapping.source)).as_uri()


def audio_id_for(uri: str) -> str:
    """A stable id for a URI, so re-enqueueing the same file yields the same audio_id."""
    return str(uuid.uuid5(_AUDIO_ID_NAMESPACE, uri))


def validate_uri(uri: str) -> str:
    if not uri or len(uri) > MAX_URI_CHARS:
        raise InvalidReference(f"uri must be 1..{MAX_URI_CHARS} characters")
    if any(ord(c) < 0x20 for c in uri):
        raise InvalidReference("uri contains control characters")
    parsed = urlparse(uri)
    if parsed.scheme not in URI_SCHEMES:
        raise InvalidReference(f"uri scheme {parsed.scheme or '(none)'!r} is not one of {', '.join(URI_SCHEMES)}")
    if parsed.scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")):
        raise InvalidReference("file uri must be file:///absolute/path")
    if parsed.scheme != "file" and not parsed.netloc:
        raise InvalidReference(f"{parsed.scheme} uri has no host/bucket")
    return uri


def make_reference(raw: Mapping[str, Any], *, defaults: Mapping[str, str | None] | None = None,
                   now_ms: int | None = None, path_map: Sequence[PathMapping] = ()) -> dict[str, Any]:
    """Validate one raw item (a manifest row or a path's fields) into an AudioReference record; file://
    URIs are moved by ``path_map`` first, so the audio id is that of the URI the processors read."""
    unknown = set(raw) - {"uri", "audio_id", "content_type", "attributes", *METADATA_FIELDS}
    if unknown:
        raise InvalidReference(f"unknown field(s): {', '.join(sorted(unknown))}")
    uri = raw.get("uri")
    if not isinstance(uri, str):
        raise InvalidReference("missing 'uri'")
    uri = map_file_uri(validate_uri(uri.strip()), path_map)
    audio_id = raw.get("audio_id") or audio_id_for(uri)
    reference: dict[str, Any] = {
        "audio_id": _bounded_text("audio_id", audio_id),
        "uri": uri,
        "produced_at": now_ms if now_ms is not None else int(time.time() * 1000),
        "content_type": _optional_text("content_type", raw.get("content_type")),
        "attributes": _attributes(raw.get("attributes") or {}),
    }
    for name in METADATA_FIELDS:
        value = raw.get(name)
        if value in (None, "") and defaults:
            value = defaults.get(name)
        reference[name] = _optional_text(name, value)
    return reference


def message_key(reference: Mapping[str, Any]) -> bytes:
    """Partition key: a call's clips share one key (ordered in one partition); else the audio id."""
    if reference.get("call_id"):
        scope = reference.get("tenant") or reference.get("source") or ""
        return f"{scope}/{reference['call_id']}".encode()
    return str(reference["audio_id"]).encode()


def references_from_paths(patterns: Iterable[str], *, defaults: Mapping[str, str | None] | None = None,
                          path_map: Sequence[PathMapping] = ()) -> Iterator[dict[str, Any] | ItemError]:
    """Local files, directories (recursively, audio extensions) and globs as file:// references."""
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            yield ItemError(pattern, "no file matches this pattern")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
                if not files:
                    yield ItemError(match, "directory holds no audio files")
                yield from (_path_reference(f, defaults, path_map) for f in files)
            else:
                yield _path_reference(path, defaults, path_map)


def _path_reference(path: Path, defaults: Mapping[str, str | None] | None,
                    path_map: Sequence[PathMapping]) -> dict[str, Any] | ItemError:
    if not path.is_file():
        return ItemError(str(path), "no such file" if not path.exists() else "not a regular file")
    try:
        return make_reference({"uri": path.resolve().as_uri()}, defaults=defaults, path_map=path_map)
    except InvalidReference as error:
        return ItemError(str(path), str(error))


def references_from_manifest(path: Path, *, defaults: Mapping[str, str | None] | None = None,
                             path_map: Sequence[PathMapping] = ()) -> Iterator[dict[str, Any] | ItemError]:
    """Rows of a .jsonl or .csv manifest; each row is validated on its own."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise InvalidReference(f"manifest {path} must be .jsonl or .csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = _jsonl_rows(handle) if suffix != ".csv" else _csv_rows(handle)
        for line_number, row in rows:
            label = f"{path.name}:{line_number}"
            if isinstance(row, ItemError):
                yield ItemError(label, row.reason)
                continue
            try:
                yield make_reference(row, defaults=defaults, path_map=path_map)
            except InvalidReference as error:
                yield ItemError(label, str(error))


def _jsonl_rows(handle: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | ItemError]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, ItemError("", f"not valid JSON ({error.msg})")
            continue
        yield number, row if isinstance(row, dict) else ItemError("", "line is not a JSON object")


def _csv_rows(handle: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | ItemError]]:
    reader = csv.DictReader(handle)
    for row in reader:
        number = reader.line_num
        if None in row:
            yield number, ItemError("", "more cells than header columns")
            continue
        clean: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        attributes = {k.removeprefix("attr."): clean.pop(k) for k in list(clean) if k.startswith("attr.")}
        if attributes:
            clean["attributes"] = attributes
        yield number, clean


def _bounded_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidReference(f"{name} must be a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidReference(f"{name} is longer than {MAX_ID_CHARS} characters")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    return _bounded_text(name, value)


def _attributes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidReference("attributes must be an object of strings")
    if len(value) > MAX_ATTRIBUTES:
        raise InvalidReference(f"more than {MAX_ATTRIBUTES} attributes")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ATTRIBUTE_KEY_CHARS:
            raise InvalidReference(f"attribute names must be 1..{MAX_ATTRIBUTE_KEY_CHARS} characters")
        if not isinstance(item, (str, int, float, bool)):
            raise InvalidReference(f"attribute {key!r} must be a string")
        text = str(item)
        if len(text) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise InvalidReference(f"attribute {key!r} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} characters")
        result[key] = text
    return result
