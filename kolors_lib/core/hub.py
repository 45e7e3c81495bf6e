"""The ModelScope hub: where it is, and whether this machine can reach it."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

DEFAULT_HUB = "https://www.modelscope.cn"


def hub_endpoint() -> str:
    """The ModelScope hub address: $MODELSCOPE_ENDPOINT, else the public site."""
    return os.environ.get("MODELSCOPE_ENDPOINT") or DEFAULT_HUB


def hub_reachable(endpoint: str | None = None, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub host opens within `timeout` seconds (DNS included)."""
    url = endpoint or hub_endpoint()
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])
