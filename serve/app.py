"""The FastAPI application: OpenAI's completions, chat and models endpoints over the catalog's
compositions, ``/health``, the read-only catalog page at ``/`` and its JSON under ``/atmoe``.

A request is checked in full before any row is queued (model, force, lengths, limits); its rows go
to the model's batching worker, whose events come back through an ``asyncio.Queue``. Streaming
answers are server-sent events; a client that goes away cancels its rows, which leave the batch at
the worker's next step. Every answer carries ``atmoe: {routing, lineage}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atmoe.errors import AtmoeError, RoutingError
from atmoe.report import summarize
from atmoe.serve import catalog
from atmoe.serve.config import ServeConfig
from atmoe.serve.engine import Done, Event, Failed, Job, Routed, Text
from atmoe.serve.errors import ERROR_RESPONSES, ApiError, force_error, model_error
from atmoe.serve.pool import ModelPool, Served
from atmoe.serve.protocol import ChatCompletion, ChatRequest, Completion, CompletionRequest, ModelList
from atmoe.serve.sampling import RowSampler

log = logging.getLogger("atmoe.serve")


# -- request bodies are bounded --------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes (declared or streamed) gets 413, unread."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, ApiError(400, "Content-Length is not a number"))
                return
            if int(declared) > self.limit:
                await _send_error(send, self._too_large())
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, self._too_large())

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body over {self.limit} bytes (--max-body-bytes)", code="body_too_large")


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- one request's rows ------------------------------------------------------------------------------


@dataclass
class _Rows:
    """The rows of one request and what came back for each: routing, text, finish."""

    count: int
    queue: asyncio.Queue[tuple[int, Event]]
    jobs: list[Job] = field(default_factory=list)
    routing: dict[int, list[dict] | None] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)
    finished: dict[int, Done] = field(default_factory=dict)
    failure: str | None = None

    def sink(self, row: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:  # in the event loop's thread (Job.loop)
            self.queue.put_nowait((row, event))

        return on_event

    @property
    def over(self) -> bool:
        return self.failure is not None or len(self.finished) == self.count

    def record(self, row: int, event: Event) -> None:
        if row in self.finished or self.failure is not None:
            return
        if isinstance(event, Routed):
            self.routing[row] = event.routing
        elif isinstance(event, Text):
            self.texts.setdefault(row, []).append(event.text)
        elif isinstance(event, Done):
            self.finished[row] = event
        elif isinstance(event, Failed):
            self.failure = event.message

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


@dataclass
class _Prepared:
    """A request checked and turned into rows, ready to queue."""

    served: Served
    prompts: list[list[int]]
    per_prompt: int  # n
    max_tokens: int
    force: dict[str, float] | None


def _routing_answer(rows: _Rows, prepared: _Prepared, blocks: bool) -> dict[str, Any]:
    """``atmoe``: the routing averaged over blocks (and over the prompts, if several), the lineage."""
    per_prompt = [rows.routing.get(p * prepared.per_prompt) for p in range(len(prepared.prompts))]
    answer: dict[str, Any] = {"routing": None, "lineage": prepared.served.lineage, "forced": prepared.force}
    known = [r for r in per_prompt if r]
    if known:
        mean_blocks = [
            {
                key: {name: sum(r[b][key][name] for r in known) / len(known) for name in known[0][b][key]}
                for key in ("groups", "experts")
            }
            for b in range(len(known[0]))
        ]
        answer["routing"] = summarize(mean_blocks)
        if blocks:
            answer["blocks"] = [{"block": str(b), **block} for b, block in enumerate(mean_blocks)]
        if len(known) > 1:
            answer["prompts"] = [summarize(r) for r in known]
    return answer


def _usage(rows: _Rows, prepared: _Prepared) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prepared.prompts)
    completion_tokens = sum(done.tokens for done in rows.finished.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def create_app(pool: ModelPool, config: ServeConfig) -> FastAPI:
    """The application over ``pool``; ``config`` bounds what a request may ask."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(pool.close, config.drain_seconds)  # drain: rows in flight are finished

    app = FastAPI(
        title="atmoe-registry",
        summary="Compositions of LoRA experts behind the OpenAI API, with the routing and lineage of every answer.",
        version=_version(),
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [dict(problem) for problem in error.errors()] or [{"msg": "invalid request", "loc": ()}]
        # of a union's per-branch errors, the one that is not a mere type mismatch says most
        first = next((p for p in problems if not str(p.get("type", "")).endswith("_type")), problems[0])
        where = [str(part) for part in first.get("loc", ()) if not _union_tag(part)]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        elif not where:
            message, param = f"the body must be a JSON object ({first['msg']})", None
        else:
            message = f"{'.'.join(where) + ': ' if where else ''}{first['msg']}"
            param = ".".join(where) or None
        code = "invalid_force" if param and param.startswith("atmoe.force") else None
        return JSONResponse(ApiError(400, message, param=param, code=code).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(
            ApiError(error.status_code, str(error.detail), type=kind).body(),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    guarded = [Depends(authorized)]
    errors = {k: v for k, v in ERROR_RESPONSES.items()}

    # -- service ------------------------------------------------------------------------------

    @app.get("/health", summary="Liveness and the models loaded")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": [{"key": s.key, "pinned": s.pinned, "load": s.worker.load} for s in pool.served()],
        }

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=errors)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(_model_cards, pool)}

    @app.get("/v1/models/{model_id}", dependencies=guarded, responses=errors)
    async def get_model(model_id: str) -> dict[str, Any]:
        for card in await asyncio.to_thread(_model_cards, pool):
            if card["id"] == model_id:
                return card
        try:
            key = await asyncio.to_thread(pool.resolve, model_id)
        except Exception as error:  # noqa: BLE001 - translated, or re-raised by model_error
            raise model_error(error, model_id) from None
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "atmoe", "atmoe": {"key": key}}

    @app.post("/v1/completions", response_model=Completion, dependencies=guarded, responses=errors)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        try:
            prompts = body.prompts()
        except ValueError as error:
            raise ApiError(400, str(error), param="prompt") from None
        served = await _served(pool, body.model)
        tokenizer = served.backend.tokenizer
        ids = [p if isinstance(p, list) else list(tokenizer(p)["input_ids"]) for p in prompts]
        return await _answer(request, body, _prepare(served, body, ids, body.max_tokens, config), "text_completion")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guarded, responses=errors)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served = await _served(pool, body.model)
        ids = [_chat_ids(served.backend.tokenizer, body)]
        return await _answer(request, body, _prepare(served, body, ids, body.token_limit, config), "chat.completion")

    # -- the catalog page and its data ------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(files("atmoe.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/atmoe/experts", dependencies=guarded, responses=errors, summary="Experts, searched")
    async def catalog_experts(
        q: str | None = Query(None, max_length=200),
        group: str | None = Query(None, max_length=64),
        domain: str | None = Query(None, max_length=200),
        style: str | None = Query(None, max_length=200),
        limit: int = Query(100, ge=1, le=catalog.MAX_EXPERTS),
    ) -> dict[str, Any]:
        return await _catalog(catalog.experts, pool.registry, q=q, group=group, domain=domain, style=style, limit=limit)

    @app.get("/atmoe/compositions", dependencies=guarded, responses=errors, summary="Compositions and routers")
    async def catalog_compositions() -> list[dict[str, Any]]:
        return await _catalog(catalog.compositions, pool.registry)

    @app.get("/atmoe/routers/{ref}", dependencies=guarded, responses=errors, summary="A router's lineage")
    async def catalog_router(ref: str) -> dict[str, Any]:
        return await _catalog(catalog.router_lineage, pool.registry, ref)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the models served now as the examples of ``model``."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            served = [s.key for s in pool.served()]
            for name in ("CompletionRequest", "ChatRequest"):
                properties = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in properties and served:
                    properties["model"]["examples"] = served
                for limit in ("max_tokens", "max_completion_tokens"):  # --max-tokens is this server's
                    for branch in properties.get(limit, {}).get("anyOf", []):
                        if branch.get("type") == "integer":
                            branch["maximum"] = config.max_tokens
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _union_tag(part: Any) -> bool:
    """A location part that names a union branch (``list[int]``, ``constrained-str``) or the body."""
    text = str(part)
    return text == "body" or "[" in text or "-" in text or text in ("str", "int", "float", "bool", "dict", "list")


