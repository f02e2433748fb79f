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


# ---- through the frontend, with fake engines (the same behaviours run against real vLLM in the suite)


@pytest.fixture
def vlm_cluster(tmp_path):
    from harness.cluster import Cluster

    made = []

    def make(**kw) -> Cluster:
        c = Cluster(tmp_path / f"vlm{len(made)}", cached_tiny_vlm(), "vlm", block_size=32, lease_s=3.0, timeout_s=10,
                    **kw).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def chat_through(cluster, image_index: int, **extra) -> requests.Response:
    return requests.post(f"{cluster.url}/v1/chat/completions", timeout=30, json={
        "model": "vlm", "messages": chat(image(image_data_url(image_index)), TEXT), "max_tokens": 4, **extra})


def two_aggregated(cluster, fake_engines):
    workers = [fake_engines("aggregated", name=f"w{i}") for i in range(2)]
    for w in workers:
        cluster.register(w)
    cluster.wait_until(lambda c: len(c.frontend.manager.models["vlm"].engine.instances()) == 2
                       if "vlm" in c.frontend.manager.models else False, "two workers")
    return workers


def test_an_image_request_reaches_the_engines_chat_api_with_the_same_image(vlm_cluster, fake_engines):
    cluster = vlm_cluster(selection="kv")
    workers = two_aggregated(cluster, fake_engines)
    resp = chat_through(cluster, 0)
    assert resp.status_code == 200, resp.text
    [body] = [b for w in workers for b in w.state.bodies]
    assert body["messages"] == chat(image(image_data_url(0)), TEXT), "the engine must get the image the frontend hashed"
    assert body["return_token_ids"] is True and "prompt" not in body
    assert "token_ids" not in resp.json()["choices"][0], "token ids the client did not ask for are not passed on"


def test_an_engine_that_ran_another_prompt_is_an_error_not_a_silent_misroute(vlm_cluster, fake_engines):
    cluster = vlm_cluster()
    [worker] = [fake_engines("aggregated", chat_prompt_ids=[1, 2, 3])]
    cluster.register(worker)
    cluster.wait_for_roles({"aggregated"})
    resp = chat_through(cluster, 0)
    assert resp.status_code == 502
    assert "ran a prompt of 3 tokens, the frontend hashed" in resp.json()["error"]["message"]


@pytest.mark.parametrize("router, other_image_looks_cached", [(None, False), ("hash_text_only", True)])
def test_the_router_predicts_hits_for_the_same_image_only(vlm, vlm_cluster, fake_engines, router,
                                                          other_image_looks_cached):
    from fixtures.planted_router import planted

    cluster = vlm_cluster(selection="kv", **({"router": planted(router)} if router else {}))
    two_aggregated(cluster, fake_engines)
    first, again, other = (chat_through(cluster, i) for i in (10, 10, 11))
    predicted = [int(r.headers["x-disagg-predicted-cached-blocks"]) for r in (first, again, other)]
    msgs = chat(image(image_data_url(10)), TEXT)
    full_blocks = len(vlm.prepare_chat(msgs, load_images(msgs)).token_ids) // 32
    assert predicted == [0, full_blocks, full_blocks if other_image_looks_cached else 0]
    assert again.headers["x-disagg-decode-worker"] == first.headers["x-disagg-decode-worker"]


def test_an_image_for_a_text_only_model_is_a_400(cluster, fake_engines):
    engine = fake_engines("aggregated")
    cluster.register(engine)
    cluster.wait_for_roles({"aggregated"})
    resp = requests.post(f"{cluster.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": chat(image(image_data_url(0)), TEXT), "max_tokens": 4})
    assert resp.status_code == 400 and "cannot take images" in resp.json()["error"]["message"]
    assert engine.state.bodies == [], "nothing reached the engine"
