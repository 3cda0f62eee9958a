"""The HTTP side of `llmos serve`: OpenAI's API on Starlette.

Why Starlette and uvicorn: they are what FastAPI (and so vLLM's OpenAI server) runs
on, well kept and small. FastAPI's own addition, pydantic models that answer a bad
body with 422, is what OpenAI's clients do not expect (they expect 400 with
{"error": {...}}); the checks here are by hand, each naming its parameter, as
llmos's syscall table names its arguments.

Every failure is {"error": {"message", "type", "param", "code"}} with the status
HTTP_OF gives its errno: one table.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from syscalls import Errno, SyscallError

from ._gateway import Gateway

log = logging.getLogger("llmos.serve")

# errno -> (HTTP status, OpenAI error type); anything else is 500 server_error
HTTP_OF: dict[str, tuple[int, str]] = {
    "EINVAL": (400, "invalid_request_error"), "E2BIG": (400, "invalid_request_error"),
    "ENAMETOOLONG": (400, "invalid_request_error"), "EISDIR": (400, "invalid_request_error"),
    "ENOTDIR": (400, "invalid_request_error"), "EMSGSIZE": (400, "invalid_request_error"),
    "EPERM": (403, "permission_error"), "EACCES": (403, "permission_error"),
    "ENOENT": (404, "not_found_error"),
    "EAGAIN": (429, "rate_limit_error"), "EBUSY": (429, "rate_limit_error"),
    "ENOMEM": (503, "server_error"), "ETIMEDOUT": (503, "server_error"),
    "ECONNRESET": (503, "server_error"), "ENOTCONN": (503, "server_error"),
}
MAX_N = 8
MAX_BODY = 4 << 20


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def from_errno(e: SyscallError, param: str | None = None) -> HTTPError:
    try:
        name = Errno(e.errno).name
    except ValueError:
        name = str(e.errno)
    status, type_ = HTTP_OF.get(name, (500, "server_error"))
    code = {"ENOENT": "model_not_found"}.get(name, name.lower())
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(math.ceil(getattr(e, "retry_after", 1)))
    return HTTPError(status, e.message, type_, param, code, headers)


def bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, message, "invalid_request_error", param)


# -- the request body -----------------------------------------------------------------

def _number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise bad(key, f"{key} must be {'an integer' if integer else 'a number'}, not "
                  f"{json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise bad(key, f"{key} must be between {lo:g} and {hi:g}, not {v}")
    return v


UNSUPPORTED = {  # parameter -> the values that mean "not asked for"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


def parse_body(body: Any, chat: bool) -> dict[str, Any]:
    """What a completions (chat: chat completions) body asks, checked: model, the
    infer arguments, n, stream, include_usage."""
    if not isinstance(body, dict):
        raise bad(None, "the body must be a JSON object")  # type: ignore[arg-type]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: a deployment name or a model path")
    for key, fine in UNSUPPORTED.items():
        if key in body and body[key] not in fine:
            raise bad(key, f"{key} is not supported by llmos serve")
    args: dict[str, Any] = {}
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad("messages", "messages must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user",
                                                                  "assistant", "tool",
                                                                  "developer"):
                raise bad(f"messages[{i}]", "each message needs a role: system, user, "
                          "assistant, tool or developer")
            content = m.get("content")
            if isinstance(content, list):  # parts: only text ones
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or \
                            not isinstance(part.get("text"), str):
                        raise bad(f"messages[{i}].content", "only text content parts "
                                  "are supported")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content", "content must be a string or a list "
                          "of text parts")
            role = "system" if m["role"] == "developer" else m["role"]
            out.append({"role": role, "content": content})
        args["messages"] = out
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        args["max_tokens"] = _number({"max_tokens": limit}, "max_tokens", 256, 1, 1 << 16,
                                     True)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt", "prompt must be a string (or a list of one string); "
                      "token-id prompts and batches are not supported")
        if not prompt:
            raise bad("prompt", "prompt is empty")
        args["prompt"] = prompt
        args["max_tokens"] = _number(body, "max_tokens", 16, 1, 1 << 16, True)
    args["temperature"] = float(_number(body, "temperature", 1.0, 0, 2, False))
    args["top_p"] = float(_number(body, "top_p", 1.0, 0, 1, False))
    args["top_k"] = max(0, _number(body, "top_k", 0, -1, 1 << 20, True))  # vLLM's; -1: off
    seed = _number(body, "seed", None, 0, 2**63 - 1, True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > 16:
        raise bad("stop", "stop must be a string or a list of up to 16 non-empty strings")
    args["stop"] = stop
    n = _number(body, "n", 1, 1, MAX_N, True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "stream must be true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object")
    if opts and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "user must be a string")
    return {"model": model, "args": args, "seed": seed, "n": n, "stream": stream,
            "include_usage": bool(opts.get("include_usage")), "user": user}


# -- the app ----------------------------------------------------------------------------

class App:
    def __init__(self, gw: Gateway, keys: Any, default_uid: int, metrics: Any,
                 page: Any, keyed: bool = False) -> None:
        self.gw, self.keys, self.default_uid = gw, keys, default_uid
        # once keys are needed they stay needed: revoking the last one locks every
        # request out rather than opening serve to all
        self.keyed = keyed
        self.metrics, self.page = metrics, page
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/metrics", self.prometheus, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/", self.status_page, methods=["GET"])]
        self.starlette = Starlette(routes=routes, exception_handlers={
            StarletteHTTPException: self.http_error})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.starlette(scope, receive, send)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, a wrong method) as OpenAI errors."""
        status = getattr(exc, "status_code", 500)
        err = HTTPError(status, f"{request.method} {request.url.path}: "
                        f"{getattr(exc, 'detail', '') or 'failed'}",
                        "not_found_error" if status == 404 else "invalid_request_error",
                        code="unknown_url" if status == 404 else None)
        return JSONResponse(err.body(), status_code=status,
                            headers=getattr(exc, "headers", None))

    def uid_of(self, request: Request, query_key: bool = False) -> int:
        self.keyed = self.keyed or self.keys.configured
        if not self.keyed:
            return self.default_uid
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not key and query_key:
            key = request.query_params.get("key", "")
        if not key:
            raise HTTPError(401, "no API key: send Authorization: Bearer KEY (llmos keys "
                            "create makes one)", "authentication_error", code="missing_api_key")
        record = self.keys.lookup(key)
        if record is None:
            raise HTTPError(401, "the API key is wrong or revoked", "authentication_error",
                            code="invalid_api_key")
        return int(record["uid"])

    async def guarded(self, request: Request, handler: Any, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
        except HTTPError as e:
            resp = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except SyscallError as e:
            err = from_errno(e)
            resp = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except Exception as e:  # ours, not the client's: say so, keep serving
            log.exception("%s failed", endpoint)
            err = HTTPError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
            resp = JSONResponse(err.body(), status_code=500)
        self.metrics.http(endpoint, resp.status_code, time.perf_counter() - t0)
        return resp

    # -- endpoints --------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            uid = self.uid_of(request)
            data = [{"id": m["id"], "object": "model", "created": int(m["created"] or 0),
                     "owned_by": f"uid {m['owner']}", "llmos": {"kind": m["kind"],
                                                               "path": m["model"]}}
                    for m in await self.gw.visible(uid)]
            return JSONResponse({"object": "list", "data": data})
        return await self.guarded(request, run, "/v1/models")

    async def model(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            uid = self.uid_of(request)
            want = request.path_params["model"]
            kind, name = self.gw.resolve(want)
            for m in await self.gw.visible(uid):
                if m["id"] in (want, name):
                    return JSONResponse({"id": m["id"], "object": "model",
                                         "created": int(m["created"] or 0),
                                         "owned_by": f"uid {m['owner']}"})
            raise HTTPError(404, f"no model or deployment {want!r} that uid {uid} may read",
                            "not_found_error", "model", "model_not_found")
        return await self.guarded(request, run, "/v1/models/{model}")

    async def completions(self, request: Request) -> Response:
        return await self.guarded(request, lambda r: self.generate(r, chat=False),
                                  "/v1/completions")

    async def chat(self, request: Request) -> Response:
        return await self.guarded(request, lambda r: self.generate(r, chat=True),
                                  "/v1/chat/completions")

    async def health(self, request: Request) -> Response:
        ok = self.gw.admin is not None
        return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            self.uid_of(request, query_key=True)
            body, ctype = await self.metrics.exposition()
            return Response(body, media_type=ctype)
        return await self.guarded(request, run, "/metrics")

    async def status_page(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            self.uid_of(request, query_key=True)
            return HTMLResponse(await self.page(self.gw, self.metrics.rate()))
        return await self.guarded(request, run, "/")

    # -- generation -------------------------------------------------------------------

    async def generate(self, request: Request, chat: bool) -> Response:
        uid = self.uid_of(request)
        raw = await _body(request)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad(None, f"the body is not JSON: {e}") from None  # type: ignore[arg-type]
        req = parse_body(body, chat)
        model = req["model"]
        seed0 = req["seed"] if req["seed"] is not None else secrets.randbits(62)
        gens = []
        for i in range(req["n"]):
            args = {**req["args"], "seed": (seed0 + i) % 2**63}
            gens.append(self.gw.generate(uid, model, args, req["stream"]))
        # the first event of each choice before any byte is sent: a bad model, no
        # permission, a full queue become an HTTP error, not half a stream (a request
        # that waits in a deployment's queue says "queued" first: its stream starts)
        started = time.perf_counter()
        try:
            firsts = await asyncio.gather(*(g.__anext__() for g in gens))
        except BaseException:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise
        for ev in firsts:
            if ev[0] == "error":
                await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
                raise from_errno(SyscallError(ev[1], ev[2]), "model" if ev[1] in (
                    Errno.ENOENT, Errno.EACCES) else None)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if req["stream"]:
            return StreamingResponse(
                self.sse(gens, firsts, chat, rid, created, model, req["include_usage"],
                         started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tasks = [asyncio.ensure_future(self.collect(g, f, started))
                 for g, f in zip(gens, firsts)]
        try:
            results = await _unless_gone(request, _all_or_none(tasks))
        finally:  # a failed choice, or the client gone: the others stopped, then closed
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        if results is None:  # the client left: nobody to answer
            return Response(status_code=499)
        texts = [t for t, _ in results]
        reasons = [rec["finish_reason"] for _, rec in results]
        usage = [results[0][1]["prompt_tokens"], sum(rec["tokens"] for _, rec in results)]
        choices = [({"index": i, "message": {"role": "assistant", "content": t},
                     "finish_reason": r, "logprobs": None} if chat else
                    {"index": i, "text": t, "finish_reason": r, "logprobs": None})
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else
                             "text_completion", "created": created, "model": model,
                             "choices": choices, "system_fingerprint": None,
                             "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                       "total_tokens": usage[0] + usage[1]}})

    async def collect(self, g: Any, ev: tuple, started: float) -> tuple[str, dict]:
        """One choice, whole: (its text, its final record)."""
        parts: list[str] = []
        first = True
        while True:
            if ev[0] == "restart":  # its replica died: it starts again elsewhere
                parts.clear()
            elif ev[0] in ("chunk", "done") and first:
                first = False  # its first text (with one token, all of it is in done)
                self.metrics.first_token(time.perf_counter() - started)
            if ev[0] == "chunk":
                parts.append(ev[1])
            elif ev[0] == "done":
                parts.append(ev[1]["text"])
                self.metrics.tokens(ev[1]["tokens"])
                return "".join(parts), ev[1]
            elif ev[0] == "error":
                raise from_errno(SyscallError(ev[1], ev[2]))
            ev = await g.__anext__()

    async def sse(self, gens: list, firsts: list, chat: bool, rid: str, created: int,
                  model: str, include_usage: bool, started: float) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def frame(choices: list, usage: Any = None, last: bool = False) -> bytes:
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created,
                                 "model": model, "choices": choices}
            if include_usage:
                d["usage"] = usage
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        def choice(i: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, g: Any, first: tuple) -> None:
            ev = first
            try:
                while True:
                    if ev[0] not in ("queued", "restart"):
                        await queue.put((i, ev))
                    if ev[0] not in ("chunk", "queued", "restart"):
                        return
                    ev = await g.__anext__()
            except StopAsyncIteration:
                await queue.put((i, ("error", int(Errno.EIO), "the generation ended early")))
            finally:
                await g.aclose()

        tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in
                 enumerate(zip(gens, firsts))]
        usage = [0, 0]
        last_t: dict[int, float] = {}  # choice -> when its last chunk went
        try:
            if chat:
                yield frame([choice(i, "", None, role=True) for i in range(len(gens))])
            left = len(gens)
            while left:
                i, ev = await queue.get()
                now = time.perf_counter()
                if ev[0] == "chunk":
                    if i in last_t:
                        self.metrics.inter_token(now - last_t[i])
                    else:
                        self.metrics.first_token(now - started)
                    last_t[i] = now
                    yield frame([choice(i, ev[1], None)])
                    continue
                left -= 1
                if ev[0] == "done":
                    if i not in last_t:  # all of its text came in the final record
                        self.metrics.first_token(now - started)
                    rec = ev[1]
                    usage[0] = rec["prompt_tokens"]
                    usage[1] += rec["tokens"]
                    self.metrics.tokens(rec["tokens"])
                    if rec["text"]:
                        yield frame([choice(i, rec["text"], None)])
                    yield frame([choice(i, None if chat else "", rec["finish_reason"])])
                else:
                    err = from_errno(SyscallError(ev[1], ev[2]))
                    yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
            if include_usage:
                yield frame([], {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                 "total_tokens": usage[0] + usage[1]})
            yield b"data: [DONE]\n\n"
        finally:  # the client left (or we are done): stop every generation
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _body(request: Request) -> bytes:
    """The request's body, refused (413) past MAX_BODY before more of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPError(413, f"the body is {declared} bytes, over {MAX_BODY}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _all_or_none(tasks: list[asyncio.Future]) -> list[Any]:
    """Every task's result; when one fails (or this is cancelled), the others are
    cancelled and awaited before the failure goes on."""
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_gone(request: Request, work: Any) -> Any:
    """work's result, or None (work cancelled) when the client disconnects first: a
    request that is not streamed is stopped too when nobody waits for it."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:  # done, the client gone, or this handler cancelled (serve stopping)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
