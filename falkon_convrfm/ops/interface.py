"""The one interface of every backend, and the options that travel with a call.

A backend evaluates aligned-patch kernels over patches already transformed by the metric factor,
T1 (P, n, r) and T2 (P, m, r), with location weights ω (P,) and a base kernel object
(:mod:`falkon_convrfm.base_kernels`) and its bandwidth σ:

- ``matrix(T1, T2, base, sigma, weights, options, out=None)`` → K (n, m), written into ``out``
  when given, K_ij = Σ_p ω_p κ(T1[p, i], T2[p, j]);
- ``mmv(T1, T2, v, base, sigma, weights, options)`` → K v (n, t) without materialising K, or
  ``None`` for a backend whose kernel-vector products are Falkon's blocked products over ``matrix``;
- ``memory(num_locations, rank, outputs=0)`` → the elements one call allocates besides its
  inputs and result, in Falkon's ``extra_mem`` form (``"n"`` per row of T1, ``"m"`` per row of
  T2, ``"0"`` once): of ``matrix`` for ``outputs = 0``, of ``mmv`` with that many columns of v
  otherwise.

The backends register in :data:`falkon_convrfm.ops.backends.BACKENDS`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

PRECISIONS = ("ieee", "tf32x3", "tf32")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of a backend call; a backend ignores those that do not apply to it.

    ``precision``: inner products of the Triton kernel, ``"ieee"`` (exact float32), ``"tf32x3"``
    (split TF32, close to float32) or ``"tf32"`` (fast, ~1e-4 relative).
    """

    precision: str = "ieee"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: its name and the three functions of the interface (module docstring)."""

    name: str
    matrix: Callable
    mmv: Optional[Callable]
    memory: Callable