async def _catalog(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except AtmoeError as error:
        from atmoe.errors import NotFound, UsageError

        if isinstance(error, (NotFound, UsageError)):
            raise ApiError(404, str(error), code="not_found") from None
        raise ApiError(500, str(error), type="server_error") from None


async def _served(pool: ModelPool, ref: str) -> Served:
    try:
        return await pool.get(ref)
    except Exception as error:  # noqa: BLE001 - translated, or re-raised by model_error
        raise model_error(error, ref) from None


def _model_cards(pool: ModelPool) -> list[dict[str, Any]]:
    """One card per composition version, per router alias, and per loaded key."""
    loaded = {s.key: s for s in pool.served()}
    cards: list[dict[str, Any]] = []
    seen: set[str] = set()
    registry = pool.registry
    for composition in registry.compositions():
        routers = registry.routers(composition.ref)
        created = int(composition.created_at.timestamp()) if composition.created_at else 0
        aliases = {alias: router.ref for router in routers for alias in router.aliases}
        entries = [(composition.ref, f"{composition.ref}:{routers[-1].number}" if routers else composition.ref)]
        entries += [(f"{composition.name}:{alias}", target) for alias, target in sorted(aliases.items())]
        for model_id, key in entries:
            seen.add(key)
            cards.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "atmoe",
                    "atmoe": {
                        "composition": composition.ref,
                        "key": key,
                        "routers": [{"ref": r.ref, "kind": r.kind, "aliases": list(r.aliases)} for r in routers],
                        "aliases": aliases,
                        "groups": list(composition.groups),
                        "loaded": key in loaded,
                    },
                }
            )
    for key, served in loaded.items():
        if key not in seen:
            cards.append({"id": key, "object": "model", "created": int(served.loaded_at), "owned_by": "atmoe",
                          "atmoe": {"key": key, "loaded": True}})  # fmt: skip
    return cards


