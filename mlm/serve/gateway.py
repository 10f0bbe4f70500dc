"""The ASGI layer in front of LitServe's routes: upload limit, JSON or multipart to checked JSON, errors, metrics.

Every ``POST /v1/*`` body is read here (refused with 413 past ``--max-upload-mb``), parsed as JSON or as a multipart
form and checked field by field (:mod:`mlm.serve.requests`); a bad request gets a 4xx JSON error naming the field
and never reaches a worker, so it cannot fail the other requests of a batch. A good one goes on as the checked JSON.
Prometheus metrics count requests by endpoint and status and time them; the batch size each response reports
(``batch_size``) feeds a histogram per endpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlm.serve.requests import CHECKS, BadRequest, check_request

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_RESPONSE_PEEK = 1 << 16  # bytes of a response read for its batch_size (embeddings of a big request are not)


class Metrics:
    """Request counts, latencies and batch sizes in one registry, rendered in Prometheus' text format."""

    def __init__(self):
        disable_created_metrics()  # no *_created series: they only add noise to the text format
        self.registry = CollectorRegistry()
        self.requests = Counter("mlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("mlm_request_latency_seconds", "time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.batch = Histogram("mlm_batch_size", "requests the model ran together", ["endpoint"],
                               buckets=BATCH_BUCKETS, registry=self.registry)  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _reply(send, status: int, content: dict | bytes, content_type: str = "application/json") -> None:
    body = content if isinstance(content, bytes) else json.dumps(content).encode()
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app, max_upload_bytes: int, metrics: Metrics, paths: set[str] | None = None):
        self.app, self.max_upload_bytes, self.metrics = app, max_upload_bytes, metrics
        self.paths = set(CHECKS) if paths is None else paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start = scope["path"], time.perf_counter()
        endpoint = path if path in self.paths or path in ("/health", "/metrics") else "other"
        if path == "/metrics" and scope["method"] == "GET":
            body, content_type = self.metrics.render()
            await _reply(send, 200, body, content_type)
            return self._count(endpoint, 200, start)
        seen = {"status": 500, "peek": b""}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and len(seen["peek"]) < MAX_RESPONSE_PEEK:
                seen["peek"] += message.get("body", b"")
            await send(message)

        if path in self.paths and scope["method"] == "POST":
            try:
                checked = check_request(path, await self._payload(scope, receive))
            except BadRequest as err:
                await _reply(send, err.status, err.body())
                return self._count(endpoint, err.status, start)
            body = json.dumps(checked).encode()
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            scope = {**scope, "headers": headers}
            receive = _replay(body)
        await self.app(scope, receive, watch)
        self._count(endpoint, seen["status"], start)
        if seen["status"] == 200 and endpoint in self.paths:
            try:
                self.metrics.batch.labels(endpoint).observe(json.loads(seen["peek"])["batch_size"])
            except (ValueError, KeyError, TypeError):
                pass  # a response too large to peek at, or without a batch size

    def _count(self, endpoint: str, status: int, start: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _payload(self, scope, receive) -> dict:
        """The request body as a dict: JSON, or a multipart/urlencoded form (file parts become bytes)."""
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise BadRequest("body", f"{int(declared):,} bytes; the upload limit is {self.max_upload_bytes:,}", 413)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_upload_bytes:
                raise BadRequest("body", f"more than {self.max_upload_bytes:,} bytes; that is the upload limit", 413)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return await self._form(scope, body)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            reason = "not valid JSON (send JSON, or a multipart form with the image as a file)"
            raise BadRequest("body", reason, 400) from None

    async def _form(self, scope, body: bytes) -> dict:
        from starlette.requests import Request

        try:
            form = await Request(scope, _replay(body)).form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
        except Exception as err:  # noqa: BLE001 - the multipart parser raises several types on a broken form
            raise BadRequest("body", f"not a readable form ({type(err).__name__})", 400) from None
        out: dict = {}
        for key, value in form.multi_items():
            value = await value.read() if hasattr(value, "read") else value
            if key in out:  # a repeated field (images=..., images=...) is a list
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
            else:
                out[key] = [value] if key in ("images", "texts") else value
        return out


MAX_FORM_PARTS = 130  # two lists of 64 items and a few settings
