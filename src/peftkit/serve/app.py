"""The HTTP side of ``peftkit serve``: OpenAI's completions, chat completions and models
endpoints, vLLM's adapter loading endpoints, on Starlette (run by uvicorn, see
:mod:`peftkit.serve.server`).

Requests are validated by hand, not by a schema library, so that every bad request gets
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` with one clear message
and the status the issue lists: 400 for malformed JSON or a missing, mistyped or out-of-range
field, 404 for an unknown model, 401 for a missing or wrong API key, 413 for an over-large body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import CANCELLED, Engine, Event, Sampling

#: Request bodies larger than this get 413 (``--max-body-bytes``).
MAX_BODY_BYTES = 1 << 20
#: OpenAI's default ``max_tokens`` for legacy completions.
COMPLETION_MAX_TOKENS = 16
#: How often a non-streaming request checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.5
ROLES = ("system", "user", "assistant", "tool", "developer")
# Fields OpenAI defines that change the answer and that this server does not implement: a
# request that sets one to a non-default value is refused rather than answered differently.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


class ApiError(Exception):
    """A request the server refuses: ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def log(text: str) -> None:
    """The request log and progress: one line each, on stderr."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", file=sys.stderr, flush=True)


@dataclass
class ServerState:
    """What the endpoints share: the engine, the tokenizer, names and limits."""

    engine: Engine
    tokenizer: Any
    base_name: str
    model_path: str
    context: int
    api_key: str | None = None
    allow_loading: bool = False
    max_body: int = MAX_BODY_BYTES
    adapter_paths: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    def names(self) -> list[str]:
        return [self.base_name, *self.engine.adapters()]

    def adapter_for(self, name: Any) -> str | None:
        """The adapter a request's ``model`` names (None = the base), or a 404 listing them."""
        if name is None:
            raise ApiError(
                400,
                "the request has no `model`; give the base model's name or an "
                f"adapter's: {', '.join(self.names())}",
                param="model",
            )
        if not isinstance(name, str):
            raise ApiError(
                400, f"`model` must be a string, got {type(name).__name__}", param="model"
            )
        if name == self.base_name:
            return None
        if name in self.engine.adapters():
            return name
        raise ApiError(
            404,
            f"The model `{name}` does not exist. This server has: {', '.join(self.names())}.",
            param="model",
            code="model_not_found",
        )


# -- request parsing ------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413,
                f"the request body is over the server's limit of {limit} bytes",
                code="request_too_large",
            )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _int(body: dict[str, Any], key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"`{key}` must be an integer, got {json.dumps(v)}", param=key)
    return v


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"`{key}` must be a number, got {json.dumps(v)}", param=key)
    if not lo <= v <= hi:
        raise ApiError(400, f"`{key}` must be between {lo:g} and {hi:g}, got {v}", param=key)
    return float(v)


def _bool(body: dict[str, Any], key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"`{key}` must be true or false, got {json.dumps(v)}", param=key)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) and s for s in v):
        raise ApiError(
            400,
            f"`stop` must be a non-empty string or a list of up to 4 of them, got {json.dumps(v)}",
            param="stop",
        )
    return tuple(v)


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, fine in UNSUPPORTED.items():
        if key in body and body[key] not in fine:
            raise ApiError(400, f"`{key}` is not supported by this server; leave it out", param=key)


def sampling(
    body: dict[str, Any], state: ServerState, prompt_tokens: int, *, chat: bool
) -> Sampling:
    """The request's :class:`Sampling`, with OpenAI's defaults and ranges, and the context
    check (``prompt_tokens`` + ``max_tokens`` must fit)."""
    _check_unsupported(body)
    ctx = state.context
    key = "max_tokens"
    max_tokens = _int(body, "max_tokens", None)
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
        max_tokens = _int(body, key, None)
    if max_tokens is not None and not 1 <= max_tokens <= ctx:
        raise ApiError(
            400,
            f"`{key}` must be between 1 and the context length {ctx}, got {max_tokens}",
            param=key,
        )
    asked = (
        max_tokens
        if max_tokens is not None
        else (max(1, ctx - prompt_tokens) if chat else COMPLETION_MAX_TOKENS)
    )
    if prompt_tokens + asked > ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the "
            "completion). Please reduce the prompt or the completion length.",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    n = _int(body, "n", 1)
    assert n is not None
    if not 1 <= n <= state.engine.max_batch:
        raise ApiError(
            400,
            f"`n` must be between 1 and the server's --max-batch {state.engine.max_batch}, got {n}",
            param="n",
        )
    seed = _int(body, "seed", None)
    return Sampling(
        max_tokens=asked,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        n=n,
        stop=_stop(body),
        seed=seed,
        ignore_eos=_bool(body, "ignore_eos"),
    )


