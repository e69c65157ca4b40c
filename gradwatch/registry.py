"""The one registration point of a diagnostic family.

A family is declared once, beside its metric (``metrics/<stem>.py``), and registered with one line in
``gradwatch.metrics`` (built-ins) or by :func:`register` (a user's own family). From the registrations
are derived: the :class:`gradwatch.WatchConfig` keyword and its validation, the package exports, the
Hugging Face ``gradwatch_<key>_<field>`` arguments and environment knobs (``gradwatch.knobs``), and the
engine's probe size (the most any built diagnostic asks for).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.config import WatchConfig


@dataclass(frozen=True)
class BuildInputs:
    """What a family's ``build`` receives at train start.

    Attributes:
        config: the whole :class:`WatchConfig`.
        watched: the watched gradient matrices (``gradwatch.engine.layers.WatchedMatrix``), shared by every
            family, selected by the config's ``include``/``exclude``/``embeddings``/``output_head``.
        model: the unwrapped model (to find attention modules, blocks, the output head).
    """

    config: WatchConfig
    watched: Sequence[Any]
    model: Any


@dataclass(frozen=True)
class Family:
    """A diagnostic family.

    Attributes:
        key: the public :class:`WatchConfig` keyword (``spectra``, ``sharpness``, ``signals``, ``stability``).
        stem: the tag prefix and module stem (``grad_spectrum``).
        config_class: a frozen dataclass of the family's options; it must have an ``every`` field.
        default_on: whether ``WatchConfig()`` switches it on.
        build: ``build(family_config, inputs) -> [Diagnostic, ...]``.
        summary: one line, for ``--help`` texts.
        knobs: the config fields exposed as ``gradwatch_<key>_<field>`` arguments and environment
            variables (scalar fields only); ``every`` is always one (0 there means off).
    """

    key: str
    stem: str
    config_class: type
    default_on: bool
    build: Callable[[Any, BuildInputs], Sequence[Any]]
    summary: str = ""
    knobs: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Register ``family`` (replacing one of the same key). Returns it, so a module can keep it."""
    if not family.key.isidentifier():
        raise ValueError(f"gradwatch: a family key must be an identifier, got {family.key!r}")
    if "every" not in getattr(family.config_class, "__dataclass_fields__", {}):
        raise ValueError(f"gradwatch: family {family.key!r}: its config class {family.config_class.__name__} "
                         "must be a dataclass with an `every` field")
    _FAMILIES[family.key] = family
    return family


def unregister(key: str) -> None:
    """Remove a registered family (tests that register a toy family clean up with this)."""
    _FAMILIES.pop(key, None)


_BUILTINS = "gradwatch.metrics"  # registers the built-in families when imported


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order (the built-ins first, loaded on first use: their
    metrics import torchmetrics, which ``import gradwatch`` alone does not)."""
    importlib.import_module(_BUILTINS)
    return tuple(_FAMILIES.values())


def family(key: str) -> Family:
    return {f.key: f for f in families()}[key]
