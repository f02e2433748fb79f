"""The embedded default deployment: the harness resolver over generated fixture models.

Cards cover the three ways a frontend meets a model: shared storage (local paths), self-host
(metadata URLs on the worker), and the local Hugging Face cache (hf:// after the rungs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fixtures.hf_cache import add_snapshot
from fixtures.multimodal import make_multimodal_model
from fixtures.text_model import make_text_model
from fixtures.weights import add_weight_files
from harness.deployment import EMBEDDED, CardUnderTest, Deployment
from harness.resolve import Resolver
from harness.worker.card_builder import build_card
from harness.worker.metadata_server import MetadataServer

HF_REPO = "acme/tiny-llama"


def make_models(root: Path) -> dict[str, Path]:
    """Generate the fixture model dirs (idempotent: an existing tree is reused)."""
    models = {"text": root / "text", "multimodal": root / "multimodal", "hub": root / "hub"}
    if not (root / ".complete").exists():
        make_text_model(models["text"])
        add_weight_files(models["text"])
        make_multimodal_model(models["multimodal"])
        add_weight_files(models["multimodal"])
        add_snapshot(models["hub"], HF_REPO, models["text"])
        (root / ".complete").touch()
    return models


def hub_card(models: dict[str, Path]) -> CardUnderTest:
    """What a worker on another host publishes for a hub model: its own paths, the repo id as source."""
    snapshot = next((models["hub"] / f"models--{HF_REPO.replace('/', '--')}" / "snapshots").iterdir())
    card = build_card(snapshot, HF_REPO)
    elsewhere = {f.name: f"/worker-host/hf/{HF_REPO}/{f.name}" for _, f in card.checked_files()}
    card = dataclasses.replace(card.with_paths(elsewhere), source_path=HF_REPO)
    return CardUnderTest("text-hf-cache", card, snapshot, "hf-cache")


def build_embedded(models: dict[str, Path], cache_root: Path, server: MetadataServer) -> Deployment:
    text, mm = models["text"], models["multimodal"]
    cards = [
        CardUnderTest("text-shared-storage", build_card(text, "acme/Tiny-Llama"), text, "shared-storage"),
        CardUnderTest("text-self-host", server.publish(text, "acme/Tiny-Llama", worker_type="decode"),
                      text, "self-host"),
        CardUnderTest("text-self-host-prefill", server.publish(text, "acme/Tiny-Llama", worker_type="prefill"),
                      text, "self-host"),
        CardUnderTest("multimodal-shared-storage", build_card(mm, "acme/Tiny-Llava"), mm, "shared-storage"),
        CardUnderTest("multimodal-self-host", server.publish(mm, "acme/Tiny-Llava"), mm, "self-host"),
        hub_card(models),
    ]
    resolver = Resolver(cache_root, hf_cache=models["hub"])
    for c in cards:
        resolver.resolve(c.card)
    return Deployment(EMBEDDED, cache_root=cache_root, cards=cards)


EMBEDDED_LABELS = ("text-shared-storage", "text-self-host", "text-self-host-prefill", "multimodal-shared-storage",
                   "multimodal-self-host", "text-hf-cache")
