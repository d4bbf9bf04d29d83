"""`banklora serve`: an OpenAI-compatible HTTP API over the continuous-batching engine, and the web chat.

Endpoints: GET / (the web chat page), GET /health (public), GET /v1/models, POST
/v1/chat/completions, POST /v1/completions (both streamable as server-sent events, as OpenAI
frames them), GET /metrics (Prometheus). With an API key, everything but / and /health needs
`Authorization: Bearer KEY` (compared in constant time). Every error is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from banklora.config import CHAT_REPETITION_PENALTY, GenerationSettings
from banklora.data.format import encode_conversation
from banklora.inference.engine import Engine, Event, QueueFull, Request, SamplingParams, StepInfo
from banklora.serve.schemas import (ERRORS, ApiError, ChatAnswer, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
                                    CompletionChoice, CompletionRequest, ModelCard, ModelList, Usage)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = GenerationSettings().max_new_tokens  # the same default answer length as chat
RETRY_AFTER_S = 1
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models", "/metrics": "metrics"}
DISCONNECT_POLL_S = 0.25  # the longest an unstreamed answer waits before checking that its client is still there


@dataclass
class Served:
    """What the server answers for: the base's name, the adapters' names (the studio adds the
    adapters it trains while the server runs), the context length."""

    base: str
    adapters: tuple[str, ...]
    context: int  # prompt + answer tokens, at most
    created: int

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None for the base); 404 for an unknown name."""
        if model == self.base:
            return None
        if model in self.adapters:
            return model
        known = ", ".join([self.base, *self.adapters])
        raise ApiError(404, f"the model {model!r} does not exist; this server has: {known}", param="model", code="model_not_found")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("banklora_requests", "Requests answered, by endpoint, model and HTTP status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("banklora_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=self.registry)
        self.completion_tokens = Counter("banklora_completion_tokens", "Generated tokens", ["model"], registry=self.registry)
        self.waiting = Gauge("banklora_queue_waiting", "Requests waiting to join the batch", registry=self.registry)
        self.running = Gauge("banklora_batch_running", "Requests being decoded in the running batch", registry=self.registry)
        self.latency = Histogram("banklora_request_latency_seconds", "Time from arrival to the last token", ["endpoint"],
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160), registry=self.registry)
        self.ttft = Histogram("banklora_time_to_first_token_seconds", "Time from arrival to the first token", ["endpoint"],
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40), registry=self.registry)

        self.step_rows = Histogram("banklora_step_rows", "Rows in one forward pass of the worker, by kind (prefill, decode)", ["kind"],
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.step_seconds = Histogram("banklora_step_seconds", "Duration of one forward pass of the worker, by kind", ["kind"],
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=self.registry)

    def on_step(self, step: StepInfo) -> None:
        self.waiting.set(step.waiting)
        self.running.set(step.running)
        if step.rows:  # not a step that found only cancelled requests
            self.step_rows.labels(step.kind).observe(step.rows)
            self.step_seconds.labels(step.kind).observe(step.seconds)


def _page() -> str:
    return resources.files("banklora.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _param(loc) -> str | None:
    """pydantic's location ('body', 'messages', 0, 'role') as OpenAI's param ('messages[0].role')."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Answer:
    """One request in flight: the engine's events, delivered on the event loop."""

    def __init__(self, engine: Engine, prompt: list[int], adapter: str | None, params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # runs in the engine's thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down)
                self.request.cancel()

        self.request = Request(prompt, adapter, params, sink)
        try:
            engine.submit(self.request)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry in {RETRY_AFTER_S} s", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc


def create_app(engine: Engine, tokenizer, served: Served, *, api_key: str | None = None, metrics: Metrics | None = None,
               services: tuple = ()) -> FastAPI:
    """The FastAPI app; it starts the engine's worker when it starts and stops it when it stops,
    and the same for each of `services` (objects with start() and shutdown(): the studio's jobs).
    app.state.authorize is the key check, for routes added to the app later (the studio's)."""
    metrics = metrics or Metrics()
    engine.on_step = metrics.on_step

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        for service in services:
            service.start()
        yield
        for service in reversed(services):
            service.shutdown()
        engine.shutdown()

    # docs_url / redoc_url off: FastAPI's pages load their scripts from a CDN, blank on the offline machines banks run;
    # the schema itself is at /openapi.json (docs/chat-and-serving.md)
    app = FastAPI(title="banklora", version="1", lifespan=lifespan, summary="OpenAI-compatible API for Gemma with banking LoRA adapters",
                  docs_url=None, redoc_url=None)
    app.state.engine, app.state.served, app.state.metrics = engine, served, metrics

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        # headers arrive as latin-1 text (HTTP's rule): back to the client's bytes, compared with the key's UTF-8 bytes
        if not hmac.compare_digest(token.encode("latin-1", "replace"), api_key.encode("utf-8")):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def refused(request: HttpRequest, exc: ApiError) -> JSONResponse:
        """An error answer, counted in /metrics like an answered request (the model label only
        for a model this server has: a label per unknown name would let clients grow the series)."""
        endpoint = ENDPOINTS.get(request.url.path, "other")
        model = getattr(getattr(request.state, "body", None), "model", None)
        known = model if model in (served.base, *served.adapters) else "-"
        metrics.requests.labels(endpoint, known, str(exc.status)).inc()
        return _error(exc)

    app.state.authorize = authorize

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return refused(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return refused(request, ApiError(400, f"the request body is not valid JSON: {first.get('msg')}"))
        param = _param(first.get("loc", ()))
        return refused(request, ApiError(400, f"{param or 'request'}: {first.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return refused(request, ApiError(exc.status_code, str(exc.detail), code=None if exc.status_code != 404 else "not_found"))

    @app.exception_handler(Exception)
    async def failure(request, exc: Exception):
        log.exception("request failed")
        return refused(request, ApiError(500, f"the server failed: {type(exc).__name__}", type="server_error"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return _page()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": [served.base, *served.adapters], "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics", dependencies=[Depends(authorize)], responses={401: ERRORS[401]}, include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorize)], responses={401: ERRORS[401]})
    async def models() -> ModelList:
        cards = [ModelCard(id=served.base, created=served.created, root=served.base)]
        cards += [ModelCard(id=name, created=served.created, root=name, parent=served.base) for name in served.adapters]
        return ModelList(data=cards)

    def budget(prompt: list[int], limit: int | None, param: str) -> int:
        room = served.context - len(prompt)
        tokens = limit if limit is not None else min(DEFAULT_MAX_TOKENS, room)
        if tokens < 1 or len(prompt) + tokens > served.context:
            raise ApiError(400, f"this model's context is {served.context} tokens, but the request needs {len(prompt) + max(tokens, 1)}: "
                                f"{len(prompt)} in the {param} and {max(tokens, 1)} for the answer; shorten the {param} or lower max_tokens",
                           param=param, code="context_length_exceeded")
        return tokens

    def sampling(req, tokens: int) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=tokens, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                              stop=req.stops(), seed=req.seed,
                              frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
                              presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
                              repetition_penalty=CHAT_REPETITION_PENALTY if req.repetition_penalty is None else req.repetition_penalty)

    async def answer(http: HttpRequest, endpoint: str, req, prompt: list[int], chunk, final):
        """Run one request: a JSON answer, or a stream of chunks ending with [DONE]."""
        arrived = time.perf_counter()
        adapter = served.adapter_for(req.model)
        running = _Answer(engine, prompt, adapter, sampling(req, budget(prompt, req.limit(), "messages" if endpoint == "chat" else "prompt")))
        rid, created = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def usage(event: Event) -> Usage:
            return Usage(prompt_tokens=len(prompt), completion_tokens=event.completion_tokens, total_tokens=len(prompt) + event.completion_tokens)

        def finished(event: Event, status: int) -> None:
            metrics.requests.labels(endpoint, req.model, str(status)).inc()
            metrics.prompt_tokens.labels(req.model).inc(len(prompt))
            metrics.completion_tokens.labels(req.model).inc(event.completion_tokens)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - arrived)

        if not req.stream:
            text, first = "", True
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(running.events.get(), timeout=DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        event = None
                    if await http.is_disconnected():  # after every token too: a fast decode never leaves the queue idle
                        metrics.requests.labels(endpoint, req.model, "499").inc()
                        return Response(status_code=499)  # nobody is listening; the slot is freed below
                    if event is None:
                        continue
                    if first:
                        metrics.ttft.labels(endpoint).observe(time.perf_counter() - arrived)
                        first = False
                    if event.error:  # counted in /metrics by the error handler
                        raise ApiError(500, event.error, type="server_error")
                    text += event.text
                    if event.finish_reason:
                        finished(event, 200)
                        return final(rid, created, text, event, usage(event))
            finally:
                running.request.cancel()  # a no-op once it has finished; frees the slot otherwise

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            first = True
            try:
                if endpoint == "chat":
                    yield _sse(chunk(rid, created, None, None, opening=True))  # the role first, as OpenAI streams it
                while True:
                    event = await running.events.get()
                    if first:
                        metrics.ttft.labels(endpoint).observe(time.perf_counter() - arrived)
                        first = False
                    if event.error:
                        metrics.requests.labels(endpoint, req.model, "500").inc()
                        yield _sse(ApiError(500, event.error, type="server_error").body())
                        break
                    if event.text:
                        yield _sse(chunk(rid, created, event.text, None))
                    if event.finish_reason:
                        yield _sse(chunk(rid, created, None, event.finish_reason))
                        if include_usage:
                            yield _sse({"id": rid, "object": chunk_object, "created": created, "model": req.model, "choices": [],
                                        "usage": usage(event).model_dump()})
                        finished(event, 200)
                        break
                yield _sse("[DONE]")
            finally:
                running.request.cancel()  # the client went away, or the answer is complete

        chunk_object = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(authorize)],
              responses={k: ERRORS[k] for k in (400, 401, 404, 429, 500)})
    async def chat_completions(req: ChatCompletionRequest, http: HttpRequest):
        http.state.body = req
        req.check()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")} for i, m in enumerate(req.messages)]
        try:
            prompt = encode_conversation(tokenizer, messages, add_generation_prompt=True).input_ids
        except ValueError as exc:  # the one formatter's rules: system first, then user/assistant turns, ending with user
            raise ApiError(400, f"messages: {exc}", param="messages") from exc

        def chunk(rid, created, text, finish, opening=False):
            delta = {"role": "assistant", "content": ""} if opening else ({"content": text} if text is not None else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def final(rid, created, text, event, usage):
            return ChatCompletion(id=rid, created=created, model=req.model, usage=usage,
                                  choices=[ChatChoice(message=ChatAnswer(content=text), finish_reason=event.finish_reason)])

        return await answer(http, "chat", req, prompt, chunk, final)

    @app.post("/v1/completions", response_model=Completion, dependencies=[Depends(authorize)],
              responses={k: ERRORS[k] for k in (400, 401, 404, 429, 500)})
    async def completions(req: CompletionRequest, http: HttpRequest):
        http.state.body = req
        req.check()
        prompt = tokenizer(req.text())["input_ids"]

        def chunk(rid, created, text, finish, opening=False):
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        def final(rid, created, text, event, usage):
            return Completion(id=rid, created=created, model=req.model, usage=usage,
                              choices=[CompletionChoice(text=text, finish_reason=event.finish_reason)])

        return await answer(http, "completions", req, prompt, chunk, final)

    def openapi() -> dict:
        """FastAPI's schema, saying what the server really answers: 400 (not 422) for a bad body, and
        text/event-stream beside JSON when `stream` is true."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("/v1/chat/completions", "/v1/completions"):
                ok = schema["paths"][name]["post"]["responses"]["200"]["content"]
                ok["text/event-stream"] = {"schema": {"type": "string", "description": "server-sent events: data: {chunk}, ending with data: [DONE]"}}
            schema["components"]["schemas"].pop("HTTPValidationError", None)
            schema["components"]["schemas"].pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
