"""What the suites test: one deployment, built by the harness or described by a user's URLs.

The suites hold a `Deployment` and never ask which kind it is, except to skip checks that need
to reach inside the harness (fault injection), and those say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness.card import ModelCard

EMBEDDED = "embedded"
FOREIGN = "foreign"


@dataclass
class CardUnderTest:
    """A card as its worker published it, and the source dir it came from when known."""

    label: str
    card: ModelCard
    source_dir: Path | None = None
    mode: str = "unknown"  # shared-storage | self-host | hf-cache | unknown


@dataclass
class Deployment:
    kind: str
    cache_root: Path
    frontend: dict[str, Any]
    cards: list[CardUnderTest] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.kind == EMBEDDED

    def card(self, label: str) -> CardUnderTest:
        return next(c for c in self.cards if c.label == label)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "frontend": self.frontend,
            "engines": [],  # the metadata checks talk to no engine; the serving side adds them
            "cache_root": str(self.cache_root),
            "cards": [{"label": c.label, "display_name": c.card.display_name, "mode": c.mode,
                       "local_dir": str(c.card.local_dir(self.cache_root))} for c in self.cards],
        }


def embedded_frontend() -> dict[str, Any]:
    return {"name": "harness", "version": harness.__version__, "role": "reference resolver (embedded)",
            "url": None}


def foreign_cache(cache_root: Path, card_files: list[Path], frontend_url: str | None = None) -> Deployment:
    """A cache written by another frontend, e.g. Dynamo's `~/.cache/dynamo/mdc`, and its cards."""
    cards = []
    for path in card_files:
        card = ModelCard.load(path)
        src = Path(card.source_path) if card.source_path and Path(card.source_path).is_dir() else None
        cards.append(CardUnderTest(Path(path).stem, card, src))
    frontend = {"name": "foreign", "version": None, "role": "user-supplied frontend", "url": frontend_url}
    return Deployment(FOREIGN, Path(cache_root), frontend, cards=cards)
