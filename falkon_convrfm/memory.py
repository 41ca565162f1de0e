"""Measuring memory: resident-set size of this process, and its peak while a block runs."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident-set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


@contextmanager
def peak_rss(interval: float = 0.005):
    """Sample RSS in a thread while the block runs. Yields a dict that holds, afterwards,
    ``baseline`` (bytes at entry), ``peak`` (max seen) and ``increase`` (peak − baseline)."""
    stats = {"baseline": rss_bytes()}
    stats["peak"] = stats["baseline"]
    done = threading.Event()

    def sample():
        while not done.is_set():
            stats["peak"] = max(stats["peak"], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()
        stats["peak"] = max(stats["peak"], rss_bytes())
        stats["increase"] = stats["peak"] - stats["baseline"]
