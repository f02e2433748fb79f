"""The routed engine: a prefill router in front of decode workers, with aggregated fallback.

vLLM protocol (SPEC §4.1): a copy of the request goes to a prefill worker with max_tokens=1 and
`kv_transfer_params.do_remote_decode`; the original then goes to a decode worker with the
`kv_transfer_params` the prefill returned, and the decode stream comes back. Both carry the same
`X-Request-Id`. With no prefill worker the request goes to a decode worker unchanged.
SGLang protocol (SPEC §4.2): prefill and decode are sent at once with one bootstrap room.
Shared-storage protocol (vLLM's ExampleConnector): as vLLM's, but the KV moves through storage
keyed by the prompt, so the prefill returns no `kv_transfer_params` and none are required.

The engine client is aiohttp and chunks are parsed with orjson: this is the hot path of every
streamed token (benchmarks/test_frontend_concurrency.py measures it).

Engines are spoken to through their OpenAI `/v1/completions` with the token ids the frontend's
own preprocessor produced, so what the engine runs is exactly what the frontend routed on. A
request with images goes to the engine's `/v1/chat/completions` with the same messages (the same
image bytes), because an engine's completions API takes no images; there the engine is asked for
its `prompt_token_ids` (vLLM's `return_token_ids`), and a prompt that differs from the one the
frontend hashed is an error, not a silent mis-route.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import AsyncIterator

import aiohttp
import orjson

from harness.errors import HarnessError
from harness.frontend.kv_index import KvIndex, block_hashes
from harness.frontend.metrics import FrontendMetrics
from harness.frontend.preprocessor import Prompt
from harness.frontend.stream import FLUSH, Annotated, dumps

log = logging.getLogger(__name__)

# The prefill request's kv_transfer_params, exactly as vLLM's disaggregated proxy sends them.
PREFILL_KV_TRANSFER_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                              "remote_block_ids": None, "remote_host": None, "remote_port": None}



class RoutingError(HarnessError):
    status = 502
    kind = "decode_failed"  # what the frontend's errors_total counts it as (metrics.ERROR_KINDS)


class NoWorkers(RoutingError):
    status = 503
    kind = "no_workers"


class PrefillError(RoutingError):
    """The prefill failed or returned no usable kv_transfer_params; decode is not tried."""

    kind = "prefill_failed"


class DecodeError(RoutingError):
    pass


# A chunk with any of these is parsed by the relay, never passed through: an error, a usage (the
# relay rewrites it), transfer parameters (kv_/ec_transfer_params: the client must not see them),
# the end of the stream.
PARSED_MARKS = (b'"error"', b'"usage"', b'_transfer_params"', b"[DONE]")


def parsed_from(events: bytes) -> int:
    """Where the first event holding a PARSED_MARKS mark begins in a run of whole SSE events, or
    -1 where none does. A JSON string cannot hold a bare newline: a blank line is always between
    two events. The relay asks this on every read of every stream, so each mark is looked for once
    (spelled out: a loop over PARSED_MARKS cost more), and the answer serves both as the test and
    as the cut."""
    first = -1
    for at in (events.find(b'"error"'), events.find(b'"usage"'), events.find(b'_transfer_params"'),
               events.find(b"[DONE]")):
        if at >= 0 and (first < 0 or at < first):
            first = at
    if first < 0:
        return -1
    boundary = events.rfind(b"\n\n", 0, first)
    return boundary + 2 if boundary >= 0 else 0


# Engine errors the client sees as a failed worker: connection refused or reset, a read timeout.
ENGINE_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class PromptMismatch(RoutingError):
    """The engine ran a different prompt from the one the frontend hashed and routed on."""

    kind = "prompt_mismatch"


def prompt_mismatch(instance: "Instance", ours: list[int], theirs: list[int]) -> str | None:
    if theirs == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"{instance.role} worker {instance.key} ran a prompt of {len(theirs)} tokens, the frontend hashed "
            f"{len(ours)}; first difference at token {at}: the engine's chat template or image processor "
            f"differs from local_dir's")


def route_path(engine_body: dict) -> str:
    """The engine API a body is for: chat when it carries messages (images), else completions."""
    return "/v1/chat/completions" if "messages" in engine_body else "/v1/completions"


def as_completion_choice(choice: dict) -> dict:
    """A chat choice (delta or message) as a completions choice, which the relay and shapes read."""
    if "text" in choice:
        return choice
    part = choice.get("delta") or choice.get("message") or {}
    out = {k: v for k, v in choice.items() if k not in ("delta", "message")}
    out["text"] = part.get("content") or ""
    return out


class ReadWatchdog:
    """Ends an engine stream that has sent nothing for `timeout_s`: one timer per stream, looked at
    when it could first be due, where aiohttp's sock_read moves one on every read. The relay sets
    `last` on each read; a stalled stream is closed, so its pending read fails."""

    def __init__(self, resp: aiohttp.ClientResponse, timeout_s: float):
        self.resp, self.timeout_s, self.loop = resp, timeout_s, asyncio.get_running_loop()
        self.last, self.fired = self.loop.time(), False
        self._handle = self.loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        idle = self.loop.time() - self.last
        if idle >= self.timeout_s:
            self.fired = True
            self.resp.close()
        else:
            self._handle = self.loop.call_later(self.timeout_s - idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(frozen=True)
class Instance:
    key: str
    url: str
    role: str  # prefill | decode | aggregated
    block_size: int = 16
    bootstrap_port: int | None = None  # SGLang prefill only


@dataclass
class Route:
    request_id: str
    mode: str  # disaggregated | aggregated
    decode: Instance
    prefill: Instance | None = None
    prefill_response: dict | None = None
    blocks: list[str] = field(default_factory=list)
    engine_request_ids: dict[str, str] = field(default_factory=dict)  # role -> the id the engine reported
    predicted_cached_blocks: int | None = None  # KV selection: leading blocks the chosen worker held
    block_size: int = 16
    expect_prompt: list[int] | None = None  # the ids the engine must report having run
    # Its consumer takes token chunks unparsed (Annotated.raw): a streamed completion. Set before
    # the relay is first read; the relay still parses the first chunk, and any with an error, a
    # usage (it rewrites those) or transfer params (kv_/ec_transfer_params: the client must not
    # see them).
    raw_chunks: bool = False
    prefill_failure: str | None = None  # SGLang: why the background prefill failed, if it did

    def headers(self) -> dict[str, str]:
        """Routing decisions, for clients and the suites. Engine ids are known once a stream is read."""
        h = {"x-request-id": self.request_id, "x-disagg-mode": self.mode, "x-disagg-decode-worker": self.decode.key}
        if self.prefill:
            h["x-disagg-prefill-worker"] = self.prefill.key
        if self.predicted_cached_blocks is not None:
            h["x-disagg-predicted-cached-blocks"] = str(self.predicted_cached_blocks)
            h["x-disagg-block-size"] = str(self.block_size)
        for role, engine_id in self.engine_request_ids.items():
            h[f"x-disagg-{role}-engine-request-id"] = engine_id
        return h


class RoutedEngine:
    def __init__(self, model: str, *, selection: str = "round_robin", protocol: str = "vllm",
                 timeout_s: float = 120.0, metrics: FrontendMetrics | None = None):
        if protocol not in ("vllm", "sglang", "shared-storage"):
            raise ValueError(f"protocol {protocol!r} must be 'vllm', 'sglang' or 'shared-storage'")
        if selection not in ("round_robin", "kv"):
            raise ValueError(f"selection {selection!r} must be 'round_robin' or 'kv'")
        self.model, self.selection, self.protocol = model, selection, protocol
        # A prefill answers whole within timeout_s. A decode stream may run for minutes while each
        # token arrives promptly: it must answer within timeout_s and then never go timeout_s
        # without a byte (ReadWatchdog). aiohttp's sock_read would do the same by moving a timer
        # on every read; the watchdog's one timer per stream also lets the error say what happened.
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=5.0)
        self.stream_timeout = aiohttp.ClientTimeout(total=None, connect=5.0)
        self._instances: dict[str, Instance] = {}
        self._pools: dict[tuple[str, ...], tuple[Instance, ...]] = {}  # instances(), by roles
        self._lock = threading.Lock()
        # One round-robin turn per pool: with one shared turn, a request's prefill pick and decode
        # pick took every other turn, and with one prefill and two decoders every decode went to
        # the same one (found by the kill-under-load check: no stream was on the killed decode).
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self.load: dict[str, int] = {}  # decode (or aggregated) streams open, by worker
        self.prefilling: dict[str, int] = {}  # prefill requests open, by worker
        self.metrics = metrics or FrontendMetrics()
        self.kv = KvIndex()
        self._background: set[asyncio.Task] = set()

    # ---- membership (called from the discovery thread)

    def add(self, instance: Instance) -> None:
        with self._lock:
            self._instances[instance.key] = instance
            self._pools = {}

    def remove(self, key: str) -> None:
        with self._lock:
            self._instances.pop(key, None)
            self._pools = {}
        self.kv.forget(key)

    def in_flight(self) -> list[tuple[str, str, int]]:
        """(worker, role, requests open on it) for every worker this router has used or knows."""
        with self._lock:
            role_of = {k: i.role for k, i in self._instances.items()}
            known = set(role_of)
        out = [(k, "prefill", self.prefilling.get(k, 0)) for k in sorted(set(self.prefilling) | {
            k for k in known if role_of[k] == "prefill"})]
        out += [(k, role_of.get(k, "decode"), self.load.get(k, 0)) for k in sorted(set(self.load) | {
            k for k in known if role_of[k] != "prefill"})]
        return out

    def instances(self, *roles: str) -> tuple[Instance, ...]:
        """The workers in these roles (all without roles). Every request asks this twice or three
        times; membership changes seldom, so each pool is built once per change."""
        if (pool := self._pools.get(roles)) is not None:
            return pool
        with self._lock:
            pool = self._pools[roles] = tuple(i for i in self._instances.values() if not roles or i.role in roles)
            return pool

    # ---- selection

    def _pick(self, candidates: tuple[Instance, ...], blocks: list[str], pool: str) -> Instance:
        if self.selection == "kv":
            keys = [c.key for c in candidates]
            best = self.kv.best(keys, blocks, self.load)
            return next(c for c in candidates if c.key == best)
        return candidates[next(self._rr[pool]) % len(candidates)]

    def route(self, prompt: Prompt | list[int], request_id: str) -> Route:
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        decoders = self.instances("decode", "aggregated")
        if not decoders:
            raise NoWorkers(f"model {self.model!r} has no decode or aggregated worker")
        block_size = decoders[0].block_size
        blocks = block_hashes(prompt.token_ids, block_size, self.hashed_media(prompt)) if self.selection == "kv" else []
        prefills = self.instances("prefill")
        # In disaggregation the prefix cache that matters is the prefill's; decode goes by load.
        decode = self._pick(decoders, [] if prefills else blocks, "decode")
        # A worker registered as aggregated runs the whole request itself: it has no KV connector
        # to pull a prefill's blocks (vLLM: "Got kv_transfer_params, but no KVConnector found"), so
        # a prefill for it is wasted, and its blocks stay pinned on the prefill until their lease
        # ends (each such request counts as a kv_expired_request there). On vLLM CPU this also
        # stalled the aggregated engine: a 4-token request took 31.9 s while the prefill held
        # blocks nobody would read, 0.6 s otherwise (docs/design.md, "Aggregated workers").
        prefill = self._pick(prefills, blocks, "prefill") if prefills and decode.role != "aggregated" else None
        route = Route(request_id, "disaggregated" if prefill else "aggregated", decode, prefill, blocks=blocks,
                      block_size=block_size)
        if self.selection == "kv":
            route.predicted_cached_blocks = self.kv.overlap((prefill or decode).key, blocks)
            self.kv.record((prefill or decode).key, blocks)
            self.metrics.kv_selected(self.model, (prefill or decode).key, len(blocks), route.predicted_cached_blocks)
        return route

    # ---- the request

    def _headers(self, request_id: str) -> dict[str, str]:
        return {"X-Request-Id": request_id, "Content-Type": "application/json"}

    async def start(self, client: aiohttp.ClientSession, body: dict, prompt: Prompt | list[int], request_id: str,
                    *, usage: bool = True) -> tuple[Route, AsyncIterator[Annotated]]:
        """Route, run the prefill (if any), open the decode stream. Errors before streaming raise.
        `usage`: the decode's stream ends with a usage chunk. A caller whose client will not see
        it says False: the engine writes one chunk less and the relay parses none (its bytes
        then pass through to the end)."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        route = self.route(prompt, request_id)
        engine_body = {**body, "model": self.model, "stream": True}
        if usage:
            engine_body["stream_options"] = {"include_usage": True, "continuous_usage_stats": False}
        if prompt.messages is None:
            engine_body["prompt"] = prompt.token_ids
        else:  # images: the engine's chat API (route_path), asked to show the prompt it ran (SGLang cannot)
            engine_body["messages"] = prompt.messages
            if self.protocol != "sglang":
                engine_body["return_token_ids"] = True
                route.expect_prompt = prompt.token_ids
        if route.prefill and self.protocol == "sglang":
            return route, self._relay(route, await self._sglang(client, route, engine_body))
        if route.prefill:
            route.prefill_response = await self._prefill(client, route, engine_body)
            finish = (route.prefill_response.get("choices") or [{}])[0].get("finish_reason")
            if finish != "length":  # stop or EOS on the first token: the prefill's answer is final
                return route, self._single(route.prefill_response)
            ktp = self.decode_kv_transfer_params(route.prefill_response.get("kv_transfer_params"))
            if ktp is not None:
                engine_body["kv_transfer_params"] = ktp
        stream = await self._open(client, route.decode, engine_body, self.decode_request_id(route))
        return route, self._relay(route, stream)

    # Extension points (the suite's planted bugs, fixtures/planted_router.py, override them).

    def decode_kv_transfer_params(self, from_prefill: dict | None) -> dict | None:
        """What the decode request carries: exactly what the prefill returned."""
        return from_prefill

    def decode_request_id(self, route: Route) -> str:
        """The decode runs under the client's request id, as the prefill did."""
        return route.request_id

    def reported_usage(self, prefill_usage: dict, decode_usage: dict) -> dict:
        """The client's usage: the decode's counts, with the prefill's prompt_tokens_details (SPEC
        §4.1), since the prefill's prefix cache is the one the prompt was computed against."""
        if prefill_usage.get("prompt_tokens_details") is None:
            return decode_usage
        return {**decode_usage, "prompt_tokens_details": prefill_usage["prompt_tokens_details"]}

    def hashed_media(self, prompt: Prompt) -> list[tuple[int, int, bytes]]:
        """The image spans that enter the block hashes: every image, over the blocks it covers."""
        return [(m.start, m.end, m.content_hash) for m in prompt.media]

    def engine_chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The engine stream's bytes as they arrive (several events or part of one), read as the
        client reads them: a client that stops, stops it."""
        return resp.content.iter_any()

    def stream_closed(self, route: Route, finished: bool) -> None:
        """The decode stream no longer counts toward its worker's load and in-flight count."""
        self.load[route.decode.key] = max(0, self.load.get(route.decode.key, 1) - 1)

    async def release(self, resp: aiohttp.ClientResponse, finished: bool) -> None:
        """Done with an engine stream. A stream that ended with [DONE] hands its connection back
        for the next request; any other is closed, which aborts the engine's request: this is how
        a client that left stops the decode."""
        if finished:
            await resp.read()  # the chunked terminator, so the connection can be reused
            resp.release()
        else:
            resp.close()

    async def _post_json(self, client: aiohttp.ClientSession, url: str, body: dict, request_id: str
                         ) -> tuple[int, bytes]:
        async with client.post(url, data=dumps(body), headers=self._headers(request_id),
                               timeout=self.timeout) as resp:
            return resp.status, await resp.read()

    def prefill_body(self, engine_body: dict) -> dict:
        """The prefill's copy of the request (SPEC §4.1): one token, unstreamed, a remote decode asked for."""
        body = dict(engine_body)  # every change below is to a top-level key; nested values are only read
        body.update(stream=False, max_tokens=1, kv_transfer_params=dict(PREFILL_KV_TRANSFER_PARAMS))
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        body.pop("stream_options", None)
        body.pop("min_tokens", None)  # restored for decode: it is only in engine_body
        return body

    async def _prefill(self, client: aiohttp.ClientSession, route: Route, engine_body: dict) -> dict:
        body = self.prefill_body(engine_body)
        url = f"{route.prefill.url}{route_path(body)}"
        # Shielded: a client that disconnects during prefill must not abort it, or its KV blocks leak.
        key = route.prefill.key
        self.prefilling[key] = self.prefilling.get(key, 0) + 1
        task = self._keep(self._post_json(client, url, body, route.request_id))
        # It is open on the prefill until the prefill answers, whether or not the client waits.
        task.add_done_callback(lambda _: self.prefilling.__setitem__(key, max(0, self.prefilling.get(key, 1) - 1)))
        try:
            status, raw = await asyncio.shield(task)
        except ENGINE_ERRORS as exc:
            raise PrefillError(f"prefill worker {route.prefill.key} at {route.prefill.url} failed: "
                               f"{type(exc).__name__}: {exc}") from None
        if status != 200:
            raise PrefillError(f"prefill worker {route.prefill.key} answered HTTP {status}: "
                               f"{raw[:300].decode(errors='replace')}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise PrefillError(f"prefill worker {route.prefill.key} answered with no JSON: {raw[:300]!r}") from None
        data["choices"] = [as_completion_choice(c) for c in data.get("choices") or []]
        route.engine_request_ids["prefill"] = str(data.get("id"))
        if route.expect_prompt is not None and data.get("prompt_token_ids") is not None:
            if (why := prompt_mismatch(route.prefill, route.expect_prompt, data["prompt_token_ids"])):
                raise PromptMismatch(why)
        finish = (data.get("choices") or [{}])[0].get("finish_reason")
        ktp = data.get("kv_transfer_params")
        usable = isinstance(ktp, dict) and ktp.get("remote_block_ids") is not None
        if finish == "length" and not usable and self.protocol == "vllm":
            raise PrefillError(f"prefill worker {route.prefill.key} returned no usable kv_transfer_params "
                               f"({ktp!r}); refusing to re-run prefill on the decode worker")
        return data

    def _keep(self, coro) -> asyncio.Task:
        """A task that outlives its caller's cancellation; referenced until done, so it is not collected."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _open(self, client: aiohttp.ClientSession, instance: Instance, body: dict, request_id: str
                    ) -> aiohttp.ClientResponse:
        """Open the decode stream. Counts toward the worker's load until `_relay` closes it."""
        self.load[instance.key] = self.load.get(instance.key, 0) + 1
        # Its answer (status and headers) must come within timeout_s: one timer that cancels this
        # task, cheaper than asyncio.timeout's on a path every request takes, and a message that
        # says what happened.
        task, expired = asyncio.current_task(), []
        timer = asyncio.get_running_loop().call_later(self.timeout_s, lambda: expired.append(task.cancel()))
        try:
            try:
                resp = await client.post(f"{instance.url}{route_path(body)}", data=dumps(body),
                                         headers=self._headers(request_id), timeout=self.stream_timeout)
            except asyncio.CancelledError:
                if not expired:
                    raise
                task.uncancel()
                raise DecodeError(f"{instance.role} worker {instance.key} at {instance.url} did not answer "
                                  f"within {self.timeout_s:g} s") from None
            except ENGINE_ERRORS as exc:
                raise DecodeError(f"{instance.role} worker {instance.key} at {instance.url} failed: "
                                  f"{type(exc).__name__}: {exc}") from None
            finally:
                timer.cancel()
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")[:300]
                resp.close()
                raise DecodeError(f"{instance.role} worker {instance.key} answered HTTP {resp.status}: {text}")
        except BaseException:
            self.load[instance.key] -= 1  # no stream was opened: it carries no load
            raise
        return resp

    async def _relay(self, route: Route, resp: aiohttp.ClientResponse) -> AsyncIterator[Annotated]:
        """Engine SSE -> annotated items. A worker that dies mid-stream becomes an error item."""
        prefill_usage = ((route.prefill_response or {}).get("usage") or {})
        finished, pending = False, b""
        passthrough = route.raw_chunks and route.expect_prompt is None
        # Token chunks pass through unparsed from the first (the consumer learns the engine's id from
        # their bytes); a stream that is not passed through is parsed chunk by chunk.
        fast = passthrough
        watchdog = ReadWatchdog(resp, self.timeout_s)
        now = watchdog.loop.time
        try:
            async for data in self.engine_chunks(resp):
                watchdog.last = now()
                buf = pending + data if pending else data
                if fast:  # this runs on every read of every stream
                    end = len(buf) if buf.endswith(b"\n\n") else buf.rfind(b"\n\n") + 2
                    events = buf if end == len(buf) else buf[:end]
                    cut = parsed_from(events) if end > 1 else 0
                    if cut < 0:
                        pending = buf[end:]
                        yield Annotated(raw=events, flush=True)  # every whole event of this read: token chunks
                        continue
                    # The events before the first marked one are token chunks still (a stream's last
                    # read brings its last tokens with [DONE]): they pass through; the rest is parsed.
                    if cut > 0:
                        yield Annotated(raw=events[:cut])
                        buf = buf[cut:]
                *lines, pending = buf.split(b"\n")
                raw: list[bytes] = []  # token events of this read passed through unparsed, in order
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        if raw:
                            yield Annotated(raw=b"".join(raw))
                        finished = True
                        return
                    if fast and not any(mark in payload for mark in PARSED_MARKS):
                        raw.append(b"data: " + payload + b"\n\n")  # a token chunk: nothing here reads it
                        continue
                    if raw:
                        yield Annotated(raw=b"".join(raw))
                        raw = []
                    chunk = orjson.loads(payload)
                    route.engine_request_ids.setdefault("decode", str(chunk.get("id")))
                    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                        self.metrics.error(self.model, "stream_failed")
                        yield Annotated.failure(f"{route.decode.role} worker {route.decode.key}: {chunk['error']}")
                        return
                    chunk["choices"] = [as_completion_choice(c) for c in chunk.get("choices") or []]
                    if route.expect_prompt is not None and chunk.get("prompt_token_ids") is not None:
                        if (why := prompt_mismatch(route.decode, route.expect_prompt, chunk.pop("prompt_token_ids"))):
                            self.metrics.error(self.model, "prompt_mismatch")
                            yield Annotated.failure(why)
                            return
                    if chunk.get("usage") and route.prefill_response is not None:
                        chunk["usage"] = self.reported_usage(prefill_usage, chunk["usage"])
                    yield Annotated(data=chunk, id=route.request_id)
                # What arrived together leaves together: one write for the client, not one per token.
                yield Annotated(raw=b"".join(raw), flush=True) if raw else FLUSH
            self.metrics.error(self.model, "stream_failed")
            yield Annotated.failure(route.prefill_failure or f"{route.decode.role} worker {route.decode.key} " + (
                f"sent nothing for {self.timeout_s:g} s" if watchdog.fired else "closed the stream before [DONE]"))
        except (*ENGINE_ERRORS, orjson.JSONDecodeError) as exc:
            self.metrics.error(self.model, "stream_failed")
            why = (f"sent nothing for {self.timeout_s:g} s" if watchdog.fired
                   else f"{type(exc).__name__}: {exc or 'connection lost'}")
            yield Annotated.failure(route.prefill_failure or f"{route.decode.role} worker {route.decode.key} at "
                                    f"{route.decode.url} failed mid-stream: {why}")
        finally:
            watchdog.cancel()
            self.stream_closed(route, finished)
            await self.release(resp, finished)  # unfinished (the client left): this aborts the decode request

    async def _single(self, response: dict) -> AsyncIterator[Annotated]:
        choice = dict((response.get("choices") or [{}])[0])
        yield Annotated(data={**response, "choices": [choice], "kv_transfer_params": None}, id=response.get("id"))

    async def _sglang(self, client: aiohttp.ClientSession, route: Route, engine_body: dict) -> aiohttp.ClientResponse:
        """Bootstrap-style: both at once, same room; the prefill runs in the background. A prefill
        that fails ends the request: SGLang's decode would wait for KV that never comes (sglang
        0.5.23 on CPU behind sglang-router 0.3.2, which does not do this: no answer in 30 s). Before
        the decode answers, the client gets the prefill's error; after, the decode stream is closed
        (which aborts the decode) and the client's stream ends with it."""
        room = random.randrange(2**63)
        bootstrap = {"bootstrap_host": urllib.parse.urlsplit(route.prefill.url).hostname,
                     "bootstrap_port": route.prefill.bootstrap_port, "bootstrap_room": room}
        prefill_body = {**engine_body, **bootstrap, "stream": False}
        prefill_body.pop("stream_options", None)
        prefill = self._keep(self._post_json(client, f"{route.prefill.url}{route_path(prefill_body)}", prefill_body,
                                             route.request_id))
        opening = asyncio.ensure_future(self._open(client, route.decode, {**engine_body, **bootstrap},
                                                   route.request_id))
        try:
            await asyncio.wait({prefill, opening}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            opening.cancel()
            raise
        if prefill.done() and (why := self._sglang_prefill_failure(route, prefill)):
            opening.cancel()  # a decode request still waiting for its answer is dropped, which aborts it
            with contextlib.suppress(asyncio.CancelledError, RoutingError):
                resp = await opening
                resp.close()
            raise PrefillError(why)
        resp = await opening

        def prefill_done(task: asyncio.Task) -> None:
            if why := self._sglang_prefill_failure(route, task):
                route.prefill_failure = why
                resp.close()  # the relay's next read fails, and says why

        prefill.add_done_callback(prefill_done)
        return resp

    def _sglang_prefill_failure(self, route: Route, task: asyncio.Task) -> str | None:
        """Why an SGLang prefill failed (it could not run, or answered an error), or None."""
        if task.cancelled():
            return None
        if (exc := task.exception()) is not None:
            return (f"prefill worker {route.prefill.key} at {route.prefill.url} failed: {type(exc).__name__}: {exc}; "
                    f"the decode would wait for its KV")
        status, raw = task.result()
        if status != 200:
            return (f"prefill worker {route.prefill.key} answered HTTP {status}: {raw[:300].decode(errors='replace')}; "
                    f"the decode would wait for its KV")
        return None