def _chat_ids(tokenizer: Any, body: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # noqa: BLE001 - a template's own refusal (say, roles out of order) is the client's
        raise ApiError(400, f"the chat template refused these messages: {error}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _prepare(
    served: Served,
    body: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    asked: int | None,
    config: ServeConfig,
) -> _Prepared:
    """Check the request against the model and the server's limits (400 with the reason)."""
    backend = served.backend
    context = backend.context_length
    force = body.force
    if force is not None:
        try:
            backend.check_force(force)
        except RoutingError as error:
            raise force_error(error) from None
    vocab = _vocab_size(backend)
    for prompt in prompts:
        if not prompt:
            raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
        if any(not 0 <= token < vocab for token in prompt):
            raise ApiError(400, f"a prompt token id is outside the vocabulary (0..{vocab - 1})", param="prompt")
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the prompt has {len(prompt)}, which leaves no room to answer",
                param="prompt",
                code="context_length_exceeded",
            )
    longest = max(len(p) for p in prompts)
    max_tokens = asked if asked is not None else min(config.max_tokens, context - longest)
    if not 1 <= max_tokens <= config.max_tokens:
        raise ApiError(400, f"max_tokens must be 1..{config.max_tokens}, not {max_tokens}", param="max_tokens")
    if longest + max_tokens > context:
        raise ApiError(
            400,
            f"this model's context is {context} tokens; the prompt has {longest} and max_tokens asks {max_tokens} more",
            param="max_tokens",
            code="context_length_exceeded",
        )
    rows = len(prompts) * body.n
    if rows > config.max_queue:
        raise ApiError(400, f"{rows} rows (prompts x n) are more than the queue holds ({config.max_queue})", param="n")
    weights = {name: float(w) for name, w in force.items()} if force is not None else None
    return _Prepared(served=served, prompts=prompts, per_prompt=body.n, max_tokens=max_tokens, force=weights)


