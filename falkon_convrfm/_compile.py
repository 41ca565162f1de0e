"""``torch.compile`` for the element-wise maps and reductions, with an eager fallback.

Blocks with at least ``COMPILE_MIN_EVALS`` element evaluations use the compiled function (map and
reduction fused into one pass over the GEMM output); smaller ones run eagerly, where compilation
would not pay. ``FALKON_CONVRFM_COMPILE=0`` disables compilation.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

COMPILE_MIN_EVALS = 2**24
COMPILE_ENABLED = os.environ.get("FALKON_CONVRFM_COMPILE", "1") != "0"
TORCH_COMPILE_OK = hasattr(torch, "compile") and sys.platform.startswith("linux")
_COMPILE_FAILED = []


def use_compiled(evaluations: int) -> bool:
    """Whether a block of ``evaluations`` element evaluations runs the compiled function."""
    return COMPILE_ENABLED and TORCH_COMPILE_OK and evaluations >= COMPILE_MIN_EVALS


@functools.lru_cache(maxsize=None)
def compiled_fn(fn):
    """``fn`` through ``torch.compile``, falling back to eager ``fn`` for good, with one warning, if
    compilation does not work here (no C++ toolchain, ...). Shapes are static at first and turn
    dynamic at the first change (torch's automatic dynamic shapes): block sizes vary (row blocks,
    the location counts of pooling offsets), and one static graph per shape would hit torch's
    recompile limit (8) and fall back to eager with a warning."""
    fast = torch.compile(fn, dynamic=None)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _COMPILE_FAILED or not COMPILE_ENABLED or not TORCH_COMPILE_OK:
            return fn(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as exc:
            _COMPILE_FAILED.append(exc)
            warnings.warn(f"torch.compile failed ({exc!r:.200}); using eager torch", stacklevel=2)
            return fn(*args, **kwargs)

    return run
