"""Whether the Hugging Face hub can be reached, asked once per process.

Without it, an offline machine spends ~25 s in huggingface_hub's retries before a hub id that
is not cached fails; with it, the loaders switch to the local cache at once (a cached model
still loads) and an uncached one fails in a few seconds with our one-line message."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:  # no DNS, no route, refused, timed out
        return False


def local_only(requested: bool) -> bool:
    """local_files_only for a hub call: as configured, or forced when the hub is unreachable."""
    return bool(requested) or not hub_reachable()
