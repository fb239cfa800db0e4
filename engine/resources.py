"""Time and peak memory of a step: CUDA's max_memory_allocated, or peak RSS on CPU."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return ru * scale / 1e9


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        return peak_rss_gb()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float:
    """GPU peak allocated memory on CUDA, peak RSS on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


class Timings:
    """Named phase timings: `with timings.phase("forward"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self, ndigits: int = 4) -> dict[str, float]:
        return {k: round(v, ndigits) for k, v in self.seconds.items()}
