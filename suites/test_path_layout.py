"""Path layout (SPEC §1.5, §2.2): content-addressed blobs, and local_dir as absolute symlinks.

These checks read only the cache, so they run unchanged against a foreign frontend's cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness.card import hash_file
from harness.deployment import frontend_local_dir
from harness.harvest import is_weight_file
from harness.resolve.blobs import PARTIAL_PREFIX

pytestmark = pytest.mark.spec("1.5")
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.mark.spec("2.2")
def test_blobs_are_named_by_the_blake3_of_their_content(deployment):
    blobs = deployment.cache_root / "blobs"
    names = [p for p in blobs.iterdir() if not p.name.startswith(PARTIAL_PREFIX)]
    assert names, f"no blobs under {blobs}"
    for blob in names:
        assert HEX64.fullmatch(blob.name), f"{blob.name} in blobs/ is not a 64-hex content name"
        assert blob.is_file() and not blob.is_symlink(), f"{blob} must be a real file copy"
        assert hash_file(blob) == blob.name, f"{blob} does not hash to its name"


def test_local_dir_is_by_slug_slug_mdcsum(deployment, card_under_test):
    card = card_under_test.card
    local_dir = card.local_dir(deployment.cache_root)
    assert local_dir == deployment.cache_root / "by-slug" / card.slug / card.mdcsum()
    found, at_spec_path = frontend_local_dir(card, deployment.cache_root)
    assert at_spec_path, (
        f"{card.display_name}: the frontend keeps this card's files in {found}, not under its SPEC §1.4 mdcsum "
        f"{card.mdcsum()}: the frontend's checksum of the card differs from the spec's")
    assert local_dir.is_dir(), f"{card.display_name}: local_dir {local_dir} was not created by the frontend"


def test_local_dir_holds_only_absolute_symlinks_that_resolve(deployment, card_under_test):
    local_dir = deployment.local_dir(card_under_test)
    entries = sorted(local_dir.iterdir())
    assert entries
    for entry in entries:
        assert entry.is_symlink(), f"{entry} is not a symlink"
        target = os.readlink(entry)
        assert os.path.isabs(target), f"{entry} -> {target} is not an absolute target"
        assert Path(target).is_file(), f"{entry} -> {target} dangles"


@pytest.mark.spec("2.2", "1.2")
def test_every_checked_file_links_to_the_blob_named_by_its_checksum(deployment, card_under_test):
    card = card_under_test.card
    local_dir = deployment.local_dir(card_under_test)
    for key, file in card.checked_files():
        link = local_dir / file.name
        assert link.is_symlink(), f"{key} file {file.name} is missing from {local_dir}"
        assert Path(os.readlink(link)) == deployment.cache_root / "blobs" / file.checksum.hex, (
            f"{key} {file.name} must point at blobs/{file.checksum.hex}")


@pytest.mark.spec("2.4", "R2")
def test_no_weight_file_reaches_local_dir(deployment, card_under_test):
    local_dir = deployment.local_dir(card_under_test)
    weights = [p.name for p in local_dir.iterdir() if is_weight_file(p.name)]
    assert not weights, f"weight files in the metadata cache: {weights}"


@pytest.mark.spec("2.4", "2.6", "R1")
def test_local_dir_holds_every_metadata_sibling_of_its_source(deployment, card_under_test):
    """What from_pretrained(local_dir) needs beyond the typed files, e.g. preprocessor_config.json."""
    source = card_under_test.source_dir
    if source is None or not source.is_dir():
        pytest.skip(f"the source dir of {card_under_test.label} is not visible from here")
    local_dir = deployment.local_dir(card_under_test)
    expected = {p.name for p in source.iterdir() if p.is_file() and not is_weight_file(p.name)}
    if card_under_test.mode == "self-host":  # the worker drops docs and dotfiles from extra_files
        expected = {n for n in expected if n != "README.md" and not n.startswith(".")}
    missing = expected - {p.name for p in local_dir.iterdir()}
    assert not missing, f"local_dir of {card_under_test.label} lacks {sorted(missing)}"


@pytest.mark.spec("1.4", "1.5")
def test_prefill_and_decode_cards_of_one_name_get_different_local_dirs(deployment):
    by_name: dict[str, dict[str, Path]] = {}
    for c in deployment.cards:
        by_name.setdefault(c.card.display_name, {})[c.card.role] = deployment.local_dir(c)
    pairs = {name: dirs for name, dirs in by_name.items() if {"prefill", "decode"} <= set(dirs)}
    if not pairs:
        pytest.skip(f"needs a prefill and a decode card of one model; the cards are {sorted(by_name)} with roles "
                    f"{ {n: sorted(d) for n, d in by_name.items()} }")
    for name, dirs in pairs.items():
        assert dirs["prefill"] != dirs["decode"], f"{name}: prefill and decode share local_dir {dirs['prefill']}"
        assert dirs["prefill"].is_dir() and dirs["decode"].is_dir(), f"{name}: a role's local_dir is missing {dirs}"
