"""Annotated stream items (SPEC §4.4): what is an error, what its text is, what is skipped."""

from __future__ import annotations

import json

from harness.frontend.server import Folded
from harness.frontend.stream import Annotated, sse


def test_an_item_is_an_error_only_when_its_event_is_error():
    assert Annotated(event="error").is_error
    assert not Annotated(event="message", error="text").is_error


def test_the_error_text_is_error_else_the_comments_else_unknown():
    assert Annotated(event="error", error="boom", comment=["a"]).error_text == "boom"
    assert Annotated(event="error", comment=["a", "b"]).error_text == "a; b"
    assert Annotated(event="error").error_text == "unknown error"


def test_items_without_data_are_skipped_when_a_stream_is_folded():
    folded = Folded()
    for item in [Annotated(comment=["keep-alive"]), Annotated(data={"choices": [{"text": "a", "token_ids": [1]}]}),
                 Annotated(), Annotated(data={"choices": [{"text": "b", "finish_reason": "length"}]})]:
        folded.add(item)
    assert (folded.text, folded.token_ids, folded.finish_reason, folded.error) == ("ab", [1], "length", None)


def test_an_error_item_is_sent_as_an_sse_error_event():
    lines = sse(Annotated.failure("decode worker died")).decode().splitlines()
    assert lines[0] == "event: error"
    assert json.loads(lines[1][len("data: "):])["error"]["message"] == "decode worker died"
