"""The native preprocessor (SPEC §2.6): tokenizer, chat template and processor from local_dir only.

It never looks at the worker's path or a hub: a preprocessor that re-fetched from the worker path
once hid a broken cache (SPEC §7, regression 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.card import ModelCard
from harness.errors import PreprocessorError
from harness.frontend.media import ImageInput, MediaError


@dataclass(frozen=True)
class MediaSpan:
    """Where one image's placeholder tokens sit in the prompt, and the image's content hash."""

    start: int
    end: int  # exclusive
    content_hash: bytes
    part: str = ""


@dataclass
class Prompt:
    """What the router hashes and the engine runs. `messages` is set for a request with images:
    the engine gets those (the same image bytes), and must run exactly `token_ids`."""

    token_ids: list[int]
    media: list[MediaSpan] = field(default_factory=list)
    messages: list[dict] | None = None


@dataclass
class Preprocessor:
    model: str
    local_dir: Path
    tokenizer: Any
    processor: Any = None
    _config: dict = field(default_factory=dict)

    @classmethod
    def load(cls, card: ModelCard, cache_root: str | Path) -> "Preprocessor":
        local_dir = card.local_dir(cache_root)
        if not local_dir.is_dir():
            raise PreprocessorError(
                f"model {card.display_name!r} has no local_dir at {local_dir}: resolve the card first")
        return cls.from_dir(card.display_name, local_dir)

    @classmethod
    def from_dir(cls, model: str, local_dir: Path) -> "Preprocessor":
        """Tokenizer, template and processor from one directory, with no hub and no other path."""
        from transformers import AutoProcessor, AutoTokenizer  # heavy; only when a model is loaded

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
            processor = None
            if (local_dir / "preprocessor_config.json").exists() or (local_dir / "processor_config.json").exists():
                processor = AutoProcessor.from_pretrained(str(local_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PreprocessorError(f"model {model!r}: cannot load from {local_dir}: {exc}") from exc
        config = json.loads((local_dir / "config.json").read_text()) if (local_dir / "config.json").exists() else {}
        return cls(model, local_dir, tokenizer, processor, config)

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None and hasattr(self.processor, "image_processor")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def image_token_id(self) -> int | None:
        if not self.is_multimodal:
            return None
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "image_token", "<image>"))
        return int(token_id)

    def prepare_chat(self, messages: list[dict], images: list[ImageInput]) -> Prompt:
        """Render the chat template; with images, let the processor expand each into its placeholder
        tokens, and find each image's span (SPEC §4.3)."""
        rendered = self.render_chat(messages)
        if not images:
            return Prompt(self.encode(rendered))
        if not self.is_multimodal:
            why = ("there is no preprocessor_config.json in it" if not (self.local_dir / "preprocessor_config.json").exists()
                   else "AutoProcessor loaded no image processor from it")
            raise MediaError(f"model {self.model!r} cannot take images: its local_dir {self.local_dir} has no image "
                             f"processor ({why})")
        out = self.processor(text=[rendered], images=[i.image for i in images], add_special_tokens=False)
        token_ids = [int(t) for t in out["input_ids"][0]]
        return Prompt(token_ids, media_spans(token_ids, self.image_token_id, images), messages)


def placeholder_runs(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate(token_ids + [None]):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def media_spans(token_ids: list[int], image_token_id: int, images: list[ImageInput]) -> list[MediaSpan]:
    """One span per image: one run of placeholders each, or (one image cut in tiles) first to last run."""
    runs = placeholder_runs(token_ids, image_token_id)
    if len(runs) == len(images):
        return [MediaSpan(s, e, i.content_hash, i.part) for (s, e), i in zip(runs, images)]
    if len(images) == 1 and runs:
        return [MediaSpan(runs[0][0], runs[-1][1], images[0].content_hash, images[0].part)]
    raise MediaError(f"the prompt holds {len(runs)} runs of image placeholders for {len(images)} images; "
                     f"cannot tell which blocks hold which image")
