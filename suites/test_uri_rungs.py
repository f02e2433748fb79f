"""The URI ladder (SPEC §2.1): remote URLs pass, local files win, then the model path, then the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures.hf_cache import add_snapshot
from fixtures.text_model import make_text_model
from harness.card import ModelCard
from harness.errors import NotInHfCache
from harness.resolve import Resolver
from harness.resolve.rungs import plan
from harness.worker.card_builder import build_card

pytestmark = [pytest.mark.spec("2.1"), pytest.mark.harness_code]


@pytest.fixture
def model(tmp_path) -> Path:
    return make_text_model(tmp_path / "worker" / "model")


def uris(card: ModelCard, model_path: Path | None = None) -> dict[str, str]:
    return {p.name: p.uri for p in plan(card, model_path)}


def test_http_and_hf_urls_pass_through_unchanged(model):
    card = build_card(model, "acme/m")
    card = card.with_paths({"config.json": "http://w:1/config.json", "tokenizer.json": "hf://acme/m@r1/tokenizer.json",
                            "tokenizer_config.json": "https://w/tokenizer_config.json",
                            "generation_config.json": "http://w:1/generation_config.json"})
    assert uris(card) == {"config.json": "http://w:1/config.json", "tokenizer.json": "hf://acme/m@r1/tokenizer.json",
                          "tokenizer_config.json": "https://w/tokenizer_config.json",
                          "generation_config.json": "http://w:1/generation_config.json"}


def test_a_plain_path_that_exists_becomes_a_file_url(model):
    assert uris(build_card(model, "acme/m"))["config.json"] == (model / "config.json").as_uri()


def test_a_missing_path_falls_back_to_the_frontends_model_path(model, tmp_path):
    card = build_card(model, "acme/m")
    overlay = tmp_path / "frontend-copy"
    shutil.copytree(model, overlay)
    shutil.rmtree(model)
    assert uris(card, overlay)["config.json"] == (overlay / "config.json").as_uri()
    resolved = Resolver(tmp_path / "mdc", overlay).resolve(card)
    assert (resolved.local_dir / "config.json").read_text() == (overlay / "config.json").read_text()


def test_otherwise_a_file_becomes_hf_source_path_slash_basename(model):
    card = build_card(model, "acme/m").with_paths({n: f"/nowhere/{n}" for n in
                                                   ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                    "generation_config.json")})
    assert uris(card)["config.json"] == f"hf://{model}/config.json"  # source_path first
    no_source = ModelCard.from_json(card.to_json() | {"source_path": None})
    assert uris(no_source)["config.json"] == "hf://acme/m/config.json"  # else the display name


@pytest.mark.spec("2.2")
def test_an_hf_repo_is_read_from_the_local_hub_cache_offline(model, tmp_path):
    hub = tmp_path / "hub"
    add_snapshot(hub, "acme/m", model)
    card = ModelCard.from_json(build_card(model, "acme/m").to_json() | {"source_path": "acme/m"})
    card = card.with_paths({f.name: f"/other-host/{f.name}" for _, f in card.checked_files()})
    resolved = Resolver(tmp_path / "mdc", hf_cache=hub).resolve(card)
    assert (resolved.local_dir / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert (resolved.local_dir / "README.md").is_symlink(), "siblings are harvested from the hub snapshot too"


@pytest.mark.spec("2.2")
def test_an_hf_repo_missing_from_the_local_cache_is_a_clear_error(model, tmp_path):
    card = ModelCard.from_json(build_card(model, "acme/absent").to_json() | {"source_path": "acme/absent"})
    card = card.with_paths({f.name: f"/other-host/{f.name}" for _, f in card.checked_files()})
    with pytest.raises(NotInHfCache, match="hf://acme/absent is not in the local Hugging Face cache"):
        Resolver(tmp_path / "mdc", hf_cache=tmp_path / "empty-hub").resolve(card)
    assert not (tmp_path / "mdc").exists()


def test_resolved_slots_are_rewritten_to_local_dir(model, tmp_path):
    resolved = Resolver(tmp_path / "mdc").resolve(build_card(model, "acme/m"))
    for _, f in resolved.card.checked_files():
        assert Path(f.path) == resolved.local_dir / f.name
    assert resolved.card.mdcsum() == build_card(model, "acme/m").mdcsum()
