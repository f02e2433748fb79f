"""The one health probe every launcher, registration and check uses: `GET {url}/health` is 200."""

from __future__ import annotations

import requests


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False
