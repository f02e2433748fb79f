"""Engines a user runs: given by URL, never started or stopped by us."""

from __future__ import annotations

from dataclasses import dataclass

from harness.engines.health import is_healthy
from harness.errors import HarnessError


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


class RoleUrlError(HarnessError, ValueError):
    """A ROLE=URL option that is not one."""


def role_url(value: str, option: str, roles: tuple[str, ...], what: str = "URL",
             schemes: tuple[str, ...] = ("http://", "https://")) -> tuple[str, str]:
    """(role, url) of a `ROLE=URL` command-line value; anything else is an error naming the option."""
    role, sep, url = value.partition("=")
    if not sep or role not in roles or not url.startswith(schemes):
        named = ", ".join(roles[:-1]) + " or " + roles[-1] if len(roles) > 1 else roles[0]
        raise RoleUrlError(f"{option} {value!r} must be ROLE={what} with ROLE {named}")
    return role, url.rstrip("/")


def parse_engine_urls(values: list[str]) -> list[ExternalEngine]:
    """`role=url` pairs from the command line, e.g. `decode=http://10.0.0.5:8000`."""
    engines = []
    for value in values:
        role, url = role_url(value, "--engine-url", ("prefill", "decode", "aggregated"))
        engines.append(ExternalEngine(f"external-{role}-{len(engines)}", role, url))
    return engines
