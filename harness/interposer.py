"""Interposed engines: a relay of the suite's own between a router under test and one engine.

A router that takes its engines' URLs (vllm-router, SGLang's router, vLLM's example proxy, most
gateways) is given the relay's URL instead. The relay passes every request through to the real
engine, streams included, and so it sees what the router sent each engine, in order: path,
`X-Request-Id` and the other headers, the JSON body (`max_tokens`, `stream`,
`kv_transfer_params`, SGLang's bootstrap fields), and for a non-streamed answer the engine's JSON
(the prefill's `kv_transfer_params`). That is evidence about any router, without touching it.

On the suite's command it also stands in for a broken worker, on the generation APIs only
(`/health`, `/metrics`, `/v1/models` pass through):
- `refuse`: a dead worker. The listener is closed (new connections are refused) and a request on a
  connection the router kept open is reset; `/health` goes too;
- `http_error`: a failing worker, answering HTTP `status` with vLLM's error shape;
- `cut_stream`: a decode dying mid-stream, the connection reset after `after_events` SSE events;
- `end_stream`: the same, but the response ends cleanly after `after_events` events, with no
  `data: [DONE]`;
- `stall`: a hung worker, holding the request unanswered until the fault is cleared;
- `delay`: a slow worker, forwarding after `seconds` (a client can leave during the prefill);
- `strip_kv_transfer_params`: a prefill that answers 200 with `kv_transfer_params: null`, as a
  worker without a KV connector does.

The suite talks to a relay through its control server (`InterposedEngine`, a client of it), so a
relay the suite started and one run by `python -m harness interpose` are the same to the checks.
Control API: `GET /` (role, urls, fault), `GET /exchanges?since=N`, `PUT /fault` (JSON), `DELETE
/fault`. It is test tooling: the reference frontend never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import aiohttp
import orjson
import requests
from aiohttp import web

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate", "/v1/generate")
FAULTS = ("refuse", "http_error", "cut_stream", "end_stream", "stall", "delay", "strip_kv_transfer_params")
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
              "trailer", "proxy-connection", "content-encoding"}
MAX_EXCHANGES = 2000  # the oldest are dropped: a relay in a long run keeps a bounded record
STALL_LIMIT_S = 600.0  # a stall ends by itself at the latest after this


class InterposerError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    after_events: int = 5
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise InterposerError(f"unknown fault {self.kind!r}; known: {', '.join(FAULTS)}")
        if not 100 <= self.status <= 599 or self.after_events < 0 or self.seconds < 0:
            raise InterposerError(f"fault {self.kind}: status must be an HTTP status, after_events and seconds "
                                  f"not negative (got {self.status}, {self.after_events}, {self.seconds})")

    @classmethod
    def from_json(cls, data: Any) -> "Fault":
        if not isinstance(data, dict) or "kind" not in data:
            raise InterposerError(f"a fault is a JSON object with a 'kind' ({', '.join(FAULTS)}); got {data!r:.100}")
        unknown = set(data) - {"kind", "status", "after_events", "seconds"}
        if unknown:
            raise InterposerError(f"fault fields {sorted(unknown)} are unknown; known: kind, status, after_events, "
                                  f"seconds")
        try:
            return cls(data["kind"], int(data.get("status", 500)), int(data.get("after_events", 5)),
                       float(data.get("seconds", 0.0)))
        except (TypeError, ValueError) as exc:
            raise InterposerError(f"fault {data!r:.100}: {exc}") from None


@dataclass
class Exchange:
    """One request the router sent this engine, and what came of it."""

    seq: int
    role: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the JSON body, or None
    started: float  # time.time()
    status: int | None = None
    response: Any = None  # a non-streamed JSON answer (a prefill's, with its kv_transfer_params)
    events: int = 0  # SSE data events passed on
    done: bool = False  # `data: [DONE]` passed on
    fault: str | None = None  # the fault this request met
    router_left: bool = False  # the router closed the connection before the answer ended
    upstream_error: str | None = None
    ended: float | None = None
    first_event: float | None = None  # time.time() the first SSE data event passed on (a decode's first token)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")


def is_generation(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/") in GENERATION_PATHS


def error_body(status: int, message: str) -> bytes:
    """vLLM's error shape, so a router parses it as it would the engine's."""
    return orjson.dumps({"error": {"message": message, "type": "InterposedFault", "code": status},
                         "object": "error", "message": message, "code": status})


class Interposer:
    """The relay for one engine, with its control server; both on 127.0.0.1 in a thread of their own."""

    def __init__(self, role: str, upstream: str, host: str = "127.0.0.1", port: int = 0, control_port: int = 0):
        self.role, self.upstream, self.host = role, upstream.rstrip("/"), host
        self._data_sock = self._bind(port)
        self._control_sock = self._bind(control_port)
        self.port = self._data_sock.getsockname()[1]
        self.control_port = self._control_sock.getsockname()[1]
        self.fault: Fault | None = None
        self._exchanges: list[Exchange] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._site: web.BaseSite | None = None
        self._cleared: asyncio.Event | None = None

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        return sock

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    # ---- lifecycle

    def start(self, timeout_s: float = 30.0) -> "Interposer":
        self._thread = threading.Thread(target=self._run, name=f"interposer-{self.role}:{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"interposer for {self.role} on {self.url} did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._data_sock.close()
        self._control_sock.close()

    def __enter__(self) -> "Interposer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _setup(self) -> list[web.AppRunner]:
        self._cleared = asyncio.Event()
        # Idle connections dropped before the engine drops them (vLLM: 5 s; see frontend/server.py).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
                                              auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None, connect=10))
        data = web.Application(client_max_size=64 * 2**20)
        data.router.add_route("*", "/{tail:.*}", self._relay)
        control = web.Application()
        control.router.add_get("/", self._describe)
        control.router.add_get("/exchanges", self._list)
        control.router.add_put("/fault", self._put_fault)
        control.router.add_delete("/fault", self._delete_fault)
        runners = []
        for app in (data, control):
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            runners.append(runner)
        self._data_runner = runners[0]
        self._site = web.SockSite(runners[0], self._data_sock)
        await self._site.start()
        await web.SockSite(runners[1], self._control_sock).start()
        return runners

    async def _teardown(self, runners: list[web.AppRunner]) -> None:
        for runner in reversed(runners):
            await runner.cleanup()
        await self._session.close()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            runners = self._loop.run_until_complete(self._setup())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._teardown(runners))
            self._loop.close()

    # ---- faults

    async def _apply(self, fault: Fault | None) -> None:
        was = self.fault
        self.fault = fault
        if was is not None and was.kind == "stall":
            self._cleared.set()
        if fault is not None and fault.kind == "stall":
            self._cleared = asyncio.Event()
        refusing = fault is not None and fault.kind == "refuse"
        if refusing and self._site is not None:
            await self._site.stop()  # the listener closes: new connections are refused
            self._data_sock.close()
            self._site = None
        elif not refusing and self._site is None:
            self._data_sock = self._bind(self.port)
            self._site = web.SockSite(self._data_runner, self._data_sock)
            await self._site.start()

    def set_fault(self, fault: Fault | None) -> None:
        """From any thread: stand in for a broken worker (None: a healthy one again)."""
        asyncio.run_coroutine_threadsafe(self._apply(fault), self._loop).result(timeout=10)

    # ---- the record

    def _begin(self, request: web.Request, body: bytes) -> Exchange:
        parsed = None
        if body and "json" in (request.content_type or ""):
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(body)
        with self._lock:
            self._seq += 1
            ex = Exchange(self._seq, self.role, request.method, request.rel_url.path,
                          {k.lower(): v for k, v in request.headers.items()}, parsed, time.time())
            self._exchanges.append(ex)
            del self._exchanges[:-MAX_EXCHANGES]
        return ex

    def exchanges(self, since: int = 0) -> list[Exchange]:
        with self._lock:
            return [e for e in self._exchanges if e.seq > since]

    def mark(self) -> int:
        with self._lock:
            return self._seq

    # ---- the relay

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ex = self._begin(request, body)
        fault = self.fault if is_generation(request.method, ex.path) or (self.fault and self.fault.kind == "refuse") \
            else None
        try:
            if fault is not None:
                ex.fault = fault.kind
                if fault.kind == "refuse":  # a request on a connection the router kept from before
                    return self._reset(request, ex)
                if fault.kind == "http_error":
                    ex.status = fault.status
                    return web.Response(body=error_body(fault.status, f"interposed fault: the {self.role} worker "
                                                                      f"answers HTTP {fault.status}"),
                                        status=fault.status, content_type="application/json")
                if fault.kind == "stall":
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._cleared.wait(), fault.seconds or STALL_LIMIT_S)
                    return self._reset(request, ex)
                if fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
            return await self._forward(request, body, ex, fault)
        except asyncio.CancelledError:
            ex.router_left = True
            raise
        finally:
            ex.ended = time.time()

    def _reset(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        ex.upstream_error = "reset by the interposer"
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more to write: the connection is gone

    async def _forward(self, request: web.Request, body: bytes, ex: Exchange, fault: Fault | None
                       ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await self._session.request(request.method, f"{self.upstream}{request.rel_url}",
                                                   headers=headers, data=body or None)
        except (aiohttp.ClientError, OSError) as exc:  # the engine itself is down: so is this worker
            ex.upstream_error = f"{type(exc).__name__}: {exc}"
            return self._reset(request, ex)
        try:
            ex.status = upstream.status
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if upstream.content_type != "text/event-stream":
                raw = await upstream.read()
                if "json" in upstream.content_type:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        ex.response = orjson.loads(raw)
                if fault is not None and fault.kind == "strip_kv_transfer_params" and isinstance(ex.response, dict):
                    raw = orjson.dumps({**ex.response, "kv_transfer_params": None})
                return web.Response(body=raw, status=upstream.status, headers=out_headers)
            return await self._stream(request, upstream, out_headers, ex, fault)
        finally:
            upstream.close()  # unfinished (the router left, or a cut): the engine's request is aborted

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse, headers: dict, ex: Exchange,
                      fault: Fault | None) -> web.StreamResponse:
        cut = fault if fault is not None and fault.kind in ("cut_stream", "end_stream") else None
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        pending = b""
        try:
            async for data in upstream.content.iter_any():
                *events, pending = (pending + data).split(b"\n\n")
                out = []
                for event in events:
                    out.append(event + b"\n\n")
                    if event.startswith(b"data:"):
                        ex.events += 1
                        ex.first_event = ex.first_event or time.time()
                        ex.done = ex.done or event.strip() == b"data: [DONE]"
                    if cut is not None and ex.events >= cut.after_events:
                        await resp.write(b"".join(out))
                        return await self._cut(request, resp, cut)
                if out:
                    await resp.write(b"".join(out))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # the engine died mid-stream: so does this
            ex.upstream_error = f"{type(exc).__name__}: {exc}"
            return self._reset(request, ex)
        if pending:
            await resp.write(pending)
        await resp.write_eof()
        return resp

    async def _cut(self, request: web.Request, resp: web.StreamResponse, cut: Fault) -> web.StreamResponse:
        if cut.kind == "end_stream":
            await resp.write_eof()  # a clean end, but no [DONE]
            return resp
        transport = request.transport
        for _ in range(100):  # what was written reaches the router before the reset
            if transport is None or transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError

    # ---- control

    def describe(self) -> dict:
        return {"role": self.role, "url": self.url, "upstream": self.upstream, "control_url": self.control_url,
                "fault": asdict(self.fault) if self.fault else None, "seq": self.mark()}

    async def _describe(self, _: web.Request) -> web.Response:
        return web.json_response(self.describe())

    async def _list(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be an integer"}, status=400)
        return web.Response(body=orjson.dumps({"exchanges": [asdict(e) for e in self.exchanges(since)]}),
                            content_type="application/json")

    async def _put_fault(self, request: web.Request) -> web.Response:
        try:
            fault = Fault.from_json(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, InterposerError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        await self._apply(fault)
        return web.json_response(self.describe())

    async def _delete_fault(self, _: web.Request) -> web.Response:
        await self._apply(None)
        return web.json_response(self.describe())


@dataclass
class InterposedEngine:
    """The suite's handle on one relay, through its control server (ours, or `harness interpose`'s)."""

    control_url: str
    role: str = ""
    url: str = ""  # what the router is given
    upstream: str = ""  # the engine behind it
    timeout_s: float = 10.0
    _described: bool = field(default=False, repr=False)

    def connect(self) -> "InterposedEngine":
        """Ask the relay who it is; an unreachable or wrong control URL is an error naming it."""
        try:
            info = requests.get(f"{self.control_url}/", timeout=self.timeout_s).json()
            self.role, self.url, self.upstream = info["role"], info["url"], info["upstream"]
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise InterposerError(f"{self.control_url} is not an interposer's control URL "
                                  f"({type(exc).__name__}: {exc}); `python -m harness interpose` prints them") from None
        self._described = True
        return self

    def mark(self) -> int:
        return int(requests.get(f"{self.control_url}/", timeout=self.timeout_s).json()["seq"])

    def exchanges(self, since: int = 0, generation_only: bool = True) -> list[Exchange]:
        data = requests.get(f"{self.control_url}/exchanges", params={"since": since}, timeout=self.timeout_s).json()
        out = [Exchange(**e) for e in data["exchanges"]]
        return [e for e in out if is_generation(e.method, e.path)] if generation_only else out

    def set_fault(self, kind: str | None, **params: Any) -> None:
        if kind is None:
            resp = requests.delete(f"{self.control_url}/fault", timeout=self.timeout_s)
        else:
            resp = requests.put(f"{self.control_url}/fault", json={"kind": kind, **params}, timeout=self.timeout_s)
        if resp.status_code != 200:
            raise InterposerError(f"{self.control_url}: setting fault {kind!r} {params}: HTTP {resp.status_code} "
                                  f"{resp.text[:200]}")

    @contextlib.contextmanager
    def fault(self, kind: str, **params: Any) -> Iterator["InterposedEngine"]:
        """Break this worker for the block; it is healthy again afterwards, whatever happened."""
        self.set_fault(kind, **params)
        try:
            yield self
        finally:
            self.set_fault(None)


def handle(interposer: Interposer) -> InterposedEngine:
    return InterposedEngine(interposer.control_url).connect()
