"""Build the card a worker publishes for a model dir (SPEC §1.1, §1.4, §2.5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from harness.card import CheckedFile, ModelCard, Slot, WorkerType, slugify
from harness.errors import CardError
from harness.harvest import worker_extra_files

DEFAULT_ENDPOINT = "dynamo/backend/generate"  # namespace/component/endpoint, as Dynamo's vLLM worker
BASE_SUFFIX = "_base"  # the metadata route's suffix for a base model (a LoRA uses its slug)

NEEDS = {WorkerType.PREFILL: ((WorkerType.DECODE,),), WorkerType.DECODE: ((WorkerType.PREFILL,),)}


@dataclass(frozen=True)
class Endpoint:
    namespace: str
    component: str
    endpoint: str

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise CardError(f"endpoint {text!r} must be 'namespace/component/endpoint'")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.component}/{self.endpoint}"


def metadata_url(base: str, endpoint: Endpoint, slug: str, filename: str, suffix: str = BASE_SUFFIX) -> str:
    """`{base}/v1/metadata/{namespace}/{component}/{endpoint}/{slug}/{suffix}/{filename}`."""
    return (f"{base.rstrip('/')}/v1/metadata/{endpoint.namespace}/{endpoint.component}/"
            f"{endpoint.endpoint}/{slug}/{suffix}/{quote(filename)}")


def _tokenizer_slot(model_dir: Path) -> Slot | None:
    if (model_dir / "tokenizer.json").is_file():
        return Slot("tokenizer", "hf_tokenizer_json", CheckedFile.of_local_file(model_dir / "tokenizer.json"))
    if (model_dir / "tiktoken.model").is_file():
        return Slot("tokenizer", "tik_token_model", CheckedFile.of_local_file(model_dir / "tiktoken.model"))
    tiktokens = sorted(p for p in model_dir.glob("*.tiktoken") if p.is_file())
    if len(tiktokens) > 1:
        raise CardError(f"{model_dir} has more than one *.tiktoken file: {[p.name for p in tiktokens]}")
    if tiktokens:
        return Slot("tokenizer", "tik_token_model", CheckedFile.of_local_file(tiktokens[0]))
    return None


def typed_slots(model_dir: Path, custom_template: Path | None = None) -> list[Slot]:
    """The typed slots found in a model dir, in canonical order (SPEC §1.1)."""
    slots: list[Slot] = []

    def add(key: str, tag: str, name: str) -> None:
        if (model_dir / name).is_file():
            slots.append(Slot(key, tag, CheckedFile.of_local_file(model_dir / name)))

    add("model_info", "hf_config_json", "config.json")
    if (tok := _tokenizer_slot(model_dir)) is not None:
        slots.append(tok)
    add("prompt_formatter", "hf_tokenizer_config_json", "tokenizer_config.json")
    if custom_template is not None:
        slots.append(Slot("chat_template_file", "hf_chat_template", CheckedFile.of_local_file(custom_template), True))
    elif (model_dir / "chat_template.jinja").is_file():
        slots.append(Slot("chat_template_file", "hf_chat_template",
                          CheckedFile.of_local_file(model_dir / "chat_template.jinja"), False))
    else:
        add("chat_template_file", "hf_chat_template_json", "chat_template.json")
    add("gen_config", "hf_generation_config_json", "generation_config.json")
    return slots


def architectural_context_length(model_dir: Path) -> int:
    """`max_position_embeddings` from config.json, or its `text_config` for a multimodal model."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value or 0)


def build_card(
    model_dir: str | Path,
    name: str,
    *,
    worker_type: WorkerType | str | None = None,
    block_size: int = 16,
    context_length: int | None = None,
    self_host_url: str | None = None,
    endpoint: Endpoint | str = DEFAULT_ENDPOINT,
    custom_template: str | Path | None = None,
) -> ModelCard:
    """The card for `model_dir` served as `name`.

    Shared storage (no `self_host_url`): local paths, no extra files. Self-host: every typed and
    extra file becomes a metadata URL on the worker, and the extras enter the mdcsum.
    """
    source_path = str(model_dir)  # exactly as the worker was given it
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CardError(f"model dir {model_dir} does not exist")
    wt = WorkerType(worker_type) if isinstance(worker_type, str) else worker_type
    endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    slots = typed_slots(model_dir, Path(custom_template) if custom_template else None)
    extras = [CheckedFile.of_local_file(p) for p in worker_extra_files(model_dir, {s.file.name for s in slots})]
    card = ModelCard(
        display_name=name,
        slug=slugify(name),
        source_path=source_path,
        slots=tuple(slots),
        extra_files=tuple(extras) if self_host_url else (),
        context_length=context_length if context_length else architectural_context_length(model_dir),
        kv_cache_block_size=block_size,
        worker_type=wt,
        needs=NEEDS.get(wt, ()),
    )
    if self_host_url:
        names = [f.name for _, f in card.checked_files()]
        card = card.with_paths({n: metadata_url(self_host_url, endpoint, card.slug, n) for n in names})
    return card


def local_files(model_dir: str | Path, custom_template: str | Path | None = None) -> dict[str, Path]:
    """What a self-hosting worker serves: entry name -> local file (typed slots and extra files)."""
    model_dir = Path(model_dir)
    slots = typed_slots(model_dir, Path(custom_template) if custom_template else None)
    files = {s.file.name: Path(s.file.path) for s in slots}
    files.update({p.name: p for p in worker_extra_files(model_dir, set(files))})
    return files
