"""The one registration point of a diagnostic family.

A family is declared once, beside its metric (``metrics/<stem>.py``), and registered with one line in
``gradwatch.metrics`` (built-ins) or by :func:`register` (a user's own family). From the registrations
are derived, each when it is used (so a family registered after import gets them all): the
:class:`gradwatch.WatchConfig` keyword and its validation, the package exports (``gradwatch.<ConfigClass>``,
``__all__``, ``dir()``), the callbacks' signature (LightningCLI), the Hugging Face ``gradwatch_<key>_<field>``
arguments, the ``GRADWATCH_*`` environment knobs and launcher options (``gradwatch.knobs``), the report's
section (``Family.report``), and the engine's probe size (the most any built diagnostic asks for).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
        knobs: no longer needed: every field of the config class is a knob (``gradwatch_<key>_<field>``
            arguments, ``GRADWATCH_<KEY>_<FIELD>`` variables) unless ``no_knobs`` or its type says why not
            (a callable; a field shadowed by a general option); kept so that older registrations still work.
        no_knobs: ``{field: reason}`` for fields that cannot be set from text (the reason shows in the docs).
        report: the family's section of ``gradwatch report``: ``report(run, figures) -> (anchor, title, html)``
            or None (no data), or the ``"module:function"`` path of one (imported only by the report). Without
            one, the report shows every ``<stem>/`` scalar as small multiples.
    """

    key: str
    stem: str
    config_class: type
    default_on: bool
    build: Callable[[Any, BuildInputs], Sequence[Any]]
    summary: str = ""
    knobs: tuple[str, ...] = ()
    no_knobs: Mapping[str, str] = field(default_factory=dict, hash=False)
    report: Callable[[Any, Any], Any] | str | None = None

    def report_hook(self) -> Callable[[Any, Any], Any] | None:
        """``report`` as a function (a ``"module:function"`` path imported now), or None."""
        if self.report is None or callable(self.report):
            return self.report
        module, _, name = self.report.partition(":")
        return getattr(importlib.import_module(module), name)


_FAMILIES: dict[str, Family] = {}
_LISTENERS: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every :func:`register` and :func:`unregister` (the callbacks' signature for
    LightningCLI is rebuilt so)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def _changed() -> None:
    for listener in list(_LISTENERS):
        listener()


def register(family: Family) -> Family:
    """Register ``family`` (replacing one of the same key). Returns it, so a module can keep it."""
    if not family.key.isidentifier():
        raise ValueError(f"gradwatch: a family key must be an identifier, got {family.key!r}")
    if "every" not in getattr(family.config_class, "__dataclass_fields__", {}):
        raise ValueError(f"gradwatch: family {family.key!r}: its config class {family.config_class.__name__} "
                         "must be a dataclass with an `every` field")
    _FAMILIES[family.key] = family
    _changed()
    return family


def unregister(key: str) -> None:
    """Remove a registered family (tests that register a toy family clean up with this)."""
    if _FAMILIES.pop(key, None) is not None:
        _changed()


_BUILTINS = "gradwatch.metrics"  # registers the built-in families when imported


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order (the built-ins first, loaded on first use: their
    metrics import torchmetrics, which ``import gradwatch`` alone does not)."""
    importlib.import_module(_BUILTINS)
    return tuple(_FAMILIES.values())


def family(key: str) -> Family:
    return {f.key: f for f in families()}[key]
