"""The worker's self-host metadata route (SPEC §2.5), served with FastAPI + uvicorn.

GET /v1/metadata/{namespace}/{component}/{endpoint}/{slug}/{suffix}/{filename}
  200 raw bytes | 404 "Not found" when unregistered | 500 on a read error
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from harness.card import ModelCard
from harness.http_server import BackgroundServer
from harness.worker.card_builder import BASE_SUFFIX, DEFAULT_ENDPOINT, Endpoint, build_card, local_files

log = logging.getLogger(__name__)

Key = tuple[str, str, str, str, str, str]  # namespace, component, endpoint, slug, suffix, filename


class MetadataRegistry:
    """Which local file answers which metadata URL. Thread-safe; the server reads it per request."""

    def __init__(self) -> None:
        self._files: dict[Key, Path] = {}
        self._lock = threading.Lock()

    def register(self, endpoint: Endpoint, slug: str, files: dict[str, Path], suffix: str = BASE_SUFFIX) -> None:
        with self._lock:
            for name, path in files.items():
                self._files[(endpoint.namespace, endpoint.component, endpoint.endpoint, slug, suffix, name)] = path

    def lookup(self, key: Key) -> Path | None:
        with self._lock:
            return self._files.get(key)


def create_app(registry: MetadataRegistry) -> FastAPI:
    app = FastAPI(title="worker metadata (self-host)")

    @app.get("/v1/metadata/{namespace}/{component}/{endpoint}/{slug}/{suffix}/{filename}")
    def metadata(namespace: str, component: str, endpoint: str, slug: str, suffix: str, filename: str) -> Response:
        path = registry.lookup((namespace, component, endpoint, slug, suffix, filename))
        if path is None:
            return PlainTextResponse("Not found", status_code=404)
        try:
            body = path.read_bytes()
        except OSError as exc:
            log.error("metadata read of %s failed: %s", path, exc)
            return PlainTextResponse(f"Failed to read {filename}", status_code=500)
        return Response(body, media_type="application/octet-stream")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


class MetadataServer(BackgroundServer):
    """The self-host route in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.registry = MetadataRegistry()
        super().__init__(create_app(self.registry), host, port, name="metadata-server")

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def publish(self, model_dir: str | Path, name: str, *, endpoint: Endpoint | str = DEFAULT_ENDPOINT,
                custom_template: str | Path | None = None, **card_kw) -> ModelCard:
        """Build the self-host card for `model_dir` and serve every file it names."""
        endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        card = build_card(model_dir, name, self_host_url=self.url, endpoint=endpoint,
                          custom_template=custom_template, **card_kw)
        self.registry.register(endpoint, card.slug, local_files(model_dir, custom_template))
        return card