def _vocab_size(backend: Any) -> int:
    embeddings = backend.model.get_input_embeddings() if hasattr(backend.model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return int(embeddings.weight.shape[0])
    return int(backend.model.config.vocab_size)


def _queue_rows(prepared: _Prepared, body: CompletionRequest | ChatRequest) -> _Rows:
    loop = asyncio.get_running_loop()
    rows = _Rows(count=len(prepared.prompts) * prepared.per_prompt, queue=asyncio.Queue())
    for p, prompt in enumerate(prepared.prompts):
        for j in range(prepared.per_prompt):
            row = p * prepared.per_prompt + j
            seed = body.seed + row if body.seed is not None else None
            rows.jobs.append(
                Job(
                    prompt=prompt,
                    max_tokens=prepared.max_tokens,
                    sampler=RowSampler.create(temperature=body.temperature, top_p=body.top_p, seed=seed),
                    on_event=rows.sink(row),
                    loop=loop,
                    stop=body.stop_strings,
                    force=prepared.force,
                    ignore_eos=body.ignore_eos,
                )
            )
    try:
        prepared.served.worker.submit(rows.jobs)
    except AtmoeError as error:
        raise model_error(error, body.model) from None
    return rows


async def _answer(
    request: Request, body: CompletionRequest | ChatRequest, prepared: _Prepared, kind: str
) -> JSONResponse | StreamingResponse:
    rows = _queue_rows(prepared, body)
    answer_id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + secrets.token_hex(12)
    created = int(time.time())
    blocks = bool(body.atmoe and body.atmoe.blocks)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(rows, prepared, body, kind, answer_id, created, blocks, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await _collect(request, rows)
    if rows.failure is not None:
        raise ApiError(500, rows.failure, type="server_error", code="generation_failed")
    choices: list[dict[str, Any]] = []
    for row in range(rows.count):
        text = "".join(rows.texts.get(row, []))
        reason = rows.finished[row].reason
        if kind == "text_completion":
            choices.append({"index": row, "text": text, "logprobs": None, "finish_reason": reason})
        else:
            message = {"role": "assistant", "content": text}
            choices.append({"index": row, "message": message, "logprobs": None, "finish_reason": reason})
    document = {
        "id": answer_id,
        "object": kind,
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(rows, prepared),
        "atmoe": _routing_answer(rows, prepared, blocks),
    }
    return JSONResponse(document)


async def _collect(request: Request, rows: _Rows) -> None:
    """Wait for every row; a client that disconnects meanwhile cancels them."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        while not rows.over:
            getter = asyncio.ensure_future(rows.queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                rows.cancel()
                raise ApiError(499, "the client closed the request", code="client_closed")
            rows.record(*getter.result())
    except BaseException:
        rows.cancel()
        raise
    finally:
        watcher.cancel()


def _sse(document: dict[str, Any]) -> str:
    return f"data: {json.dumps(document)}\n\n"


async def _stream(
    rows: _Rows,
    prepared: _Prepared,
    body: CompletionRequest | ChatRequest,
    kind: str,
    answer_id: str,
    created: int,
    blocks: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: text deltas per row as they come, each row's finish, then ``atmoe``."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(
            {
                "id": answer_id,
                "object": chunk_kind,
                "created": created,
                "model": body.model,
                "choices": choices,
                **extra,
            }
        )

    def choice(row: int, text: str | None, reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if kind == "text_completion":
            return {"index": row, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": row, "delta": delta, "logprobs": None, "finish_reason": reason}

    try:
        if kind != "text_completion":
            yield chunk([choice(row, "", None, first=True) for row in range(rows.count)])
        while not rows.over:
            # whatever came since the last chunk goes out together: one chunk per row, its texts joined
            pending = [await rows.queue.get()]
            while not rows.queue.empty():
                pending.append(rows.queue.get_nowait())
            texts: dict[int, list[str]] = {}
            reasons: dict[int, str] = {}
            for row, event in pending:
                was_finished = row in rows.finished
                rows.record(row, event)
                if rows.failure is not None:
                    yield _sse(ApiError(500, rows.failure, type="server_error", code="generation_failed").body())
                    return
                if was_finished:
                    continue
                if isinstance(event, Text):
                    texts.setdefault(row, []).append(event.text)
                elif isinstance(event, Done):
                    texts.setdefault(row, [])
                    reasons[row] = event.reason
            for row, parts in texts.items():
                text = "".join(parts)
                yield chunk([choice(row, text if text or kind == "text_completion" else None, reasons.get(row))])
        usage = _usage(rows, prepared) if include_usage else None
        yield chunk([], usage=usage, atmoe=_routing_answer(rows, prepared, blocks))
        yield "data: [DONE]\n\n"
    finally:
        rows.cancel()  # the client went away (or all is sent): nothing left to compute for these rows


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atmoe-registry")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "0"
