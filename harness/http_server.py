"""Run an ASGI app (uvicorn) or an aiohttp app in a background thread, on 127.0.0.1 and a free port.

The socket is bound before the thread starts, so the URL is known at once and never races.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class _BoundServer:
    """A socket bound on 127.0.0.1 before any thread starts, so the URL is known at once.
    `reuse_port`: SO_REUSEPORT, so that servers in several processes share one port, the kernel
    spreading connections over them (benchmarks/split_frontend.py)."""

    def __init__(self, host: str, port: int, name: str, reuse_port: bool = False):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.name = name
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BackgroundServer(_BoundServer):
    """An ASGI app under uvicorn (the fake engines, metadata and artifact servers)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "server", lifespan: str = "off"):
        super().__init__(host, port, name)
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"{self.name}:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=10)
        self._sock.close()


class BackgroundAiohttpServer(_BoundServer):
    """An aiohttp application on its own event loop (uvloop where installed) in a background
    thread; the socket is bound first, as above. A client that disconnects cancels its handler
    (`handler_cancellation`), so a relay learns at once that nobody reads its stream."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "server", reuse_port: bool = False):
        super().__init__(host, port, name, reuse_port)
        self.app = app
        self._loop = None
        self._runner = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        import asyncio

        from aiohttp import web

        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.SockSite(self._runner, self._sock).start())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

    def start(self, timeout_s: float = 30.0) -> "BackgroundAiohttpServer":
        self._thread = threading.Thread(target=self._run, name=f"{self.name}:{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"{self.name} on {self.url} did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._sock.close()
