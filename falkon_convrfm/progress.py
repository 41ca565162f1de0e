"""Progress bars of the long phases (tqdm on stderr: count, rate and ETA), through one helper.

An estimator turns bars on for the duration of a public call with :func:`scoped` (its
``progress`` parameter). A phase opens a bar with :func:`phase` (a known amount of work in some
unit) or wraps a loop with :func:`steps`; code deep inside a phase that is not handed the bar
(kernel blocks evaluated by Falkon, row chunks of a product) reports work done with
:func:`advance`, which moves the innermost open bar of the same unit. Outside a :func:`scoped`
call nothing is shown, and a phase's bar appears only once it has run for :data:`DELAY` seconds,
so short phases print nothing (the outer loops of a fit, ``steps(..., leave=True)``, show at once).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

from tqdm.auto import tqdm

DELAY = 2.0  # seconds a phase runs before its bar is drawn
KERNEL_ENTRIES = "entries"  # the unit of phases measured in kernel matrix entries

_enabled = contextvars.ContextVar("falkon_convrfm_progress", default=False)
_open = []  # the open bars, innermost last (a plain list: kernel blocks may run in Falkon's threads)


def scoped(method):
    """Decorate an estimator method: bars are shown during the call iff ``self.progress``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        token = _enabled.set(bool(getattr(self, "progress", False)))
        try:
            return method(self, *args, **kwargs)
        finally:
            _enabled.reset(token)
    return wrapper


def _bar(desc: str, total, unit: str, leave: bool, iterable=None, initial: int = 0):
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                delay=0 if leave else DELAY, disable=not _enabled.get(), unit_scale=unit == KERNEL_ENTRIES,
                dynamic_ncols=True)


@contextlib.contextmanager
def phase(desc: str, total: int, unit: str = KERNEL_ENTRIES):
    """A bar for ``total`` units of work; :func:`advance` in that unit moves it."""
    bar = _bar(desc, total, unit, leave=False)
    entry = (unit, bar)
    _open.append(entry)
    try:
        yield bar
    finally:
        _open[:] = [e for e in _open if e is not entry]  # by identity (tqdm's == compares positions)
        bar.close()


def steps(iterable, desc: str, total: int | None = None, unit: str = "it", initial: int = 0, leave: bool = False):
    """``iterable`` with a bar (``leave``: the bar stays after the loop, for the outer loops of a fit)."""
    return _bar(desc, total if total is not None else len(iterable), unit, leave, iterable, initial)


def progress_rows(n: int, unit: str = KERNEL_ENTRIES, pieces: int = 50, minimum: int = 256) -> int:
    """Rows per chunk of an n-row block: n unless a bar of ``unit`` is drawn, else about n / ``pieces``
    (at least ``minimum``), so that the bar moves within one large block."""
    if not any(bar_unit == unit and not bar.disable for bar_unit, bar in _open):
        return n
    return max(minimum, -(-n // pieces))


def advance(amount: int, unit: str = KERNEL_ENTRIES) -> None:
    """Report ``amount`` units of work done to the innermost open :func:`phase` of ``unit``."""
    for bar_unit, bar in reversed(_open):
        if bar_unit == unit:
            bar.update(amount)
            return
