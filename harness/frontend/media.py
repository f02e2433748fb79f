"""Images in chat requests (SPEC §2.6, §4.3): read each `image_url` part, decode it, hash its content.

Data URLs are always read. http(s) URLs are fetched only when the frontend was started with
`allow_remote_media`, as vLLM's `--allowed-media-domains` keeps a server from fetching whatever a
client names. Every refusal is a `MediaError` (HTTP 400) that says which part was wrong and why.

The content hash is over the decoded pixels (mode, size, bytes), not the encoded file: the same
picture is the same blocks to the router whether it came as PNG or as a re-encoded PNG, which is
how engines key their own prefix caches.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import blake3

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image, encoded
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decoded; PIL raises beyond twice its own default otherwise


class MediaError(ValueError):
    """An image part the frontend will not take; the message names the part."""


@dataclass(frozen=True)
class ImageInput:
    part: str  # where it was in the request, e.g. "messages[0].content[1]"
    image: Any  # PIL.Image.Image, RGB
    content_hash: bytes

    @property
    def hash_hex(self) -> str:
        return self.content_hash.hex()


def image_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(where, url) of every image part, in prompt order."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise MediaError(f"messages[{i}].content[{j}]: image_url has no url")
                found.append((f"messages[{i}].content[{j}]", url))
            elif isinstance(part, dict) and part.get("type") in ("input_audio", "video_url", "audio_url"):
                raise MediaError(f"messages[{i}].content[{j}]: {part['type']} is not supported; images only")
    return found


def read_bytes(where: str, url: str, allow_remote: bool, timeout_s: float = 30.0) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise MediaError(f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MiB")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{where}: the data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise MediaError(f"{where}: remote image URLs are not fetched by this frontend ({url[:80]}); send a "
                             f"data: URL, or start the frontend with --allow-remote-media")
        return fetch(where, url, timeout_s)
    raise MediaError(f"{where}: unsupported image URL scheme in {url[:40]!r}; use data: (or http(s) when allowed)")


def fetch(where: str, url: str, timeout_s: float) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise MediaError(f"{where}: fetching {url} gave HTTP {resp.status_code}")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_IMAGE_BYTES:
                    raise MediaError(f"{where}: {url} is over {MAX_IMAGE_BYTES // 2**20} MiB")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise MediaError(f"{where}: cannot fetch {url}: {type(exc).__name__}: {exc}") from None


def decode(where: str, data: bytes) -> ImageInput:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{where}: the image is {opened.width}x{opened.height}, over "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            image = opened.convert("RGB")
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many kinds for a file that is not an image
        raise MediaError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from None
    h = blake3.blake3(b"image\x00" + image.mode.encode() + f"{image.width}x{image.height}".encode() + b"\x00")
    h.update(image.tobytes())
    return ImageInput(where, image, h.digest())


def load_images(messages: list[dict], allow_remote: bool = False) -> list[ImageInput]:
    """Every image of the request, decoded and hashed, in prompt order."""
    return [decode(where, read_bytes(where, url, allow_remote)) for where, url in image_parts(messages)]
