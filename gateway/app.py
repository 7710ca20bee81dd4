"""The HTTP routes of `emofleet serve` (FastAPI): analyze, results, results by call, health, metrics.

``POST /v1/analyze`` in order, each step refusing fast: API key (401/403) -> rate limit (429) -> pipeline
saturated or this replica's waiting room full (503) -> body (400/413/415) -> the processors' cache (200,
``cache_hit``, no Kafka) -> a pending record, the upload published, the reference produced (acks=all: the request
is now accepted and will land) -> ``Prefer: respond-async``: 202; else wait up to ``sync_wait_seconds`` (or
``Prefer: wait=N``) for the result: 200, 422 (the dead letter's reason), or 504 with ``Location``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from emofleet.core.config import Settings
from emofleet.core.logs import log_context
from emofleet.gateway.answers import DONE, FAILED, PENDING, answer_from_events, problem_of
from emofleet.gateway.auth import ApiKeys, Caller, RateLimiter, presented_key
from emofleet.gateway.intake import Problem, Submission, read_submission
from emofleet.gateway.metrics import GatewayMetrics
from emofleet.gateway.uploads import Spool, TooLarge

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_CALL_RESULTS = 1000

ANALYZE_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["audio"], "properties": {
        "audio": {"type": "string", "format": "binary"},
        "granularity": {"type": "string", "enum": ["utterance", "frame"]},
        "extract_embedding": {"type": "boolean"}, "source": {"type": "string"}, "channel": {"type": "string"},
        "call_id": {"type": "string"}, "attributes": {"type": "string", "description": "JSON object of strings"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "audio": {"type": "string", "format": "byte", "description": "base64 audio (or give uri)"},
        "uri": {"type": "string", "description": "https:// (or another allowed scheme) to fetch the audio from"},
        "granularity": {"type": "string", "enum": ["utterance", "frame"]}, "extract_embedding": {"type": "boolean"},
        "source": {"type": "string"}, "channel": {"type": "string"}, "call_id": {"type": "string"},
        "attributes": {"type": "object", "additionalProperties": {"type": "string"}}}}},
    "audio/*": {"schema": {"type": "string", "format": "binary"}}}}


@dataclass
class Parts:
    """Everything a running gateway holds; built by server.py, closed when the app stops."""

    settings: Settings
    keys: ApiKeys
    limiter: RateLimiter
    waiters: Any  # waiters.Waiters
    records: Any  # results.Records
    stored: Any  # results.StoredResults
    cache: Any  # cache.CachedAnswers
    uploads: Any  # uploads.LocalUploads | S3Uploads
    sender: Any  # sender.ReferenceSender
    lag: Any  # pressure.PipelineLag
    reader: Any  # reader.ResultsReader
    metrics: GatewayMetrics
    start: Callable[[], None]
    stop: Callable[[], Awaitable[None]]


def create_app(build: Callable[[], Parts]) -> FastAPI:
    """The app; ``build`` makes its parts when it starts (so importing this module starts nothing)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts = await run_in_threadpool(build)
        app.state.parts = parts
        parts.start()
        sweeper = asyncio.create_task(_sweep_uploads(parts))
        try:
            yield
        finally:
            sweeper.cancel()
            await parts.stop()

    app = FastAPI(title="emofleet", version="1", lifespan=lifespan,
                  description="Speech emotion recognition over the emofleet pipeline: POST a clip, get its nine "
                              "emotion scores. Authenticate with `Authorization: Bearer <API key>`.")
    app.add_middleware(Observe)  # type: ignore[arg-type]

    @app.exception_handler(Problem)
    async def problem(_request: Request, error: Problem) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.post("/v1/analyze", openapi_extra={"requestBody": ANALYZE_BODY}, responses={
        202: {"description": "accepted (Prefer: respond-async); poll Location"},
        400: {"description": "malformed"}, 401: {"description": "no API key"}, 403: {"description": "unknown key"},
        413: {"description": "over the size cap"}, 415: {"description": "not audio"},
        422: {"description": "the pipeline rejected the audio (reason)"}, 429: {"description": "rate limited"},
        503: {"description": "saturated, retry later"}, 504: {"description": "result late; poll Location"}})
    async def analyze(request: Request) -> Response:
        """Analyze one clip: multipart upload, raw audio/* body, or JSON with base64 `audio` or a `uri`."""
        return await _analyze(request, request.app.state.parts)

    @app.get("/v1/results/{result_id}")
    async def result(result_id: str, request: Request) -> Response:
        """The answer of an accepted request: 200, 422 (rejected), 202 (still pending) or 404."""
        return await _result(result_id, request, request.app.state.parts)

    @app.get("/v1/calls/{call_id}/results")
    async def call_results(call_id: str, request: Request, limit: int = 100) -> Response:
        """Whole-clip results of one call of the caller's tenant, oldest first (from ClickHouse)."""
        parts: Parts = request.app.state.parts
        caller = _authenticate(request, parts)
        rows = await run_in_threadpool(parts.stored.by_call, caller.tenant, call_id, max(1, min(limit, MAX_CALL_RESULTS)))
        if rows is None:
            raise _unavailable(parts, "the results store is not reachable (is the sink running?)")
        return JSONResponse({"call_id": call_id, "results": rows})

    page = (Path(__file__).parent / "page.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def home() -> Response:
        """A page to drop or record a clip and see its nine emotion bars (plain HTML + JS, same origin)."""
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "media-src 'self' blob:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> Response:
        reader = request.app.state.parts.reader
        alive = reader.alive
        return JSONResponse({"alive": alive, "results_reader": alive}, status_code=200 if alive else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        parts: Parts = request.app.state.parts
        checks = {"results_reader": parts.reader.ready.is_set(), "redis": await parts.records.ping()}
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body, content_type = request.app.state.parts.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    return app


# ---------------------------------------------------------------------------------------------- analyze


async def _analyze(request: Request, parts: Parts) -> Response:
    received = time.monotonic()
    caller = _authenticate(request, parts)
    await _admit(caller, parts)
    settings = parts.settings
    cap = min(settings.gateway.max_body_bytes, settings.audio.max_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.gateway.max_body_bytes:
        raise Problem(413, "too_large", f"the body is over the {settings.gateway.max_body_bytes}-byte cap")
    try:
        submission = await read_submission(request.headers.get("content-type", ""), request.stream(),
                                           request.query_params, lambda: Spool(parts.uploads.spool_dir, cap),
                                           settings.gateway.max_body_bytes)
    except TooLarge as error:
        raise Problem(413, "too_large", str(error)) from None
    try:
        return await _accept(request, parts, caller, submission, received)
    finally:
        submission.discard()  # published spools were moved away; anything left is ours to delete


async def _accept(request: Request, parts: Parts, caller: Caller, submission: Submission, received: float) -> Response:
    from emofleet.streams.references import InvalidReference, make_reference, message_key

    settings = parts.settings
    _check_options(submission, settings)
    result_id = uuid.uuid4().hex
    request.state.result_id = result_id  # the access log line carries it as audio_id
    request_id = request.state.request_id
    uri = submission.uri if submission.uri is not None else parts.uploads.uri_for(result_id)
    if submission.uri is not None:
        _check_uri(submission.uri, settings)
    metadata = dict(submission.metadata)
    attributes = metadata.pop("attributes", {})
    if not isinstance(attributes, dict):
        raise Problem(400, "malformed", "attributes must be an object of strings")
    try:
        reference = make_reference({"uri": uri, "audio_id": result_id, "tenant": caller.tenant,
                                    "content_type": submission.content_type, **metadata,
                                    "attributes": {**attributes, "request_id": request_id}})
    except InvalidReference as error:
        raise Problem(400, "malformed", str(error)) from None
    with log_context(audio_id=result_id):
        if submission.spool is not None:
            events = await run_in_threadpool(parts.cache.events, reference, submission.sha256)
            parts.metrics.cache_answers.labels("hit" if events else "miss").inc()
            if events:
                answer = answer_from_events(result_id, events, granularity=submission.granularity,
                                            extract_embedding=submission.extract_embedding)
                await parts.records.store(caller.tenant, answer)
                return _answer(answer, received)
        return await _enqueue(request, parts, caller, submission, reference, message_key(reference), received)


async def _enqueue(request: Request, parts: Parts, caller: Caller, submission: Submission, reference: dict[str, Any],
                   key: bytes, received: float) -> Response:
    from emofleet.gateway.sender import DeliveryFailed
    from emofleet.gateway.waiters import Full, Waiter

    settings = parts.settings.gateway
    result_id = reference["audio_id"]
    loop = asyncio.get_running_loop()
    waiter = Waiter(result_id, key, caller.tenant, submission.granularity, submission.extract_embedding,
                    expires=time.monotonic() + settings.async_wait_seconds, loop=loop, future=loop.create_future())
    try:
        parts.waiters.add(waiter)
    except Full as error:
        raise _unavailable(parts, str(error), reason="busy") from None
    try:
        await parts.records.pending(result_id, caller.tenant, reference.get("call_id"))
        if submission.spool is not None:
            await run_in_threadpool(parts.uploads.publish, submission.spool, result_id)
        await parts.sender.send(reference)
    except (DeliveryFailed, OSError, ConnectionError) as error:
        parts.waiters.remove(result_id)
        log.warning("could not accept %s: %s", result_id, error)
        raise _unavailable(parts, f"the pipeline did not take the request ({type(error).__name__})") from None
    location = f"/v1/results/{result_id}"
    if "respond-async" in request.headers.get("prefer", ""):
        return JSONResponse({"id": result_id, "status": PENDING}, status_code=202, headers={"Location": location})
    try:
        record = await asyncio.wait_for(asyncio.shield(waiter.future), _wait_seconds(request, settings.sync_wait_seconds))
    except TimeoutError:
        return JSONResponse({"id": result_id, "status": PENDING, "detail": "the result is late; poll Location"},
                            status_code=504, headers={"Location": location, "Retry-After": "1"})
    if record["status"] == FAILED:
        raise problem_of(record)
    return _answer(record, received)


def _answer(answer: dict[str, Any], received: float) -> JSONResponse:
    timings = {**answer.get("timings", {}), "total_ms": round((time.monotonic() - received) * 1000, 1)}
    return JSONResponse({**answer, "timings": timings})


def _wait_seconds(request: Request, default: float) -> float:
    """``Prefer: wait=N`` (RFC 7240) shortens the synchronous wait."""
    match = re.search(r"\bwait=(\d+)", request.headers.get("prefer", ""))
    return min(default, float(match.group(1))) if match else default


def _check_options(submission: Submission, settings: Settings) -> None:
    """Options the fleet computes (EMOFLEET_MODEL_GRANULARITY / _EMBEDDINGS); less is served by leaving out."""
    if submission.granularity == "frame" and settings.model.granularity != "frame":
        raise Problem(422, "option_unavailable", "this fleet scores utterances only "
                                                 "(EMOFLEET_MODEL_GRANULARITY=utterance): ask for granularity=utterance")
    if submission.extract_embedding and not settings.model.embeddings:
        raise Problem(422, "option_unavailable", "this fleet computes no embeddings (EMOFLEET_MODEL_EMBEDDINGS=off)")


def _check_uri(uri: str, settings: Settings) -> None:
    from emofleet.processors.fetch import host_allowed
    from emofleet.streams.references import InvalidReference, validate_uri

    try:
        validate_uri(uri)
    except InvalidReference as error:
        raise Problem(400, "malformed", str(error)) from None
    parts = urlsplit(uri)
    if parts.scheme not in settings.gateway.uri_schemes or parts.scheme not in settings.audio.allowed_schemes:
        raise Problem(400, "uri_not_allowed", f"{parts.scheme}:// URIs are not accepted here (allowed: "
                                              f"{', '.join(settings.gateway.uri_schemes) or 'none'})")
    if parts.scheme in ("http", "https") and not host_allowed(parts.hostname or "", settings.audio.http_hosts):
        raise Problem(400, "uri_not_allowed", f"host {parts.hostname} is not in EMOFLEET_AUDIO_HTTP_HOSTS")


def _authenticate(request: Request, parts: Parts) -> Caller:
    key = presented_key(request.headers)
    if key is None:
        raise Problem(401, "no_api_key", "send an API key: Authorization: Bearer <key>",
                      headers={"WWW-Authenticate": "Bearer"})
    caller = parts.keys.caller(key)
    if caller is None:
        raise Problem(403, "unknown_api_key", "this API key is not valid")
    return caller


async def _admit(caller: Caller, parts: Parts) -> None:
    wait = await parts.limiter.acquire(caller)
    if wait is not None:
        parts.metrics.rejections.labels("rate_limited").inc()
        raise Problem(429, "rate_limited", f"over {parts.settings.gateway.rate_per_second:g} requests/s for this key",
                      headers={"Retry-After": str(int(wait))})
    lag, wait = parts.lag.lag, parts.lag.expected_wait()
    if lag is not None and lag > parts.settings.gateway.max_lag_messages:
        raise _unavailable(parts, f"the pipeline is saturated ({lag} references waiting)", reason="saturated")
    if wait is not None and wait > parts.settings.gateway.max_queue_seconds:
        raise _unavailable(parts, f"the pipeline is saturated (about {wait:.0f} s of work waiting)",
                           reason="saturated")


def _unavailable(parts: Parts, detail: str, reason: str = "unavailable") -> Problem:
    parts.metrics.rejections.labels(reason).inc()
    return Problem(503, reason, detail, headers={"Retry-After": str(parts.settings.gateway.retry_after_seconds)})


# ---------------------------------------------------------------------------------------------- results


async def _result(result_id: str, request: Request, parts: Parts) -> Response:
    from emofleet.sinks.query_server import QueryError

    caller = _authenticate(request, parts)
    if not RESULT_ID.match(result_id):
        raise Problem(404, "not_found", "no such result")
    record = await parts.records.get(result_id, caller.tenant)
    if record is None or record["status"] == PENDING:
        try:
            stored = await run_in_threadpool(parts.stored.answer, result_id, caller.tenant,
                                             owner_known=record is not None)
        except QueryError as error:
            log.warning("results store query failed: %s", error)
            stored = None
        if stored is not None:
            await parts.records.store(caller.tenant, stored)
            record = stored
    if record is None:
        raise Problem(404, "not_found", "no such result for this API key's tenant")
    if record["status"] == PENDING:
        return JSONResponse({"id": result_id, "status": PENDING}, status_code=202,
                            headers={"Location": f"/v1/results/{result_id}", "Retry-After": "1"})
    if record["status"] == FAILED:
        raise problem_of(record)
    assert record["status"] == DONE
    return JSONResponse({k: v for k, v in record.items() if k != "tenant" or v == caller.tenant})


async def _sweep_uploads(parts: Parts) -> None:
    interval = max(1.0, min(60.0, parts.settings.gateway.upload_retention_seconds / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await run_in_threadpool(parts.uploads.sweep)
        except OSError as error:
            log.warning("upload sweep failed: %s", error)
            continue
        if removed:
            log.info("swept %d upload(s) older than %ds", removed, parts.settings.gateway.upload_retention_seconds)


# ---------------------------------------------------------------------------------------------- middleware


class Observe:
    """Pure ASGI middleware: request id (X-Request-ID in and out), in-flight gauge, count and duration by route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        metrics: GatewayMetrics | None = getattr(getattr(scope.get("app"), "state", None), "parts", None) and \
            scope["app"].state.parts.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            if metrics is not None:
                metrics.in_flight.dec()
                metrics.requests.labels(route, str(status)).inc()
                metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
            if route != "/metrics" and not route.endswith("z"):
                log.info("%s %s %d %.1fms", scope["method"], route, status, (time.perf_counter() - started) * 1000,
                         extra={"audio_id": scope["state"].get("result_id"), "request_id": request_id})
