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
        from transformers import AutoProcessor, AutoTokenizer  # heavy; only when a model is loaded

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
            processor = None
            if (local_dir / "preprocessor_config.json").exists() or (local_dir / "processor_config.json").exists():
                processor = AutoProcessor.from_pretrained(str(local_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PreprocessorError(f"model {card.display_name!r}: cannot load from {local_dir}: {exc}") from exc
        config = json.loads((local_dir / "config.json").read_text()) if (local_dir / "config.json").exists() else {}
        return cls(card.display_name, local_dir, tokenizer, processor, config)

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None and hasattr(self.processor, "image_processor")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
