"""The routed engine: a prefill router in front of decode workers, with aggregated fallback.

vLLM protocol (SPEC §4.1): a copy of the request goes to a prefill worker with max_tokens=1 and
`kv_transfer_params.do_remote_decode`; the original then goes to a decode worker with the
`kv_transfer_params` the prefill returned, and the decode stream comes back. Both carry the same
`X-Request-Id`. With no prefill worker the request goes to a decode worker unchanged.
SGLang protocol (SPEC §4.2): prefill and decode are sent at once with one bootstrap room.
Shared-storage protocol (vLLM's ExampleConnector): as vLLM's, but the KV moves through storage
keyed by the prompt, so the prefill returns no `kv_transfer_params` and none are required.

Engines are spoken to through their OpenAI `/v1/completions` with the token ids the frontend's
own preprocessor produced, so what the engine runs is exactly what the frontend routed on.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

from harness.errors import HarnessError
from harness.frontend.kv_index import KvIndex, block_hashes
from harness.frontend.stream import Annotated

log = logging.getLogger(__name__)

# The prefill request's kv_transfer_params, exactly as vLLM's disaggregated proxy sends them.
PREFILL_KV_TRANSFER_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                              "remote_block_ids": None, "remote_host": None, "remote_port": None}



class RoutingError(HarnessError):
    status = 502


class NoWorkers(RoutingError):
    status = 503


class PrefillError(RoutingError):
    """The prefill failed or returned no usable kv_transfer_params; decode is not tried."""


class DecodeError(RoutingError):
    pass


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

    def headers(self) -> dict[str, str]:
        """Routing decisions, for clients and the suites. Engine ids are known once a stream is read."""
        h = {"x-request-id": self.request_id, "x-disagg-mode": self.mode, "x-disagg-decode-worker": self.decode.key}
        if self.prefill:
            h["x-disagg-prefill-worker"] = self.prefill.key
        for role, engine_id in self.engine_request_ids.items():
            h[f"x-disagg-{role}-engine-request-id"] = engine_id
        return h


class RoutedEngine:
    def __init__(self, model: str, *, selection: str = "round_robin", protocol: str = "vllm",
                 timeout_s: float = 120.0):
        if protocol not in ("vllm", "sglang", "shared-storage"):
            raise ValueError(f"protocol {protocol!r} must be 'vllm', 'sglang' or 'shared-storage'")
        if selection not in ("round_robin", "kv"):
            raise ValueError(f"selection {selection!r} must be 'round_robin' or 'kv'")
        self.model, self.selection, self.protocol = model, selection, protocol
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._instances: dict[str, Instance] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self.load: dict[str, int] = {}
        self.kv = KvIndex()
        self._background: set[asyncio.Task] = set()

    # ---- membership (called from the discovery thread)

    def add(self, instance: Instance) -> None:
        with self._lock:
            self._instances[instance.key] = instance

    def remove(self, key: str) -> None:
        with self._lock:
            self._instances.pop(key, None)
        self.kv.forget(key)

    def instances(self, *roles: str) -> list[Instance]:
        with self._lock:
            return [i for i in self._instances.values() if not roles or i.role in roles]

    # ---- selection

    def _pick(self, candidates: list[Instance], blocks: list[str]) -> Instance:
        if self.selection == "kv":
            keys = [c.key for c in candidates]
            best = self.kv.best(keys, blocks, self.load)
            return next(c for c in candidates if c.key == best)
        return candidates[next(self._rr) % len(candidates)]

    def route(self, token_ids: list[int], request_id: str) -> Route:
        decoders = self.instances("decode", "aggregated")
        if not decoders:
            raise NoWorkers(f"model {self.model!r} has no decode or aggregated worker")
        block_size = decoders[0].block_size
        blocks = block_hashes(token_ids, block_size) if self.selection == "kv" else []
        prefills = self.instances("prefill")
        prefill = self._pick(prefills, blocks) if prefills else None
        # In disaggregation the prefix cache that matters is the prefill's; decode goes by load.
        decode = self._pick(decoders, [] if prefill else blocks)
        route = Route(request_id, "disaggregated" if prefill else "aggregated", decode, prefill, blocks=blocks)
        if self.selection == "kv":
            self.kv.record((prefill or decode).key, blocks)
        return route

    # ---- the request

    def _headers(self, request_id: str) -> dict[str, str]:
        return {"X-Request-Id": request_id}

    async def start(self, client: httpx.AsyncClient, body: dict, token_ids: list[int], request_id: str
                    ) -> tuple[Route, AsyncIterator[Annotated]]:
        """Route, run the prefill (if any), open the decode stream. Errors before streaming raise."""
        route = self.route(token_ids, request_id)
        engine_body = {**body, "model": self.model, "prompt": token_ids, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
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

    def engine_lines(self, resp: httpx.Response) -> AsyncIterator[str]:
        """The engine stream's lines, read as the client reads them: a client that stops, stops it."""
        return resp.aiter_lines()

    async def release(self, resp: httpx.Response) -> None:
        """Close an engine stream; a client that left aborts the engine's request this way."""
        await resp.aclose()

    async def _prefill(self, client: httpx.AsyncClient, route: Route, engine_body: dict) -> dict:
        body = copy.deepcopy(engine_body)
        body.update(stream=False, max_tokens=1, kv_transfer_params=dict(PREFILL_KV_TRANSFER_PARAMS))
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        body.pop("stream_options", None)
        body.pop("min_tokens", None)  # restored for decode: it is only in engine_body
        url = f"{route.prefill.url}/v1/completions"
        # Shielded: a client that disconnects during prefill must not abort it, or its KV blocks leak.
        task = self._keep(client.post(url, json=body, headers=self._headers(route.request_id), timeout=self.timeout))
        try:
            resp = await asyncio.shield(task)
        except httpx.HTTPError as exc:
            raise PrefillError(f"prefill worker {route.prefill.key} at {route.prefill.url} failed: "
                               f"{type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise PrefillError(f"prefill worker {route.prefill.key} answered HTTP {resp.status_code}: "
                               f"{resp.text[:300]}")
        data = resp.json()
        route.engine_request_ids["prefill"] = str(data.get("id"))
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

    async def _open(self, client: httpx.AsyncClient, instance: Instance, body: dict, request_id: str) -> httpx.Response:
        """Open the decode stream. Counts toward the worker's load until `_relay` closes it."""
        request = client.build_request("POST", f"{instance.url}/v1/completions", json=body,
                                       headers=self._headers(request_id), timeout=self.timeout)
        self.load[instance.key] = self.load.get(instance.key, 0) + 1
        try:
            try:
                resp = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise DecodeError(f"{instance.role} worker {instance.key} at {instance.url} failed: "
                                  f"{type(exc).__name__}: {exc}") from None
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                await resp.aclose()
                raise DecodeError(f"{instance.role} worker {instance.key} answered HTTP {resp.status_code}: {text}")
        except BaseException:
            self.load[instance.key] -= 1  # no stream was opened: it carries no load
            raise
        return resp

    async def _relay(self, route: Route, resp: httpx.Response) -> AsyncIterator[Annotated]:
        """Engine SSE -> annotated items. A worker that dies mid-stream becomes an error item."""
        prefill_usage = ((route.prefill_response or {}).get("usage") or {})
        try:
            async for line in self.engine_lines(resp):
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                route.engine_request_ids.setdefault("decode", str(chunk.get("id")))
                if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                    yield Annotated.failure(f"{route.decode.role} worker {route.decode.key}: {chunk['error']}")
                    return
                if chunk.get("usage") and prefill_usage.get("prompt_tokens_details") is not None:
                    chunk["usage"]["prompt_tokens_details"] = prefill_usage["prompt_tokens_details"]
                yield Annotated(data=chunk, id=route.request_id)
            yield Annotated.failure(f"{route.decode.role} worker {route.decode.key} closed the stream "
                                    f"before [DONE]")
        except httpx.HTTPError as exc:
            yield Annotated.failure(f"{route.decode.role} worker {route.decode.key} at {route.decode.url} failed "
                                    f"mid-stream: {type(exc).__name__}: {exc or 'connection lost'}")
        finally:
            self.load[route.decode.key] = max(0, self.load.get(route.decode.key, 1) - 1)
            await self.release(resp)  # on client disconnect this aborts the decode request

    async def _single(self, response: dict) -> AsyncIterator[Annotated]:
        choice = dict((response.get("choices") or [{}])[0])
        yield Annotated(data={**response, "choices": [choice], "kv_transfer_params": None}, id=response.get("id"))

    async def _sglang(self, client: httpx.AsyncClient, route: Route, engine_body: dict) -> httpx.Response:
        """Bootstrap-style: both at once, same room; the prefill runs in the background."""
        room = random.randrange(2**63)
        bootstrap = {"bootstrap_host": httpx.URL(route.prefill.url).host,
                     "bootstrap_port": route.prefill.bootstrap_port, "bootstrap_room": room}
        prefill_body = {**engine_body, **bootstrap, "stream": False}
        prefill_body.pop("stream_options", None)
        self._keep(client.post(f"{route.prefill.url}/v1/completions", json=prefill_body,
                               headers=self._headers(route.request_id), timeout=self.timeout))
        return await self._open(client, route.decode, {**engine_body, **bootstrap}, route.request_id)
