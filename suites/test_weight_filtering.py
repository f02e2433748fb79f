"""Weight filtering and harvest (SPEC §2.4, §2.5): one filter on both sides, siblings kept fresh."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fixtures.hf_cache import add_snapshot
from fixtures.text_model import make_text_model
from fixtures.weights import DENIED, LOOK_ALIKES, add_weight_files
from harness.card import hash_file
from harness.harvest import harvest, is_weight_file
from harness.resolve import Resolver
from harness.worker.card_builder import build_card
from suites.embedded import hub_card

pytestmark = pytest.mark.spec("2.4")


@pytest.mark.spec("R2")
@pytest.mark.harness_code
@pytest.mark.parametrize("name", DENIED)
def test_the_frontend_harvest_excludes_every_denied_weight_extension(deployment, name):
    for label in ("text-shared-storage", "text-hf-cache", "multimodal-shared-storage"):
        local_dir = deployment.card(label).card.local_dir(deployment.cache_root)
        assert not (local_dir / name).exists(), f"{name} was harvested into {label}'s local_dir"


@pytest.mark.harness_code
@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_the_frontend_harvest_keeps_every_look_alike(deployment, name):
    for label in ("text-shared-storage", "text-hf-cache"):
        local_dir = deployment.card(label).card.local_dir(deployment.cache_root)
        assert (local_dir / name).is_symlink(), f"look-alike {name} is missing from {label}'s local_dir"


def self_host(card_under_test):
    if card_under_test.mode != "self-host":
        pytest.skip(f"{card_under_test.label} is a {card_under_test.mode} card; this checks self-host cards")
    return card_under_test


@pytest.mark.spec("2.5", "R2")
def test_the_worker_filter_is_as_wide_as_the_frontend_filter(card_under_test):
    card = self_host(card_under_test).card
    extras = {e.name for e in card.extra_files}
    assert not {n for n in extras if is_weight_file(n)}, f"weights in {card_under_test.label}'s extra_files: {extras}"
    assert "README.md" not in extras and not any(n.startswith(".") for n in extras), extras
    source = card_under_test.source_dir
    if source is not None:  # and no narrower: every other non-weight sibling is listed
        expected = {p.name for p in source.iterdir() if p.is_file() and not is_weight_file(p.name)
                    and p.name != "README.md" and not p.name.startswith(".")} - card.typed_names()
        assert expected <= extras, f"extra_files of {card_under_test.label} lack {sorted(expected - extras)}"


@pytest.mark.spec("2.5", "R2")
def test_every_self_host_entry_is_a_verified_blob_and_none_is_a_weight(deployment, card_under_test):
    local_dir = deployment.local_dir(self_host(card_under_test))
    for entry in local_dir.iterdir():
        target = Path(os.readlink(entry))
        assert target.parent == deployment.cache_root / "blobs", f"{entry.name} is not a blob in self-host mode"
        assert hash_file(target) == target.name, f"{entry.name} -> {target} does not verify"
        assert not is_weight_file(entry.name)


@pytest.mark.harness_code
@pytest.mark.spec("2.5")
def test_the_worker_lists_extra_files_only_in_self_host_mode(fixture_models):
    assert build_card(fixture_models["text"], "t").extra_files == ()
    hosted = build_card(fixture_models["text"], "t", self_host_url="http://127.0.0.1:9")
    assert {"special_tokens_map.json", "added_tokens.json", "LICENSE"} <= {e.name for e in hosted.extra_files}
    assert hosted.mdcsum() != build_card(fixture_models["text"], "t").mdcsum(), "extras enter the mdcsum"


@pytest.mark.spec("R4")
@pytest.mark.harness_code
def test_a_harvest_never_overwrites_a_typed_slot(tmp_path):
    """tokenizer.json comes from a dir that also holds a *different* config.json."""
    model = make_text_model(tmp_path / "model")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(model / "tokenizer.json", other / "tokenizer.json")
    (other / "config.json").write_text('{"model_type": "impostor"}')
    card = build_card(model, "t")
    card = card.with_paths({**{f.name: f.path for _, f in card.checked_files()},
                            "tokenizer.json": str(other / "tokenizer.json")})
    resolved = Resolver(tmp_path / "mdc").resolve(card)
    assert hash_file(resolved.local_dir / "config.json") == card.slot("model_info").file.checksum.hex


@pytest.mark.spec("R3")
@pytest.mark.harness_code
def test_a_changed_snapshot_is_relinked_under_the_same_mdcsum(tmp_path):
    model = add_weight_files(make_text_model(tmp_path / "model"))
    hub = tmp_path / "hub"
    add_snapshot(hub, "acme/tiny-llama", model)
    card = hub_card({"hub": hub}).card
    resolver = Resolver(tmp_path / "mdc", hf_cache=hub)
    first = resolver.resolve(card)
    assert (first.local_dir / "README.md").read_text().startswith("# tiny-llama")

    (model / "README.md").write_text("# tiny-llama v2\n")  # a new revision: README changed,
    (model / "LICENSE").unlink()  # LICENSE removed, typed files unchanged
    add_snapshot(hub, "acme/tiny-llama", model)
    second = resolver.resolve(card)
    assert second.local_dir == first.local_dir, "same typed files, same mdcsum"
    assert (second.local_dir / "README.md").read_text() == "# tiny-llama v2\n", "stale sibling survived"
    assert not (second.local_dir / "LICENSE").exists(), "a sibling gone from the snapshot survived"


@pytest.mark.harness_code
def test_a_missing_snapshot_dir_is_not_an_error(tmp_path):
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    assert harvest([tmp_path / "does-not-exist"], local_dir, protected=set()) == []
    assert list(local_dir.iterdir()) == []


@pytest.mark.spec("2.5")
@pytest.mark.harness_code
def test_a_symlinked_sibling_links_to_its_resolved_target(tmp_path):
    model = make_text_model(tmp_path / "model")
    real = tmp_path / "shared" / "NOTICE"
    real.parent.mkdir()
    real.write_text("notice\n")
    (model / "NOTICE").symlink_to(real)
    resolved = Resolver(tmp_path / "mdc").resolve(build_card(model, "t"))
    assert os.readlink(resolved.local_dir / "NOTICE") == str(real)
