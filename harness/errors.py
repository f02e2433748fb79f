"""Errors the harness raises. Each names what was wrong, so a user can act on the message."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class for every error the harness raises on purpose."""


class CardError(HarnessError, ValueError):
    """A card (or one of its fields) is malformed and is rejected before anything is written."""


class ResolveError(HarnessError):
    """Resolving a card into local_dir failed; the cache was left as it was."""


class ChecksumMismatch(ResolveError):
    def __init__(self, uri: str, expected: str, actual: str):
        self.uri, self.expected, self.actual = uri, expected, actual
        super().__init__(f"checksum mismatch for {uri}: expected blake3:{expected}, got blake3:{actual}")


class FileTooLarge(ResolveError):
    def __init__(self, uri: str, size: int | None, cap: int, how: str):
        self.uri, self.size, self.cap = uri, size, cap
        got = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{uri} is too large ({how}): {got} exceeds the cap of {cap} bytes")


class HttpStatusError(ResolveError):
    def __init__(self, uri: str, status: int):
        self.uri, self.status = uri, status
        super().__init__(f"HTTP {status} fetching {uri}")


class UnsupportedScheme(ResolveError):
    def __init__(self, uri: str, scheme: str):
        self.uri, self.scheme = uri, scheme
        super().__init__(f"unsupported URI scheme {scheme!r} in {uri} (supported: file, hf, http, https)")


class MissingCustomTemplate(ResolveError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"custom chat template {path} does not exist on this host. Fix it with a shared mount "
            f"that makes {path} visible to the frontend, or pass the frontend a model path "
            f"(--model-path) that contains the template as an overlay"
        )


class NotInHfCache(ResolveError):
    def __init__(self, repo: str, revision: str | None, detail: str = ""):
        self.repo, self.revision = repo, revision
        rev = f"@{revision}" if revision else ""
        super().__init__(f"hf://{repo}{rev} is not in the local Hugging Face cache (offline){': ' + detail if detail else ''}")


class FetchError(ResolveError):
    """A transport failure (connection refused, timeout, unreadable file)."""


class PreprocessorError(HarnessError):
    """The native preprocessor could not load a model from its local_dir."""
