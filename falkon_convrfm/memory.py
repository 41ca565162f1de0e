"""Memory budgets and measurement: the byte budget of a device, the memory of this machine, the
rows of a chunk that fit a budget, the resident-set size of this process and its peak while a
block runs."""
from __future__ import annotations

import math
import numbers
import os
import threading
import time
from contextlib import contextmanager

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_budget(limit=None, device="cpu", default: float = math.inf) -> float:
    """The byte budget for work on ``device``.

    ``limit``: None (no budget), a number of bytes (a user's ``max_memory``), or options with
    ``max_cpu_mem`` / ``max_gpu_mem`` (``falkon.FalkonOptions``, :class:`~falkon_convrfm.KernelOptions`),
    of which the field of ``device`` counts: ``max_gpu_mem`` on CUDA, ``max_cpu_mem`` elsewhere
    (a missing field is no budget). ``default`` stands in for no budget or an infinite one.
    """
    if limit is not None and not isinstance(limit, numbers.Real):
        field = "max_gpu_mem" if getattr(device, "type", device) == "cuda" else "max_cpu_mem"
        limit = getattr(limit, field, None)
    if limit is None or math.isinf(limit):
        return default
    return float(limit)


def machine_memory(device="cpu") -> tuple:
    """(bytes, description) of the memory a fit on ``device`` can use now: the free memory of a
    CUDA device, else the available RAM (Linux ``MemAvailable``; the physical RAM elsewhere)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024, "available CPU memory"
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_PHYS_PAGES") * _PAGE), "physical CPU memory"


def chunk_rows(budget_bytes: float, memory: dict, n: int, m: int, itemsize: int) -> int:
    """Rows of X1 per chunk (1 ≤ rows ≤ n) so that ``memory`` (elements in Falkon's ``extra_mem``
    form: ``"n"`` per row of the chunk, ``"m"`` per row of all m rows of X2, ``"0"`` once) of
    ``itemsize``-byte elements fits ``budget_bytes``; all n rows when the budget is infinite."""
    room = budget_bytes - (memory.get("m", 0) * m + memory.get("0", 0)) * itemsize
    if math.isinf(room):
        return n
    return int(max(1, min(n, room // (memory["n"] * itemsize))))


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
