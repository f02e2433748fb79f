"""The floor: the smallest P/D relay the bench could write, to show what any Python proxy costs here.

One prefill POST (max_tokens=1, kv_transfer_params asking for remote decode), then the decode
request with the kv_transfer_params the prefill returned, its SSE bytes passed through untouched:
no tokenization, no parsing of the stream, no routing state. aiohttp on uvloop, one process.

    python -m benchmarks.floor_relay --prefill URL --decode URL --port N
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

from harness.frontend.router import PREFILL_KV_TRANSFER_PARAMS as PREFILL_KV  # the same ask as the frontend's


def make_app(prefill: str, decode: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        session: aiohttp.ClientSession = request.app["session"]
        first = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV}
        first.pop("stream_options", None)
        async with session.post(f"{prefill}/v1/completions", json=first) as resp:
            answer = await resp.json()
        async with session.post(f"{decode}/v1/completions",
                                json={**body, "kv_transfer_params": answer.get("kv_transfer_params")}) as resp:
            out = web.StreamResponse(status=resp.status,
                                     headers={"Content-Type": resp.headers.get("Content-Type", "text/event-stream")})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(_: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor_relay", description=__doc__.split("\n")[0])
    p.add_argument("--prefill", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvloop

    uvloop.install()
    web.run_app(make_app(args.prefill.rstrip("/"), args.decode.rstrip("/")), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
