"""The card (SPEC §1): slug, checked files, mdcsum equal to Dynamo's, and a pure local_dir()."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from harness.card import CheckedFile, Checksum, ModelCard, Slot, WorkerType, entry_name, parse_slug, slugify
from harness.errors import CardError
from harness.worker.card_builder import build_card

pytestmark = [pytest.mark.spec("1"), pytest.mark.harness_code]

HEX_A, HEX_B = "a" * 64, "b" * 64


@pytest.mark.spec("1.3")
@pytest.mark.parametrize("name, slug", [
    ("Qwen/Qwen3-0.6B", "qwen_qwen3-0_6b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama_llama-3_1-8b-instruct"),
    ("__x__", "x__"),
    ("Ünïcode", "n_code"),  # each non-ASCII character becomes a single '_', then leading '_' go
    ("a  b", "a__b"),  # no collapsing of repeats
    ("", ""),
])
def test_slug_lowercases_maps_and_strips_leading_underscores(name, slug):
    assert slugify(name) == slug


@pytest.mark.spec("1.3")
@pytest.mark.parametrize("bad", ["Qwen", "a/b", "a.b", "ü", "a b"])
def test_parsing_a_slug_outside_the_alphabet_is_an_error(bad):
    with pytest.raises(CardError, match="outside"):
        parse_slug(bad)


@pytest.mark.spec("1.4")
def test_mdcsum_matches_the_dynamo_vector():
    card = ModelCard.new("Qwen/Qwen3-0.6B")
    assert card.mdcsum() == "e0dc01c85e867822445e37239d7a16f5d4ab44deeeb39bd35c129a9d6ec90086"


def _slot(key, tag, hexd, name):
    return Slot(key, tag, CheckedFile(f"/m/{name}", Checksum("blake3", hexd)))


BASE = ModelCard.new(
    "org/model",
    source_path="/models/org/model",
    slots=(_slot("model_info", "hf_config_json", HEX_A, "config.json"),
           _slot("tokenizer", "hf_tokenizer_json", HEX_A, "tokenizer.json")),
    extra_files=(CheckedFile("/m/vocab.txt", Checksum("blake3", HEX_A)),),
    context_length=4096, kv_cache_block_size=16, worker_type=WorkerType.DECODE,
    needs=((WorkerType.PREFILL,),),
)

HASHED_CHANGES = {
    "display_name": dict(display_name="org/other"),
    "source_path": dict(source_path="/elsewhere"),
    "slot checksum": dict(slots=(_slot("model_info", "hf_config_json", HEX_B, "config.json"),
                                 _slot("tokenizer", "hf_tokenizer_json", HEX_A, "tokenizer.json"))),
    "slot presence": dict(slots=BASE.slots[:1]),
    "extra file name": dict(extra_files=(CheckedFile("/m/merges.txt", Checksum("blake3", HEX_A)),)),
    "extra file checksum": dict(extra_files=(CheckedFile("/m/vocab.txt", Checksum("blake3", HEX_B)),)),
    "context_length": dict(context_length=2048),
    "kv_cache_block_size": dict(kv_cache_block_size=32),
    "worker_type": dict(worker_type=WorkerType.PREFILL),
    "needs": dict(needs=((WorkerType.PREFILL, WorkerType.ENCODE),)),
    "router_config": dict(router_config={"mode": "kv"}),
    "aliases": dict(aliases=("alias",)),
}


@pytest.mark.spec("1.4", "1.5")
@pytest.mark.parametrize("field", HASHED_CHANGES)
def test_two_cards_that_differ_in_any_hashed_field_get_different_local_dirs(field, tmp_path):
    other = dataclasses.replace(BASE, **HASHED_CHANGES[field])
    assert other.mdcsum() != BASE.mdcsum()
    assert other.local_dir(tmp_path) != BASE.local_dir(tmp_path)


@pytest.mark.spec("1.4")
def test_paths_and_sizes_are_not_hashed():
    moved = BASE.with_paths({"config.json": "http://w/config.json", "tokenizer.json": "/x/tokenizer.json",
                             "vocab.txt": "hf://org/model/vocab.txt"})
    assert moved.mdcsum() == BASE.mdcsum()


@pytest.mark.spec("1.5")
def test_local_dir_is_pure_path_computation(tmp_path):
    root = tmp_path / "mdc"
    assert BASE.local_dir(root) == root / "by-slug" / "org_model" / BASE.mdcsum()
    assert not root.exists(), "local_dir() must create nothing"


@pytest.mark.spec("1.4", "1.5")
def test_an_empty_name_collapses_local_dir_to_by_slug_mdcsum(tmp_path):
    card = ModelCard.new("")
    assert card.slug == ""
    assert card.local_dir(tmp_path) == tmp_path / "by-slug" / card.mdcsum()


@pytest.mark.spec("1.2")
@pytest.mark.parametrize("bad", ["sha256:" + HEX_A, "blake3:" + "A" * 64, "blake3:" + "a" * 63,
                                 "blake3:" + "g" * 64, HEX_A, "blake3:a:b", ""])
def test_a_checksum_must_be_blake3_and_64_lowercase_hex(bad):
    with pytest.raises(CardError, match="checksum"):
        Checksum.parse(bad)


@pytest.mark.spec("1")
def test_card_json_round_trips_with_tagged_slots(fixture_models):
    card = build_card(fixture_models["multimodal"], "acme/Tiny-Llava", worker_type="prefill", block_size=32,
                      self_host_url="http://127.0.0.1:9")
    data = json.loads(card.dumps())
    assert data["model_info"]["hf_config_json"]["checksum"].startswith("blake3:")
    assert set(data["chat_template_file"]) == {"hf_chat_template"}
    assert data["chat_template_file"]["hf_chat_template"]["is_custom"] is False
    assert data["worker_type"] == "prefill" and data["needs"] == [["decode"]]
    again = ModelCard.loads(card.dumps())
    assert again == card and again.mdcsum() == card.mdcsum()


@pytest.mark.spec("1.4")
def test_a_worker_fills_card_fields_from_its_model_dir(fixture_models):
    text, mm = fixture_models["text"], fixture_models["multimodal"]
    card = build_card(text, "acme/Tiny-Llama", worker_type="decode", block_size=32)
    assert card.source_path == str(text) and card.display_name == "acme/Tiny-Llama"
    assert card.context_length == 2048  # config.json max_position_embeddings
    assert card.needs == ((WorkerType.PREFILL,),)
    assert build_card(mm, "m").context_length == 2048  # from text_config for a multimodal model
    assert build_card(text, "t", context_length=512).context_length == 512  # the runtime value wins
    assert [s.key for s in card.slots] == ["model_info", "tokenizer", "prompt_formatter", "gen_config"]


@pytest.mark.spec("1.1")
def test_more_than_one_tiktoken_file_is_an_error(tmp_path):
    (tmp_path / "a.tiktoken").write_text("x")
    (tmp_path / "b.tiktoken").write_text("y")
    with pytest.raises(CardError, match="more than one"):
        build_card(tmp_path, "t")


@pytest.mark.spec("1.1")
def test_a_single_tiktoken_file_fills_the_tokenizer_slot(tmp_path):
    (tmp_path / "cl100k.tiktoken").write_text("x")
    assert build_card(tmp_path, "t").slot("tokenizer").tag == "tik_token_model"


@pytest.mark.spec("2.3")
@pytest.mark.parametrize("path", ["http://h/a/..", "/x/..", "http://h/a/%2E%2E", "http://h/a/..%2Fetc",
                                  "http://h/", "bad\x00name"])
def test_an_entry_name_that_could_escape_local_dir_is_rejected(path):
    with pytest.raises(CardError, match="unsafe file name"):
        entry_name(path)


def test_prefill_and_decode_cards_for_one_name_differ_by_role(fixture_models):
    text: Path = fixture_models["text"]
    prefill = build_card(text, "acme/Tiny-Llama", worker_type="prefill")
    decode = build_card(text, "acme/Tiny-Llama", worker_type="decode")
    assert prefill.mdcsum() != decode.mdcsum()
