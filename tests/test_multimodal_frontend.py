"""The frontend's multimodal half, without engines: image parts read safely, placeholder spans
found, block hashes that carry the image, and the suite's own reading of a missing usage."""

from __future__ import annotations

import base64
import io

import pytest
import requests

from fixtures.tiny_vlm import IMAGE_TOKENS, cached_tiny_vlm, image_data_url, image_png
from harness.frontend.kv_index import block_hashes
from harness.frontend.media import MAX_IMAGE_BYTES, MediaError, decode, load_images
from harness.frontend.preprocessor import Preprocessor
from suites.multimodal import cached_tokens

pytestmark = pytest.mark.harness_code


def chat(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is in the picture? Describe the colours and the stripes."}


@pytest.fixture(scope="module")
def vlm() -> Preprocessor:
    return Preprocessor.from_dir("tiny-vlm", cached_tiny_vlm())


def test_generated_images_are_deterministic_and_distinct():
    assert image_png(3) == image_png(3)
    assert len({image_png(i) for i in range(8)}) == 8


def test_the_content_hash_is_of_the_pixels_not_the_file():
    from PIL import Image

    png = image_png(1)
    reencoded = io.BytesIO()
    Image.open(io.BytesIO(png)).save(reencoded, format="PNG", compress_level=9)
    assert reencoded.getvalue() != png
    assert decode("a", png).content_hash == decode("b", reencoded.getvalue()).content_hash
    assert decode("a", png).content_hash != decode("c", image_png(2)).content_hash


@pytest.mark.parametrize("url, says", [
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a-but-not-really").decode(), "not a readable image"),
    ("file:///etc/passwd", "unsupported image URL scheme"),
    ("http://127.0.0.1:9/cat.png", "remote image URLs are not fetched"),
])
def test_a_bad_image_part_is_refused_naming_the_part_and_the_reason(url, says):
    with pytest.raises(MediaError, match=says) as caught:
        load_images(chat(TEXT, image(url)))
    assert "messages[0].content[1]" in str(caught.value)


def test_an_oversized_image_is_refused_before_it_is_decoded():
    huge = "data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)
    with pytest.raises(MediaError, match="over 20 MiB"):
        load_images(chat(image(huge)))


def test_remote_images_are_fetched_only_when_allowed(tmp_path):
    from harness.http_server import BackgroundServer
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    app.get("/cat.png")(lambda: Response(image_png(4), media_type="image/png"))
    with BackgroundServer(app, name="images") as server:
        url = f"{server.url}/cat.png"
        with pytest.raises(MediaError, match="--allow-remote-media"):
            load_images(chat(image(url)))
        [fetched] = load_images(chat(image(url)), allow_remote=True)
    assert fetched.content_hash == decode("x", image_png(4)).content_hash


def test_the_processor_expands_the_image_into_one_span_of_placeholders(vlm):
    [img] = load_images(chat(image(image_data_url(0)), TEXT))
    prompt = vlm.prepare_chat(chat(image(image_data_url(0)), TEXT), [img])
    [span] = prompt.media
    assert span.end - span.start == IMAGE_TOKENS
    assert set(prompt.token_ids[span.start:span.end]) == {vlm.image_token_id}
    assert span.content_hash == img.content_hash and prompt.messages is not None


def test_a_text_only_model_refuses_images_naming_the_missing_processor_file(tmp_path, vlm):
    import shutil

    broken = tmp_path / "local_dir"
    shutil.copytree(vlm.local_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "processor_config.json").unlink()
    pre = Preprocessor.from_dir("tiny-vlm", broken)
    msgs = chat(image(image_data_url(0)), TEXT)
    with pytest.raises(MediaError, match="no preprocessor_config.json"):
        pre.prepare_chat(msgs, load_images(msgs))


def test_the_image_enters_every_block_hash_from_its_first_placeholder_on(vlm):
    prompts = []
    for i in (0, 1):
        msgs = chat(image(image_data_url(i)), TEXT)
        prompts.append(vlm.prepare_chat(msgs, load_images(msgs)))
    a, b = prompts
    assert a.token_ids == b.token_ids, "the placeholders are the same tokens for any image"
    spans = lambda p: [(m.start, m.end, m.content_hash) for m in p.media]  # noqa: E731
    ha, hb = block_hashes(a.token_ids, 32, spans(a)), block_hashes(b.token_ids, 32, spans(b))
    assert ha and all(x != y for x, y in zip(ha, hb)), "a block that holds (or follows) the image must differ"
    assert block_hashes(a.token_ids, 32) == block_hashes(b.token_ids, 32), "text-only hashes cannot tell them apart"


def test_a_missing_prompt_tokens_details_is_reported_as_missing_not_as_zero():
    def response(usage: dict) -> requests.Response:
        r = requests.Response()
        r.status_code, r._content = 200, __import__("json").dumps({"usage": usage}).encode()
        return r

    assert cached_tokens(response({"prompt_tokens": 10})) == "missing"
    assert cached_tokens(response({"prompt_tokens": 10, "prompt_tokens_details": None})) == "missing"
    assert cached_tokens(response({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}})) == 0
