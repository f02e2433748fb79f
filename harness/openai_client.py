"""Talking to an OpenAI-compatible server we do not own: probe what it accepts, then ask for it.

Token ids and routing decisions are extensions, in two dialects (both measured):
- vLLM and the harness frontend: `return_token_ids: true` gives `choices[].token_ids`; the harness
  frontend reports routing in `x-disagg-*` headers;
- Dynamo 1.6.1's frontend rejects `return_token_ids` (HTTP 400 "Unsupported parameter(s)"), and
  answers `nvext: {extra_fields: ["completion_token_ids", "worker_id"]}` with
  `nvext.completion_token_ids` and `nvext.worker_id.{prefill,decode}_worker_id`.
An endpoint is probed once, and a dialect's parameters are sent only where they were accepted.
Outputs are compared by token ids where both sides return them, else by text (under greedy
decoding), and the report says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import requests

from harness.errors import HarnessError

# The routing decision a frontend reports per response (the harness's `x-disagg-mode`).
MODE_HEADER = "x-disagg-mode"
MODES = ("disaggregated", "aggregated")
VLLM_TOKEN_IDS = {"return_token_ids": True}
DYNAMO_EXTRA_FIELDS = {"nvext": {"extra_fields": ["completion_token_ids", "worker_id"]}}


class EndpointError(HarnessError):
    pass


def served_models(url: str, timeout: float = 10.0) -> list[str]:
    try:
        resp = requests.get(f"{url.rstrip('/')}/v1/models", timeout=timeout)
        resp.raise_for_status()
        return [m["id"] for m in resp.json()["data"]]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"{url}/v1/models did not list models: {type(exc).__name__}: {exc}") from None


def choose_model(url: str, model: str | None) -> str:
    """The served model to test: the one asked for, or the only one `/v1/models` lists.

    A frontend that lists no models (vLLM's example P/D proxy serves no `/v1/models`) is still
    checked when `--model` names the model; a listing that exists and leaves it out is an error."""
    try:
        models = served_models(url)
    except EndpointError as exc:
        if model is not None:
            return model
        raise EndpointError(f"{exc}; give --model NAME, the model to test") from None
    if model is not None:
        if model not in models:
            raise EndpointError(f"model {model!r} is not served at {url} (its /v1/models lists {models}); "
                                f"give --model with one of them")
        return model
    if len(models) != 1:
        raise EndpointError(f"{url} serves {len(models)} models {models}; say which to test with --model NAME")
    return models[0]


@dataclass(frozen=True)
class Output:
    """What a completion produced, and how it can be compared."""

    by: str  # "token ids" | "text"
    value: Any


@dataclass
class OpenAIEndpoint:
    url: str
    model: str
    timeout_s: float = 120.0
    returns_token_ids: bool | None = None  # None until probed
    dialect: dict[str, Any] = field(default_factory=dict)  # the extension parameters this server accepted
    probe_note: str | None = None
    probe_headers: dict[str, str] = field(default_factory=dict)  # of a plain, accepted request
    reports_routing: bool = False
    _probed: bool = field(default=False, repr=False)
    _accepted: dict[str, bool] = field(default_factory=dict, repr=False)

    def probe(self) -> "OpenAIEndpoint":
        """Ask once which dialect (if any) makes this server return token ids and routing."""
        if self._probed:
            return self
        notes = []
        for dialect in (VLLM_TOKEN_IDS, DYNAMO_EXTRA_FIELDS, {}):
            resp = self._post({"model": self.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0, **dialect})
            if 400 <= resp.status_code < 500 and dialect:
                notes.append(f"rejected {json.dumps(dialect)}: HTTP {resp.status_code} {resp.text[:160]}")
                continue
            if resp.status_code != 200:
                raise EndpointError(f"probing {self.url}/v1/completions for model {self.model!r} gave HTTP "
                                    f"{resp.status_code}: {resp.text[:300]}")
            self.dialect = dialect
            self.returns_token_ids = token_ids_of(resp.json()) is not None
            if dialect and not self.returns_token_ids:
                notes.append(f"accepted {json.dumps(dialect)} but returned no token ids")
            self.probe_headers = {k.lower(): v for k, v in resp.headers.items()}
            self.reports_routing = routing_mode(resp) != "unknown"
            break
        self.probe_note = "; ".join(notes) or None
        self._probed = True
        return self

    def _post(self, body: dict, headers: dict | None = None, timeout: float | None = None) -> requests.Response:
        return requests.post(f"{self.url}/v1/completions", json=body, headers=headers or {},
                             timeout=timeout or self.timeout_s)

    def accepts(self, name: str, value: Any) -> bool:
        """Whether a one-token request with this extra parameter is accepted (asked once per name)."""
        if name not in self._accepted:
            resp = self._post({"model": self.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0, name: value})
            self._accepted[name] = resp.status_code == 200
        return self._accepted[name]

    def complete(self, prompt: Any, *, max_tokens: int = 16, headers: dict | None = None, timeout: float | None = None,
                 **extra: Any) -> requests.Response:
        """A greedy completion, in the dialect the probe found accepted (token ids, routing)."""
        self.probe()
        return self._post({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           **self.dialect, **extra}, headers, timeout)

    def chat(self, messages: list[dict], *, max_tokens: int = 16, headers: dict | None = None,
             timeout: float | None = None, **extra: Any) -> requests.Response:
        """A greedy chat completion (images travel as content parts), in the probed dialect."""
        self.probe()
        return requests.post(f"{self.url}/v1/chat/completions", headers=headers or {}, timeout=timeout or self.timeout_s,
                             json={"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                   "temperature": 0.0, **self.dialect, **extra})

    def stream_request(self, prompt: Any, max_tokens: int, **extra: Any) -> dict:
        """Keyword arguments for `httpx.stream(**...)`: a streamed greedy completion, in the probed dialect
        (with token ids every token is an event, even where its text is empty, as with Dynamo's mocker)."""
        import httpx

        return {"method": "POST", "url": f"{self.url}/v1/completions", "timeout": httpx.Timeout(self.timeout_s, connect=5),
                "json": {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                         "stream": True, **self.probe().dialect, **extra}}


def output(response: requests.Response, by: str) -> Output:
    """The response's output, by token ids or by text; an HTTP error or a missing field fails loudly."""
    if response.status_code != 200:
        raise EndpointError(f"HTTP {response.status_code}: {response.text[:300]}")
    data = response.json()
    if by == "token ids":
        ids = token_ids_of(data)
        if ids is None:
            raise EndpointError(f"no token ids in {json.dumps(data)[:300]}")
        return Output(by, ids)
    choice = data["choices"][0]
    return Output(by, choice["message"].get("content") if "message" in choice else choice.get("text"))


def token_ids_of(data: dict) -> list[int] | None:
    """Completion token ids in either dialect: `choices[0].token_ids` or `nvext.completion_token_ids`."""
    ids = ((data.get("choices") or [{}])[0] or {}).get("token_ids")
    if ids is None:
        ids = (data.get("nvext") or {}).get("completion_token_ids")
    return list(ids) if ids else None


def comparable_by(*endpoints: OpenAIEndpoint) -> str:
    """Token ids where every endpoint returns them, else text."""
    return "token ids" if all(e.probe().returns_token_ids for e in endpoints) else "text"


def serving_worker(response: requests.Response) -> str | None:
    """The worker the frontend says computed the prompt: the harness's `x-disagg-prefill-worker`
    (else `x-disagg-decode-worker`), or Dynamo's `nvext.worker_id` (its prefill worker). None when
    the frontend does not say."""
    named = response.headers.get("x-disagg-prefill-worker") or response.headers.get("x-disagg-decode-worker")
    if named:
        return named
    try:
        workers = (response.json().get("nvext") or {}).get("worker_id") or {}
    except ValueError:
        return None
    worker = workers.get("prefill_worker_id", workers.get("decode_worker_id"))
    return None if worker is None else str(worker)


def routing_mode(response: requests.Response) -> str:
    """The frontend's reported routing decision: the `x-disagg-mode` header, else Dynamo's
    `nvext.worker_id` (prefill and decode on different workers is disaggregated, on one worker
    aggregated). Anything else is "unknown", never a mode."""
    mode = response.headers.get(MODE_HEADER)
    if mode in MODES:
        return mode
    try:
        workers = (response.json().get("nvext") or {}).get("worker_id") or {}
    except ValueError:
        return "unknown"
    prefill, decode = workers.get("prefill_worker_id"), workers.get("decode_worker_id")
    if prefill is None or decode is None:
        return "unknown"
    return "aggregated" if prefill == decode else "disaggregated"
