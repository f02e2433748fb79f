"""Engines a user runs: given by URL, never started or stopped by us."""

from __future__ import annotations

from dataclasses import dataclass

from harness.engines.health import is_healthy


@dataclass
class ExternalEngine:
    name: str
    role: str
    url: str

    def alive(self) -> bool:
        return self.healthy()

    def healthy(self, timeout: float = 2.0) -> bool:
        return is_healthy(self.url, timeout)

    def stop(self) -> None:
        raise RuntimeError(f"engine {self.name} at {self.url} is external: the suite does not stop it")


def parse_engine_urls(values: list[str]) -> list[ExternalEngine]:
    """`role=url` pairs from the command line, e.g. `decode=http://10.0.0.5:8000`."""
    engines = []
    for value in values:
        role, sep, url = value.partition("=")
        if not sep or role not in ("prefill", "decode", "aggregated") or not url.startswith(("http://", "https://")):
            raise ValueError(f"--engine-url {value!r} must be ROLE=URL with ROLE prefill, decode or aggregated")
        engines.append(ExternalEngine(f"external-{role}-{len(engines)}", role, url.rstrip("/")))
    return engines
