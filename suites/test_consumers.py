"""Consumers (SPEC §2.6): transformers loads tokenizer, template and processor from local_dir alone."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from fixtures.multimodal import IMAGE_TOKEN, make_multimodal_model
from fixtures.text_model import make_text_model
from fixtures.weights import add_weight_files
from harness.errors import PreprocessorError
from harness.frontend.preprocessor import Preprocessor
from harness.resolve import Resolver
from harness.worker.metadata_server import MetadataServer

pytestmark = pytest.mark.spec("2.6")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_tokenizer_loads_from_every_local_dir(deployment, card_under_test):
    from transformers import AutoTokenizer

    if card_under_test.card.slot("tokenizer") is None:
        pytest.skip(f"{card_under_test.label} has no tokenizer slot")
    local_dir = deployment.local_dir(card_under_test)
    tok = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
    assert tok("Hello, world!")["input_ids"], "the tokenizer produced no ids"


@pytest.mark.spec("2.6", "R1")
def test_the_multimodal_processor_loads_from_every_multimodal_local_dir(deployment, card_under_test):
    import json

    from transformers import AutoProcessor

    local_dir = deployment.local_dir(card_under_test)
    config = json.loads((local_dir / "config.json").read_text()) if (local_dir / "config.json").exists() else {}
    if "vision_config" not in config:
        pytest.skip(f"{card_under_test.label} is not a multimodal model (its config.json has no vision_config)")
    processor = AutoProcessor.from_pretrained(str(local_dir), local_files_only=True)
    assert getattr(processor, "image_processor", None) is not None, (
        f"AutoProcessor.from_pretrained({local_dir}) gave {type(processor).__name__} with no image processor: "
        f"preprocessor_config.json missing from local_dir? it holds {sorted(p.name for p in local_dir.iterdir())}")


@pytest.fixture
def self_hosted_then_gone(tmp_path):
    """Resolve self-host cards, then stop the worker and delete its model dirs."""
    text = add_weight_files(make_text_model(tmp_path / "worker" / "text"))
    mm = add_weight_files(make_multimodal_model(tmp_path / "worker" / "mm"))
    with MetadataServer() as worker:
        cards = {"text": worker.publish(text, "acme/Tiny-Llama"), "mm": worker.publish(mm, "acme/Tiny-Llava")}
        resolver = Resolver(tmp_path / "mdc")
        for card in cards.values():
            resolver.resolve(card)
    shutil.rmtree(tmp_path / "worker")
    return cards, tmp_path / "mdc"


@pytest.mark.spec("R5")
@pytest.mark.harness_code
def test_tokenizer_and_chat_template_load_with_the_source_removed(self_hosted_then_gone):
    cards, cache_root = self_hosted_then_gone
    pre = Preprocessor.load(cards["text"], cache_root)
    prompt = pre.render_chat(MESSAGES)
    assert prompt.startswith("<s><|user|>\nWhat is the capital") and prompt.endswith("<|assistant|>\n")
    assert pre.encode(prompt)


@pytest.mark.spec("R1", "R5")
@pytest.mark.harness_code
def test_the_multimodal_processor_loads_with_the_source_removed(self_hosted_then_gone):
    cards, cache_root = self_hosted_then_gone
    pre = Preprocessor.load(cards["mm"], cache_root)
    assert pre.is_multimodal, "AutoProcessor fell back to a bare tokenizer: preprocessor_config.json lost?"
    out = pre.processor(text=f"{IMAGE_TOKEN}\nWhat is this?", images=Image.new("RGB", (40, 40), (200, 10, 10)))
    image_id = pre.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out["input_ids"][0].count(image_id) > 1, "the image placeholder was not expanded"
    assert len(out["pixel_values"]) == 1


@pytest.mark.harness_code
def test_a_missing_local_dir_is_an_error_naming_the_model_and_the_dir(tmp_path, deployment):
    card = deployment.card("text-shared-storage").card
    with pytest.raises(PreprocessorError, match=r"acme/Tiny-Llama.*no local_dir at .*by-slug"):
        Preprocessor.load(card, tmp_path / "empty-cache")