def completion_prompt(body: dict[str, Any], tokenizer: Any) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < len(tokenizer) for t in p):
            raise ApiError(
                400, f"`prompt` has a token id outside 0..{len(tokenizer) - 1}", param="prompt"
            )
        return list(p)
    if not isinstance(p, str):
        raise ApiError(
            400,
            f"`prompt` must be a string (or one list of token ids), got {json.dumps(p)[:80]}",
            param="prompt",
        )
    ids = list(tokenizer(p)["input_ids"])
    if not ids:
        raise ApiError(400, "`prompt` is empty", param="prompt")
    return ids


def chat_prompt(body: dict[str, Any], tokenizer: Any) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(
            400, "`messages` must be a non-empty list of {role, content} objects", param="messages"
        )
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}] must be an object with `role` one of {', '.join(ROLES)}",
                param=f"messages[{i}]",
            )
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in c
            ):
                raise ApiError(
                    400,
                    f"messages[{i}].content parts must be "
                    '{"type": "text", "text": ...}; this server reads text only',
                    param=f"messages[{i}].content",
                )
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise ApiError(
                400, f"messages[{i}].content must be a string", param=f"messages[{i}].content"
            )
        clean.append({"role": m["role"], "content": c})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- running a request ----------------------------------------------------------------------------
class Run:
    """One submitted request seen from the event loop: the engine's events on an asyncio queue."""

    def __init__(
        self, state: ServerState, prompt: list[int], adapter: str | None, sp: Sampling
    ) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.sp = sp
        self.prompt_tokens = len(prompt)
        self.started = time.monotonic()
        self.first: float | None = None
        self.texts = [""] * sp.n
        self.reasons: list[str | None] = [None] * sp.n
        self.error: str | None = None

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.engine = state.engine
        if not self.engine.alive():
            raise ApiError(503, "the server's engine has stopped", type_="server_error")
        self.req = self.engine.submit(prompt, adapter=adapter, sampling=sp, emit=emit)

    @property
    def done(self) -> bool:
        return self.error is not None or all(r is not None for r in self.reasons)

    async def next(self, timeout: float | None = None) -> Event:
        ev = await asyncio.wait_for(self.queue.get(), timeout)
        if self.first is None and ev.kind in ("token", "done"):
            self.first = time.monotonic()
        if ev.kind == "error":
            self.error = ev.text
        else:
            self.texts[ev.index] += ev.text
            if ev.kind == "done":
                self.reasons[ev.index] = ev.finish_reason
        return ev

    def usage(self) -> dict[str, int]:
        c = self.req.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c,
            "total_tokens": self.prompt_tokens + c,
        }

    def cancel(self) -> None:
        self.engine.cancel(self.req)

    def log(self, request: Request, status: int, model: str, note: str = "") -> None:
        now = time.monotonic()
        ttft = f"{self.first - self.started:.2f}s" if self.first is not None else "-"
        client = request.client.host if request.client else "-"
        log(
            f"{client} {request.method} {request.url.path} {status} model={model} "
            f"prompt={self.prompt_tokens} completion={self.req.completion_tokens} "
            f"ttft={ttft} total={now - self.started:.2f}s{note}"
        )


def _ids(chat: bool) -> tuple[str, str, str]:
    if chat:
        return f"chatcmpl-{secrets.token_hex(12)}", "chat.completion", "chat.completion.chunk"
    cid = f"cmpl-{secrets.token_hex(12)}"
    return cid, "text_completion", "text_completion"


