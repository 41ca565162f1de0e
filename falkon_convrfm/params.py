"""Estimator parameters declared once: name, rule (type and range or choices), help, option.

Each estimator lists its parameters as :class:`Param` entries whose defaults are those of its
``__init__`` signature; from the list come the estimator's checks (:func:`check_params`, in the
spirit of scikit-learn's ``_parameter_constraints``) and the command line's options
(:func:`option_type`, used by :mod:`falkon_convrfm.cli`). A rule checks a value
(``check(name, value)``: the value, or a one-line ``ValueError`` / ``TypeError`` naming the
parameter) and reads one from command-line text (``parse(text)``).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os

from ._compat import resolve_device
from .validation import check_bool, check_choice, check_pool_window, check_pooling, check_sigma, number_in, positive_int, positive_number


def _join(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


class Rule:
    """What a parameter admits. Subclasses define ``check``, ``words`` (phrases naming what is
    admitted) and, for the command line, ``parse``."""

    def check(self, name: str, value):
        raise NotImplementedError

    def words(self) -> list:
        raise NotImplementedError

    def admits(self, value) -> bool:
        """Whether ``value`` is of a type this rule reads (its range is ``check``'s business)."""
        return True

    def parse(self, text: str):
        """The value a command-line ``text`` stands for (ValueError naming what was expected)."""
        return text

    def expected(self, text: str) -> ValueError:
        return ValueError(f"expected {_join(self.words())}, got {text!r}")


class _Number(Rule):
    """A number of type ``kind`` (bools refused), read from text by ``read``."""

    kind, read = numbers.Real, float

    def admits(self, value):
        return isinstance(value, self.kind) and not isinstance(value, bool)

    def parse(self, text):
        try:
            return self.read(text)
        except ValueError:
            return self.check("value", text)  # raises, naming what was expected


@dataclasses.dataclass(frozen=True)
class Integer(_Number):
    """An integer ≥ ``minimum``."""

    minimum: int = 1
    kind, read = numbers.Integral, int

    def check(self, name, value):
        return positive_int(name, value, self.minimum)

    def words(self):
        return [f"an integer >= {self.minimum}"]


@dataclasses.dataclass(frozen=True)
class Positive(_Number):
    """A finite number > 0."""

    def check(self, name, value):
        return positive_number(name, value)

    def words(self):
        return ["a positive number"]


@dataclasses.dataclass(frozen=True)
class Interval(Positive):
    """A finite number in [low, high] ([low, high) when ``high_open``); high may be ∞."""

    low: float = 0.0
    high: float = math.inf
    high_open: bool = False

    def check(self, name, value):
        return number_in(name, value, self.low, self.high, self.high_open)

    def words(self):
        if self.high == math.inf:
            return [f"a number >= {self.low:g}"]
        return [f"a number in [{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"]


@dataclasses.dataclass(frozen=True)
class Bandwidth(Positive):
    """A positive finite number, or one of the strings ``allow`` (e.g. 'median')."""

    allow: tuple = ("median",)

    def check(self, name, value):
        return check_sigma(value, allow=self.allow)

    def words(self):
        return ["a positive number", *map(repr, self.allow)]

    def parse(self, text):
        return text if text in self.allow else _float_or_text(text)


def _float_or_text(text: str):
    """The number ``text`` stands for, else the text itself (for the check to name)."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclasses.dataclass(frozen=True)
class OneOf(Rule):
    """One of ``choices`` (strings, None, bools); on the command line None is ``none``. The
    choices may be a mapping (its keys, read when checked: a registry that grows)."""

    choices: object

    def options(self) -> tuple:
        return tuple(self.choices)

    def check(self, name, value):
        return check_choice(name, value, self.options())

    def words(self):
        return [repr(c) for c in self.cli_choices()]

    def admits(self, value):
        return any(value is c or (isinstance(c, str) and isinstance(value, str)) for c in self.options())

    def cli_choices(self) -> list:
        """The choices as command-line words (None: ``none``; choices that are not words left out)."""
        return ["none" if c is None else c for c in self.options() if c is None or isinstance(c, str)]

    def parse(self, text):
        value = None if text == "none" and None in self.options() else text
        if value not in self.options():
            raise self.expected(text)
        return value


@dataclasses.dataclass(frozen=True)
class AnyOf(Rule):
    """What any of ``rules`` admits; a value is checked by the first rule that reads its type."""

    rules: tuple

    def check(self, name, value):
        rule = next((r for r in self.rules if r.admits(value)), self.rules[-1])
        return rule.check(name, value)

    def words(self):
        return [w for r in self.rules for w in r.words()]

    def admits(self, value):
        return any(r.admits(value) for r in self.rules)

    def parse(self, text):
        for rule in self.rules:
            try:
                return rule.parse(text)
            except ValueError:
                pass
        raise self.expected(text)


@dataclasses.dataclass(frozen=True)
class OddInteger(Integer):
    """An odd integer ≥ 1 (a window centred on each location)."""

    def check(self, name, value):
        return check_pool_window(value)

    def words(self):
        return ["an odd integer >= 1"]


@dataclasses.dataclass(frozen=True)
class Checked(Rule):
    """A value checked by ``function(name, value)`` (its errors name the parameter); ``text``
    names what it admits."""

    function: object
    text: str

    def check(self, name, value):
        return self.function(name, value)

    def words(self):
        return [self.text]


def _existing_device(name, value):
    try:
        resolve_device(value)  # CUDA asked for without CUDA: RuntimeError
    except RuntimeError as exc:
        if "Invalid device" not in str(exc):  # torch's words for a name that is no device
            raise
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None
    return value


def _factors(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive factors, got {value!r}")
    return tuple(positive_number(f"{name}[{i}]", factor) for i, factor in enumerate(value))


def _image_shape(name, value):
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be None or (c, H, W), got {value!r}")
    return tuple(positive_int(f"{name}[{i}]", size) for i, size in enumerate(value))


def _path_or_none(name, value):
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be None or a path, got {type(value).__name__}")
    return value


DEVICE = Checked(_existing_device, "'cpu' or 'cuda'")  # a torch device that exists here
FLAG = Checked(check_bool, "True or False")  # numpy bools included
FACTORS = Checked(_factors, "a non-empty sequence of positive numbers")
IMAGE_SHAPE = Checked(_image_shape, "None or (c, H, W)")
PATH_OR_NONE = Checked(_path_or_none, "None or a path")


class Pooling(Checked):
    """An int g (a g×g grid of regions) or (window, stride); command line ``3`` or ``5,3``."""

    def parse(self, text):
        try:
            parts = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise self.expected(text) from None
        return parts[0] if len(parts) == 1 else parts


POOLING = Pooling(lambda name, value: check_pooling(value), "an integer g (g×g regions) or 'window,stride'")


SEED = AnyOf((OneOf((None,)), Integer(0)))  # None (a fresh seed) or a seed


@dataclasses.dataclass(frozen=True)
class Param:
    """One estimator parameter: its ``rule``, a one-line ``help``, and the command-line
    ``option`` that sets it (None: not on the command line) with its ``metavar``."""

    name: str
    rule: Rule
    help: str
    option: str | None = None
    metavar: str | None = None


def table(*params: Param) -> dict:
    """Parameters by name, in order."""
    return {p.name: p for p in params}


def check_params(params: dict, obj) -> None:
    """Check every parameter of ``params`` on ``obj`` (its attributes of the same names)."""
    for p in params.values():
        p.rule.check(p.name, getattr(obj, p.name))


def param_default(cls, name: str):
    """The default of parameter ``name`` in ``cls.__init__`` (the one source of defaults)."""
    return inspect.signature(cls.__init__).parameters[name].default


def option_type(name: str, rule: Rule):
    """An argparse ``type`` for ``rule``: the value ``parse`` reads, checked; an error becomes the
    one-line usage error (argparse would turn a ValueError into ``invalid ... value``)."""
    import argparse

    def convert(text):
        try:
            value = rule.parse(text)
            rule.check(name, value)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: a device that is not here
            raise argparse.ArgumentTypeError(" ".join(str(exc).split())) from None
        return value

    return convert
