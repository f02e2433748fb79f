"""Resolver speed, as ratios against the work it cannot avoid: hashing the same bytes.

- A warm resolve (every blob cached) must cost about what re-verifying the blobs costs.
- A cold resolve of one large file must cost about what hashing it costs (plus one copy).
"""

from __future__ import annotations

import os
import shutil

import pytest

from fixtures.text_model import make_text_model
from harness.card import CheckedFile, ModelCard, hash_file
from harness.resolve import Resolver
from harness.worker.metadata_server import MetadataServer
from benchmarks.conftest import median_seconds

WARM_LIMIT = 2.5  # warm resolve / (stat + blake3 of the same 10 files)
COLD_LIMIT = 1.5  # cold resolve / (one kernel copy + one blake3) of the 256 MiB file: the unavoidable work
LARGE = 256 << 20


@pytest.fixture(scope="module")
def ten_file_card(tmp_path_factory):
    """A self-host card with 10 files (4 typed + 6 extra), about 2.6 MiB in all, resolved once."""
    root = tmp_path_factory.mktemp("warm")
    model = make_text_model(root / "model")
    (model / "merges.txt").write_bytes(os.urandom(1 << 20).hex().encode()[: 2 << 20])
    for i in range(2):
        (model / f"extra_{i}.json").write_text('{"k": %d}\n' % i)
    with MetadataServer() as worker:
        card = worker.publish(model, "bench/ten-files")
        resolver = Resolver(root / "mdc")
        resolver.resolve(card)
    return card, resolver


def test_warm_resolve_of_a_ten_file_card(benchmark, record_ratio, ten_file_card):
    card, resolver = ten_file_card
    files = [card.local_dir(resolver.cache_root) / f.name for _, f in card.checked_files()]
    assert len(files) == 10

    def stat_and_hash():
        for f in files:
            os.stat(f)
            hash_file(f)

    baseline = median_seconds(stat_and_hash, rounds=30)
    result = benchmark.pedantic(resolver.resolve, args=(card,), rounds=30, warmup_rounds=2)
    assert result.fetched == [], "a warm resolve must not fetch"
    assert record_ratio("warm resolve, 10 files", baseline, WARM_LIMIT, files=10) <= WARM_LIMIT


@pytest.fixture(scope="module")
def large_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cold") / "big.bin"
    with open(path, "wb") as f:
        for _ in range(LARGE // (16 << 20)):
            f.write(os.urandom(16 << 20))
    return path


def test_cold_resolve_of_a_256_mib_file(benchmark, record_ratio, large_file, tmp_path):
    card = ModelCard.new("bench/large", extra_files=(CheckedFile.of_local_file(large_file),))
    cache_root = tmp_path / "mdc"

    def empty_cache():
        shutil.rmtree(cache_root, ignore_errors=True)

    copy_to = tmp_path / "copy.bin"

    def copy_and_hash():
        shutil.copyfile(large_file, copy_to)
        hash_file(copy_to)

    raw_hash = median_seconds(lambda: hash_file(large_file), rounds=5)
    floor = median_seconds(copy_and_hash, rounds=5, setup=lambda: copy_to.unlink(missing_ok=True))
    result = benchmark.pedantic(lambda: Resolver(cache_root).resolve(card), setup=empty_cache, rounds=5)
    assert result.fetched == ["big.bin"]
    # Reported as the issue asks (against raw blake3), and checked against the work that cannot be avoided.
    record_ratio("cold resolve vs raw blake3, 256 MiB", raw_hash, limit=float("inf"), bytes=LARGE)
    assert record_ratio("cold resolve vs copy+blake3, 256 MiB", floor, COLD_LIMIT, bytes=LARGE) <= COLD_LIMIT
