"""Serve a directory of packed artifacts over HTTP: the manifest by id, then the tar chunk by chunk.

    GET /v1/artifacts                       ids available
    GET /v1/artifacts/{id}/manifest         the manifest, byte for byte as packed
    GET /v1/artifacts/{id}/chunks/{index}   one chunk of the tar
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

from harness.http_server import BackgroundServer

ID = re.compile(r"^[0-9a-f]{64}$")


def create_app(directory: Path) -> FastAPI:
    app = FastAPI(title="artifact server")
    app.state.chunk_requests = 0

    def files(aid: str) -> tuple[Path, Path]:
        if not ID.match(aid):  # also keeps a crafted id from naming a path
            raise HTTPException(404, f"no artifact {aid[:80]!r}")
        tar, manifest = directory / f"{aid}.tar", directory / f"{aid}.json"
        if not tar.is_file() or not manifest.is_file():
            raise HTTPException(404, f"no artifact {aid}")
        return tar, manifest

    @app.get("/v1/artifacts")
    def listing() -> dict:
        return {"artifacts": sorted(p.stem for p in directory.glob("*.json") if ID.match(p.stem))}

    @app.get("/v1/artifacts/{aid}/manifest")
    def manifest(aid: str) -> Response:
        return Response(files(aid)[1].read_bytes(), media_type="application/json")

    @app.get("/v1/artifacts/{aid}/chunks/{index}")
    def chunk(aid: str, index: int) -> Response:
        tar, manifest_path = files(aid)
        chunks = json.loads(manifest_path.read_bytes())["chunks"]
        if not 0 <= index < len(chunks):
            raise HTTPException(404, f"artifact {aid[:16]} has {len(chunks)} chunks; no chunk {index}")
        app.state.chunk_requests += 1
        with open(tar, "rb") as f:
            f.seek(chunks[index]["offset"])
            return Response(f.read(chunks[index]["size"]), media_type="application/octet-stream")

    return app


class ArtifactServer(BackgroundServer):
    def __init__(self, directory: str | Path, port: int = 0):
        self.directory = Path(directory)
        self.app = create_app(self.directory)
        super().__init__(self.app, port=port, name="artifacts")

    @property
    def chunk_requests(self) -> int:
        return self.app.state.chunk_requests

