"""A request body -> a :class:`Submission`: the audio (spooled) or a URI, the options and the metadata.

Three shapes, as the seed accepted them plus a raw body:

* ``multipart/form-data``: a file part (``audio`` or ``file``) plus form fields for the options and metadata;
* a raw ``audio/*`` (or ``application/octet-stream``) body, options and metadata in the query string;
* ``application/json``: ``{"audio": "<base64>"}`` (the seed's shape) or ``{"uri": "https://..."}``, plus options
  and metadata as fields.

Options: ``granularity`` (utterance | frame), ``extract_embedding`` (bool). Metadata: ``source``, ``channel``,
``call_id``, ``attributes`` (an object of strings; a JSON string in forms and query strings). The tenant is
never read from the request: it comes from the API key. Every failure is a :class:`Problem` with the status the
client gets (400 malformed, 413 too large, 415 not audio); the body is counted while it streams, so an oversized
one is cut off at the cap, whatever its Content-Length said.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from emofleet.gateway.uploads import Spool, TooLarge

GRANULARITIES = ("utterance", "frame")
AUDIO_PARTS = ("audio", "file")
OPTION_FIELDS = ("granularity", "extract_embedding")
METADATA_FIELDS = ("source", "channel", "call_id", "attributes")
MAX_FIELD_BYTES = 64 * 1024
# Declared types that can carry audio; anything else declared is 415. Undecodable bytes of an audio type get
# the pipeline's verdict (a dead letter: 422 not_audio).
AUDIO_TYPES = ("audio/", "video/webm", "video/ogg", "video/mp4", "application/octet-stream", "application/ogg")


class Problem(Exception):
    """An error answer: HTTP status, a machine reason, a human detail, extra headers."""

    def __init__(self, status: int, reason: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "detail": self.detail}


@dataclass
class Submission:
    """What one analyze request asks for. Exactly one of ``spool`` (uploaded bytes) and ``uri`` is set."""

    spool: Spool | None = None
    sha256: str = ""
    content_type: str | None = None
    uri: str | None = None
    granularity: str = "utterance"
    extract_embedding: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)  # source, channel, call_id, attributes

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


def is_audio_type(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower().startswith(AUDIO_TYPES)


async def read_submission(content_type: str, body: AsyncIterator[bytes], query: Mapping[str, str],
                          new_spool: Any, max_body: int) -> Submission:
    """Parse the body (streamed) into a Submission; ``new_spool()`` opens a :class:`Spool` for audio bytes."""
    media = content_type.split(";")[0].strip().lower()
    counted = _capped(body, max_body)
    if media == "multipart/form-data":
        submission = await _multipart(content_type, counted, new_spool)
    elif media == "application/json":
        submission = await _json(counted, new_spool)
    elif is_audio_type(media):
        spool = new_spool()
        try:
            async for chunk in counted:
                spool.write(chunk)
        except BaseException:
            spool.discard()
            raise
        submission = Submission(spool=spool, content_type=media, **_options_and_metadata(query, from_text=True))
    elif not media:
        raise Problem(415, "no_content_type", "say what the body is: Content-Type multipart/form-data, "
                                              "application/json or audio/*")
    else:
        raise Problem(415, "not_audio", f"Content-Type {media} is not audio: send audio/*, multipart/form-data "
                                        "with an audio file, or application/json")
    if submission.spool is not None:
        if submission.spool.size == 0:
            submission.discard()
            raise Problem(400, "empty_audio", "the audio is empty")
        submission.sha256 = submission.spool.close()
    return submission


async def _capped(body: AsyncIterator[bytes], max_body: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in body:
        received += len(chunk)
        if received > max_body:
            raise Problem(413, "too_large", f"the body is over the {max_body}-byte cap")
        yield chunk


async def _json(body: AsyncIterator[bytes], new_spool: Any) -> Submission:
    raw = bytearray()
    async for chunk in body:
        raw += chunk
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise Problem(400, "malformed", f"the body is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise Problem(400, "malformed", "the JSON body must be an object")
    unknown = set(document) - {"audio", "uri", "content_type", *OPTION_FIELDS, *METADATA_FIELDS}
    if "tenant" in unknown:
        raise Problem(400, "malformed", "the tenant comes from the API key, not from the body")
    if unknown:
        raise Problem(400, "malformed", f"unknown field(s): {', '.join(sorted(unknown))}")
    options = _options_and_metadata(document, from_text=False)
    audio, uri = document.get("audio"), document.get("uri")
    if (audio is None) == (uri is None):
        raise Problem(400, "malformed", "give exactly one of 'audio' (base64) and 'uri'")
    if uri is not None:
        if not isinstance(uri, str):
            raise Problem(400, "malformed", "'uri' must be a string")
        return Submission(uri=uri, **options)
    if not isinstance(audio, str):
        raise Problem(400, "malformed", "'audio' must be a base64 string")
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, "malformed", "'audio' is not valid base64") from None
    content_type = document.get("content_type")
    if content_type is not None and (not isinstance(content_type, str) or not is_audio_type(content_type)):
        raise Problem(415, "not_audio", f"content_type {content_type!r} is not audio")
    spool = new_spool()
    try:
        spool.write(data)
    except BaseException:
        spool.discard()
        raise
    return Submission(spool=spool, content_type=content_type, **options)


async def _multipart(content_type: str, body: AsyncIterator[bytes], new_spool: Any) -> Submission:
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "malformed", "multipart/form-data without a boundary")
    form = _Form(new_spool)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in body:
            parser.write(chunk)
            form.raise_pending()
        parser.finalize()
        form.raise_pending()
    except Problem:
        form.discard()
        raise
    except TooLarge:
        form.discard()
        raise
    except Exception as error:  # the parser's own errors: a broken body
        form.discard()
        raise Problem(400, "malformed", f"the multipart body is malformed ({error})") from None
    if form.spool is None:
        raise Problem(400, "malformed", f"no audio part: send the file as one of the parts {', '.join(AUDIO_PARTS)}")
    if "tenant" in form.fields:
        form.discard()
        raise Problem(400, "malformed", "the tenant comes from the API key, not from the body")
    unknown = set(form.fields) - {*OPTION_FIELDS, *METADATA_FIELDS}
    if unknown:
        form.discard()
        raise Problem(400, "malformed", f"unknown field(s): {', '.join(sorted(unknown))}")
    try:
        options = _options_and_metadata(form.fields, from_text=True)
    except Problem:
        form.discard()
        raise
    return Submission(spool=form.spool, content_type=form.audio_type, **options)


class _Form:
    """python-multipart callbacks: the audio part goes to a spool, small fields are collected."""

    def __init__(self, new_spool: Any) -> None:
        self._new_spool = new_spool
        self.spool: Spool | None = None
        self.audio_type: str | None = None
        self.fields: dict[str, str] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._name = ""
        self._value = bytearray()
        self._in_audio = False
        self._pending: BaseException | None = None

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def raise_pending(self) -> None:
        """Errors found inside a callback surface here (the parser would swallow or wrap them)."""
        if self._pending is not None:
            raise self._pending

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()

    def _part_begin(self) -> None:
        self._headers, self._value, self._in_audio = {}, bytearray(), False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in params
        if self._name not in AUDIO_PARTS and not is_file:
            return
        if self.spool is not None:
            self._fail(Problem(400, "malformed", "more than one audio part"))
            return
        part_type = self._headers.get("content-type", "application/octet-stream")
        if not is_audio_type(part_type):
            self._fail(Problem(415, "not_audio", f"the file part is {part_type.split(';')[0]}, not audio"))
            return
        self.audio_type = part_type.split(";")[0].strip().lower()
        self.spool = self._new_spool()
        self._in_audio = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._pending is not None:
            return
        if self._in_audio:
            try:
                self.spool.write(data[start:end])  # type: ignore[union-attr]
            except TooLarge as error:
                self._fail(error)
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            self._fail(Problem(400, "malformed", f"form field {self._name!r} is over {MAX_FIELD_BYTES} bytes"))

    def _part_end(self) -> None:
        if not self._in_audio and self._pending is None and self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def _fail(self, error: BaseException) -> None:
        self._pending = self._pending or error


def _options_and_metadata(values: Mapping[str, Any], *, from_text: bool) -> dict[str, Any]:
    """granularity, extract_embedding and metadata from a JSON object (typed) or text fields (forms, query)."""
    granularity = values.get("granularity") or "utterance"
    if granularity not in GRANULARITIES:
        raise Problem(400, "malformed", f"granularity must be one of {', '.join(GRANULARITIES)}")
    embedding = values.get("extract_embedding", False)
    if from_text and isinstance(embedding, str):
        lowered = embedding.strip().lower()
        if lowered not in ("true", "false", "1", "0", ""):
            raise Problem(400, "malformed", "extract_embedding must be true or false")
        embedding = lowered in ("true", "1")
    if not isinstance(embedding, bool):
        raise Problem(400, "malformed", "extract_embedding must be true or false")
    metadata: dict[str, Any] = {name: values[name] for name in ("source", "channel", "call_id")
                                if values.get(name) not in (None, "")}
    attributes = values.get("attributes")
    if from_text and isinstance(attributes, str) and attributes:
        try:
            attributes = json.loads(attributes)
        except ValueError:
            raise Problem(400, "malformed", "attributes must be a JSON object of strings") from None
    if attributes:
        metadata["attributes"] = attributes
    return {"granularity": granularity, "extract_embedding": embedding, "metadata": metadata}
