"""The OpenAI-compatible HTTP layer over a :class:`~hydraopt.runtime.RuntimeModel` (FastAPI).

Routes: ``GET /v1/models`` (one entry per task, as vLLM lists its LoRA modules),
``POST /v1/completions`` and ``POST /v1/chat/completions`` with ``model`` = task name, optionally
streamed as server-sent events. Every request is validated here, before it reaches the batcher,
so a bad request is answered 4xx on its own and never joins (or breaks) a batch. Errors use
OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. One log line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydraopt.errors import HydraoptError
from hydraopt.runtime.generation import Generation, SamplingParams
from hydraopt.runtime.model import RuntimeModel
from hydraopt.serve.batcher import Batcher, Job
from hydraopt.serve.protocol import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorType,
    SamplingFields,
    error_body,
)

log = logging.getLogger("hydraopt.serve")


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def create_app(
    runtime: RuntimeModel,
    *,
    max_batch: int = 16,
    max_tokens_limit: int = 1024,
    wait_s: float = 0.01,
) -> FastAPI:
    """The FastAPI app serving every task of ``runtime``'s bundle.

    Args:
        runtime: the model with its bundle installed.
        max_batch: most requests decoded together.
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        wait_s: how long a batch waits for more requests to join.
    """
    batcher = Batcher(runtime, max_batch=max_batch, wait_s=wait_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="hydraopt", lifespan=lifespan)
    app.state.batcher = batcher
    created = int(time.time())

    @app.middleware("http")
    async def log_request(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        task = getattr(request.state, "task", "-")
        log.info(
            "%s %s %s task=%s %.3fs",
            request.method,
            request.url.path,
            response.status_code,
            task,
            time.perf_counter() - start,
        )
        return response

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, e: RequestError) -> JSONResponse:
        body = error_body(e.message, _error_type(e.status), param=e.param, code=e.code)
        return JSONResponse(body, e.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(error_body(message, "invalid_request_error", param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), _error_type(e.status_code)), e.status_code)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": t, "object": "model", "created": created, "owned_by": "hydraopt"}
            for t in runtime.tasks
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        return await answer(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | dict[str, Any]:
        _check_task(runtime, body.model)
        try:
            text = runtime.chat_messages([m.model_dump() for m in body.messages])
        except HydraoptError as e:
            raise RequestError(400, str(e), param="messages") from e
        return await answer(request, body, text, chat=True)

    async def answer(
        request: Request, body: SamplingFields, prompt: str, *, chat: bool
    ) -> Response | dict[str, Any]:
        _check_task(runtime, body.model)
        request.state.task = body.model
        job = _job(runtime, body, prompt, max_tokens_limit)
        meta = _Meta(chat, body.model, len(job.prompt_ids))
        if body.stream:
            return StreamingResponse(_stream(batcher, job, meta), media_type="text/event-stream")
        result = await asyncio.wrap_future(batcher.submit(job))
        return meta.body(result)

    return app


def _error_type(status: int) -> ErrorType:
    return "not_found_error" if status == 404 else "invalid_request_error"


def _check_task(runtime: RuntimeModel, task: str) -> None:
    if task not in runtime.tasks:
        raise RequestError(
            404,
            f"The model '{task}' does not exist; this server has {list(runtime.tasks)}",
            param="model",
            code="model_not_found",
        )


def _job(runtime: RuntimeModel, body: SamplingFields, prompt: str, limit: int) -> Job:
    """A validated :class:`Job`, or a 400 naming what is wrong."""
    context = runtime.context_length
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS
    if max_tokens > limit:
        raise RequestError(
            400, f"max_tokens must be <= {limit}, got {max_tokens}", param="max_tokens"
        )
    ids = runtime.encode(prompt)
    if not ids:
        raise RequestError(400, "the prompt is empty after tokenization", param="prompt")
    if len(ids) + max_tokens > context:
        raise RequestError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {len(ids)} "
            f"and max_tokens asks for {max_tokens} more",
            param="max_tokens" if len(ids) < context else "prompt",
            code="context_length_exceeded",
        )
    params = SamplingParams(max_tokens, body.temperature, body.stop_strings(), body.seed)
    return Job(ids, body.model, params)


class _Meta:
    """What a response needs besides the generation: endpoint kind, task, prompt length."""

    def __init__(self, chat: bool, task: str, prompt_tokens: int) -> None:
        self.chat, self.task, self.prompt_tokens = chat, task, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def choice(
        self, text: str | None, finish: str | None, *, delta: bool = False
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        message = {"role": "assistant", "content": text} if text is not None else {}
        return {"index": 0, key: message, "finish_reason": finish}

    def envelope(self, choice: dict[str, Any], *, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.task,
            "choices": [choice],
        }

    def body(self, result: Generation) -> dict[str, Any]:
        out = self.envelope(self.choice(result.text, result.finish_reason))
        n = len(result.token_ids)
        out["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }
        return out


async def _stream(batcher: Batcher, job: Job, meta: _Meta) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, a final chunk, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(text: str) -> None:  # called on the model thread
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    job.on_text = on_text
    future: asyncio.Future[Any] = asyncio.wrap_future(batcher.submit(job))
    sent = ""
    while True:
        getter: asyncio.Future[Any] = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        text = getter.result()
        # a stop string can cut text already shown; only ever send what extends it
        if text.startswith(sent) and len(text) > len(sent):
            yield f"data: {json.dumps(meta.envelope(meta.choice(text[len(sent) :], None, delta=True), chunk=True))}\n\n"
            sent = text
    result = future.result()
    while not pieces.empty():  # pieces posted just before the future resolved
        pieces.get_nowait()
    if result.text.startswith(sent) and len(result.text) > len(sent):
        tail = result.text[len(sent) :]
        yield f"data: {json.dumps(meta.envelope(meta.choice(tail, None, delta=True), chunk=True))}\n\n"
    last = meta.choice(None if meta.chat else "", result.finish_reason, delta=True)
    yield f"data: {json.dumps(meta.envelope(last, chunk=True))}\n\n"
    yield "data: [DONE]\n\n"