async def answer(request: Request, state: ServerState, *, chat: bool) -> Response:
    body = await read_json(request, state.max_body)
    adapter = state.adapter_for(body.get("model"))
    name = str(body["model"])
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    prompt = (chat_prompt if chat else completion_prompt)(body, state.tokenizer)
    sp = sampling(body, state, len(prompt), chat=chat)
    run = Run(state, prompt, adapter, sp)
    cid, obj, chunk_obj = _ids(chat)
    created = int(time.time())
    if stream:
        return StreamingResponse(
            _stream(request, run, name, cid, chunk_obj, created, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        while not run.done:
            try:
                await run.next(DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    run.cancel()
                    run.log(request, 499, name, " (client left)")
                    return Response(status_code=499)
    except BaseException:
        run.cancel()
        raise
    if run.error is not None:
        run.log(request, 500, name, f" error={run.error}")
        return error_response(ApiError(500, run.error, type_="server_error"))
    choices: list[dict[str, Any]] = []
    for i, (text, reason) in enumerate(zip(run.texts, run.reasons, strict=True)):
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            )
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    run.log(request, 200, name)
    return JSONResponse(
        {
            "id": cid,
            "object": obj,
            "created": created,
            "model": name,
            "choices": choices,
            "usage": run.usage(),
        }
    )


async def _stream(
    request: Request,
    run: Run,
    model: str,
    cid: str,
    obj: str,
    created: int,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        data = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    note = ""
    try:
        if chat:
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(run.sp.n)
                ]
            )
        while not run.done:
            ev = await run.next()
            if ev.kind == "error":
                err = ApiError(500, ev.text, type_="server_error").body()
                yield f"data: {json.dumps(err)}\n\n"
                note = f" error={ev.text}"
                break
            if ev.kind == "done" and ev.finish_reason == CANCELLED:
                break
            if not ev.text and ev.kind != "done":
                continue
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                c = {
                    "index": ev.index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": ev.finish_reason,
                }
                if ev.kind == "done" and ev.text:
                    yield chunk([{**c, "finish_reason": None}])
                    c = {**c, "delta": {}}
            else:
                c = {
                    "index": ev.index,
                    "text": ev.text,
                    "logprobs": None,
                    "finish_reason": ev.finish_reason,
                }
            yield chunk([c])
        if include_usage and run.error is None:
            yield chunk([], run.usage())
        yield "data: [DONE]\n\n"
        run.log(request, 200, model, " stream" + note)
    except BaseException:
        # the client went away (or the server is being killed): free the rows now
        run.cancel()
        run.log(request, 499, model, " stream (client left)")
        raise


# -- endpoints ------------------------------------------------------------------------------------
def build_app(state: ServerState) -> Starlette:
    """The Starlette app for ``state``; wrap it with :class:`Guard` for keys and body size."""

    def endpoint(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                log(
                    f"{request.client.host if request.client else '-'} {request.method} "
                    f"{request.url.path} {e.status} {e.message}"
                )
                return error_response(e)

        return wrapped

    async def health(request: Request) -> Response:
        rows, waiting = state.engine.load()
        ok = state.engine.alive()
        st = state.engine.stats
        return JSONResponse(
            {
                "status": "ok" if ok else "error",
                "running": rows,
                "waiting": waiting,
                "requests": st.requests,
                "tokens": st.tokens,
                "steps": st.steps,
            },
            status_code=200 if ok else 503,
        )

    async def models(request: Request) -> Response:
        base = {
            "id": state.base_name,
            "object": "model",
            "created": state.created,
            "owned_by": "peftkit",
            "root": state.model_path,
            "parent": None,
            "max_model_len": state.context,
        }
        data = [base] + [
            {
                "id": n,
                "object": "model",
                "created": state.created,
                "owned_by": "peftkit",
                "root": state.adapter_paths.get(n),
                "parent": state.base_name,
                "max_model_len": state.context,
            }
            for n in state.engine.adapters()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(request: Request) -> Response:
        return await answer(request, state, chat=False)

    async def chat(request: Request) -> Response:
        return await answer(request, state, chat=True)

    def require_loading() -> None:
        if not state.allow_loading:
            raise ApiError(
                404,
                "loading adapters at run time is off; start the server with "
                "--allow-adapter-loading",
                code="not_found",
            )

    async def load_lora(request: Request) -> Response:
        require_loading()
        body = await read_json(request, state.max_body)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "give `lora_name` and `lora_path` (strings)")
        if name in state.names():
            raise ApiError(
                400,
                f"the name {name!r} is already served; unload it first or pick another",
                param="lora_name",
            )
        fut = state.engine.load_adapter(name, path)
        try:
            await asyncio.wrap_future(fut)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ApiError(
                400,
                f"could not load adapter {name!r} from {path}: {' '.join(str(e).split())}",
                param="lora_path",
            ) from None
        state.adapter_paths[name] = str(Path(path).resolve())
        log(f"loaded adapter {name!r} from {path}")
        return Response(
            f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain"
        )

    async def unload_lora(request: Request) -> Response:
        require_loading()
        body = await read_json(request, state.max_body)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "give `lora_name` (a string)", param="lora_name")
        if name not in state.engine.adapters():
            raise ApiError(
                404,
                f"no adapter named {name!r}; this server has: "
                f"{', '.join(state.engine.adapters()) or 'none'}",
                param="lora_name",
                code="model_not_found",
            )
        await asyncio.wrap_future(state.engine.unload_adapter(name))
        state.adapter_paths.pop(name, None)
        log(f"unloaded adapter {name!r}")
        return Response(
            f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain"
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        msg = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
        return error_response(
            ApiError(
                status,
                f"{msg}: {request.method} {request.url.path}",
                code="not_found" if status == 404 else None,
            )
        )

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/load_lora_adapter", endpoint(load_lora), methods=["POST"]),
        Route("/v1/unload_lora_adapter", endpoint(unload_lora), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


class Guard:
    """ASGI middleware in front of the app: the bearer token (401) and the body size by its
    declared ``Content-Length`` (413; a body without one is counted as it is read)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                what = "no API key was given" if not given else "the API key is wrong"
                await _send(
                    send,
                    ApiError(
                        401,
                        f"{what}: send the header `Authorization: Bearer <key>` with the "
                        "server's --api-key",
                        type_="invalid_request_error",
                        code="invalid_api_key",
                    ),
                )
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send(
                send,
                ApiError(
                    413,
                    f"the request body ({length} bytes) is over the server's limit of "
                    f"{self.max_body} bytes",
                    code="request_too_large",
                ),
            )
            return
        await self.app(scope, receive, send)


async def _send(send: Any, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": e.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    log(f"- {e.status} {e.message}")
