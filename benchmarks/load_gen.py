"""A closed-loop load generator for streaming completions, in a process of its own.

C workers each send the next request as soon as their last one ended, until N requests are done.
Per request: TTFT (to the first data event with text), tokens (data events with text) and the
mean inter-token latency after the first. The run: wall time and tokens over it. With
--unique-prompts each request's prompt starts with a fresh nonce, so no request hits another's
prefix cache. Prints one JSON object. aiohttp on uvloop, so the generator
costs as little CPU as it can: on 2 shared cores, its cost lands on every arm alike.

    python -m benchmarks.load_gen --url URL --concurrency C --requests N --body JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiohttp


async def one(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, int, float | None]:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"text"' in line:
                last = time.perf_counter()
                first = first or last
                tokens += 1
    if first is None:
        raise RuntimeError(f"{url}: a stream with no text")
    return first - start, tokens, (last - first) / (tokens - 1) if tokens > 1 else None


async def run(url: str, body: dict, concurrency: int, requests: int, unique: bool = False) -> dict:
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    left = requests

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker() -> None:
            nonlocal left, tokens
            while left > 0:
                left -= 1
                sent = {**body, "prompt": f"{os.urandom(6).hex()} {body['prompt']}"} if unique else body
                ttft, n, itl = await one(session, url, sent)
                ttfts.append(ttft)
                tokens += n
                if itl is not None:
                    itls.append(itl)

        await asyncio.gather(*(one(session, url, body) for _ in range(min(concurrency, 4))))  # warm connections
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"ttfts_s": ttfts, "itls_s": itls, "tokens": tokens, "wall_s": wall, "requests": len(ttfts), "concurrency": concurrency}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_gen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="base URL; requests go to URL/v1/completions")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--body", required=True, help="the request body, JSON (stream is forced on)")
    p.add_argument("--unique-prompts", action="store_true", help="a fresh nonce before each request's prompt")
    args = p.parse_args()
    import uvloop

    body = {**json.loads(args.body), "stream": True}
    result = uvloop.run(run(f"{args.url.rstrip('/')}/v1/completions", body, args.concurrency, args.requests,
                            args.unique_prompts))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
