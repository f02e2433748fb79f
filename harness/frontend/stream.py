"""Annotated stream items (SPEC §4.4) and their Server-Sent Events encoding.

An item is `{data?, id?, event?, comment?: [str], error?}`. It is an error when `event == "error"`;
its text is `error`, else the comments joined, else `unknown error`. Items without data are
skipped when the stream is folded into a response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import orjson


def dumps(data: Any) -> bytes:
    """orjson, or json for what orjson refuses (an integer past 64 bits)."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data).encode()


@dataclass(slots=True)
class Annotated:
    data: Any = None
    id: str | None = None
    event: str | None = None
    comment: Sequence[str] = ()  # an immutable default: the relay makes an item per engine read
    error: str | None = None
    # Token chunks as the engine sent them: whole SSE events (`data: {...}` and a blank line each),
    # unparsed, in order, where the relay passes them through for a consumer that asked for that
    # (a streamed completion). One item for all that one read of the engine stream brought: one
    # hop per read, not per token.
    raw: bytes | None = None
    # The relay has handed over all the engine sent so far and is about to wait: a writer sends
    # what it has gathered now, in one write.
    flush: bool = False

    def chunks(self) -> list[Any]:
        """The data, or the raw events parsed; [] for an item without either."""
        if self.raw is not None:
            return [orjson.loads(payload) for payload in event_payloads(self.raw)]
        return [] if self.data is None else [self.data]

    @property
    def is_error(self) -> bool:
        return self.event == "error"

    @property
    def error_text(self) -> str:
        if self.error:
            return self.error
        if self.comment:
            return "; ".join(self.comment)
        return "unknown error"

    @classmethod
    def failure(cls, message: str) -> "Annotated":
        return cls(event="error", error=message)


def sse(item: Annotated) -> bytes:
    """One SSE message. Errors become `event: error` with an OpenAI-style error body."""
    if item.data is not None and not item.event and not item.comment:  # every token takes this path
        data = item.data.encode() if isinstance(item.data, str) else dumps(item.data)
        return (b"id: " + item.id.encode() + b"\n" if item.id else b"") + b"data: " + data + b"\n\n"
    lines = [f": {c}" for c in item.comment]
    if item.id:
        lines.append(f"id: {item.id}")
    if item.is_error:
        lines.append("event: error")
        lines.append("data: " + json.dumps({"error": {"message": item.error_text, "type": "engine_error"}}))
    elif item.event:
        lines.append(f"event: {item.event}")
    if item.data is not None and not item.is_error:
        lines.append("data: " + (item.data if isinstance(item.data, str) else json.dumps(item.data)))
    return ("\n".join(lines) + "\n\n").encode()


def event_payloads(events: bytes) -> list[bytes]:
    """The JSON of each `data:` line in a run of SSE events."""
    return [line[6:].strip() for line in events.split(b"\n") if line.startswith(b"data: ")]


DONE = b"data: [DONE]\n\n"

# An item with nothing but the flush mark, where a read's last item could not carry it. Folding skips it.
FLUSH = Annotated(flush=True)
