"""However an engine's stream is cut into reads, a streamed completion reaches the client as the
parsed path would make it: the relay passes token events through unparsed from the first (the
client's shape learns the engine's id from their bytes), and parses what carries usage, an error
or [DONE]."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from harness.frontend.router import Instance, Route, RoutedEngine
from harness.frontend.server import CompletionShape


class Reads(RoutedEngine):
    """A router whose decode stream is the given reads."""

    def __init__(self, reads: list[bytes]):
        super().__init__("tiny-llama")
        self.reads = reads

    async def engine_chunks(self, resp):
        for read in self.reads:
            yield read


class Resp:
    def close(self) -> None:
        pass

    async def read(self) -> bytes:
        return b""

    def release(self) -> None:
        pass


def engine_stream(engine_id: str, tokens: int, usage: bool, transfer: bool = False) -> bytes:
    """`transfer`: the last token chunk carries kv_transfer_params, which the client must not see."""
    events = [{"id": engine_id, "object": "text_completion", "created": 1, "model": "tiny-llama",
               "choices": [{"index": 0, "text": f" t{k}", "logprobs": None,
                            "finish_reason": "length" if k == tokens - 1 else None, "stop_reason": None,
                            "prompt_token_ids": None, "token_ids": None}]} for k in range(tokens)]
    if transfer:
        events[-1]["kv_transfer_params"] = {"do_remote_prefill": True, "remote_block_ids": [[0]]}
    if usage:
        events.append({"id": engine_id, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": tokens}})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def parsed_path(stream: bytes, usage: bool, served: str = "tiny-llama") -> bytes:
    shape = CompletionShape(served, "req-1", usage)
    out = b""
    for line in stream.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = orjson.loads(line[6:])
            shape.learn(chunk)
            out += shape.encoded(chunk)
    return out


def relayed(reads: list[bytes], usage: bool, served: str = "tiny-llama") -> tuple[bytes, list]:
    async def run():
        router = Reads(reads)
        route = Route("req-1", "aggregated", Instance("d", "http://127.0.0.1:1", "decode"), raw_chunks=True)
        shape, out, items = CompletionShape(served, "req-1", usage), b"", []
        async for item in router._relay(route, Resp()):
            assert not item.is_error, item.error_text
            items.append(item)
            out += shape.encode(item)
        return out, items

    return asyncio.run(run())


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *sorted(at), len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@pytest.mark.parametrize("served", ["tiny-llama", "another-name"])
@pytest.mark.parametrize("engine_id", ["cmpl-req-1", "cmpl-abc-0-1f", 'cmpl-\\"q'],
                         ids=["ours", "the-engines", "escaped"])
@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
def test_every_cut_of_the_stream_into_reads_reaches_the_client_as_the_parsed_path_makes_it(engine_id, usage, served):
    stream = engine_stream(engine_id, 12, usage)
    expected = parsed_path(stream, usage, served)
    rng = random.Random(17)
    cuts = [[], [len(stream) // 2]] + [rng.sample(range(1, len(stream)), k) for k in (1, 2, 5, 30) for _ in range(25)]
    for at in cuts:
        out, _ = relayed(cut(stream, at), usage, served)
        assert out == expected, f"reads cut at {sorted(at)}"


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
def test_a_token_chunk_with_transfer_params_before_the_usage_chunk_is_parsed_however_the_reads_fall(usage):
    # The relay cuts a read at its first marked event, by position: the transfer params come
    # before usage here, though usage is the mark it looks for first.
    stream = engine_stream("cmpl-abc-0-1f", 12, usage, transfer=True)
    expected = parsed_path(stream, usage)
    assert b"transfer_params" not in expected
    rng = random.Random(23)
    for at in [[], [len(stream) // 3]] + [rng.sample(range(1, len(stream)), k) for k in (1, 2, 5) for _ in range(25)]:
        out, _ = relayed(cut(stream, at), usage)
        assert out == expected, f"reads cut at {sorted(at)}"


def test_a_stream_in_one_read_is_parsed_only_where_it_carries_usage():
    stream = engine_stream("cmpl-abc-0-1f", 12, usage=True)
    _, items = relayed([stream], usage=True)
    parsed = [item.data for item in items if item.data is not None]
    passed = b"".join(item.raw for item in items if item.raw is not None)
    assert [p["usage"]["completion_tokens"] for p in parsed] == [12] and all(not p["choices"] for p in parsed)
    assert passed.count(b"\n\n") == 12, "every token event, the first too, passes through unparsed"


def test_the_first_token_reaches_the_client_unparsed_where_its_bytes_name_the_engines_id():
    first = engine_stream("cmpl-abc-0-1f", 1, usage=False).split(b"data: [DONE]")[0]
    shape = CompletionShape("tiny-llama", "req-1", False)
    shape.learn_events(first)
    assert shape.passthrough_events(first) == parsed_path(first, False)
    for unsure in (engine_stream('cmpl-\\"q', 1, False), first.replace(b'"model":"tiny-llama"', b'"model":"other"')):
        shape = CompletionShape("tiny-llama", "req-1", False)
        shape.learn_events(unsure)
        assert shape.passthrough_events(unsure) is None, "an escaped id or another model name is parsed"
