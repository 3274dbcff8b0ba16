"""How a setting is declared: once, on the attrs field that holds its value.

A field made by `setting` (or `array`) carries a `Setting`: the key, how its text is
converted, the default and a one-line doc; its annotation is the type. Everything else
is derived from those fields by `declared`: the list of known keys, the loader, and the
configuration tables in README.md and docs/configuration.md. A `section` field nests the
settings of one ``Section:`` prefix; a `record` field holds a record defined elsewhere
(the MIME limits) whose fields are settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import attrs

__all__ = ["Declared", "Setting", "array", "build", "declared", "record", "section", "setting"]

_T = TypeVar("_T")
_R = TypeVar("_R")

_SETTING: Final = "relate_smtp.setting"
_SECTION: Final = "relate_smtp.section"
_RECORD: Final = "relate_smtp.record"


@attrs.frozen(kw_only=True)
class Setting:
    """One configuration key: everything the loader and the documentation need."""

    key: str  # canonical spelling, used in messages: "Smtp:Mx:Port"
    convert: Callable[[str, str], object]
    default: object
    doc: str  # the "meaning" column of the configuration tables
    original: bool = False  # a key of the original C# host (not one added here)
    many: bool = False  # an array: one value per index, each converted
    verbatim: bool = False  # the text as given: spaces kept, blank is a value
    shown: Callable[[Any], str] | str | None = None  # the default as the docs show it

    @property
    def environment_variable(self) -> str:
        """How the key is spelled as an environment variable (first index of an array)."""
        return self.key.replace(":", "__") + ("__0" if self.many else "")


@attrs.frozen
class Declared:
    """A setting and where its value lives in `Settings` (attribute names, outermost first)."""

    path: tuple[str, ...]
    setting: Setting


def setting(
    key: str,
    convert: Callable[[str, str], _T],
    default: _T,
    doc: str,
    *,
    original: bool = False,
    verbatim: bool = False,
    shown: Callable[[_T], str] | str | None = None,
) -> _T:
    """A field holding one value; blank or absent means ``default``."""
    declaration = Setting(
        key=key,
        convert=convert,
        default=default,
        doc=doc,
        original=original,
        verbatim=verbatim,
        shown=shown,
    )
    return attrs.field(default=default, metadata={_SETTING: declaration})


def array(
    key: str,
    convert: Callable[[str, str], _T],
    default: tuple[_T, ...],
    doc: str,
    *,
    original: bool = False,
) -> tuple[_T, ...]:
    """A field holding an array: indexes merge per source, repeats are dropped."""
    declaration = Setting(
        key=key, convert=convert, default=default, doc=doc, original=original, many=True
    )
    return attrs.field(default=default, metadata={_SETTING: declaration})


def section(default: _T) -> _T:
    """A field holding the settings record of one section, ``default`` its defaults."""
    return attrs.field(default=default, metadata={_SECTION: True})


def record(default: _R, **settings: Setting) -> _R:
    """A field holding a record from elsewhere whose attributes are these settings."""
    return attrs.field(default=default, metadata={_RECORD: settings})


def declared(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Declared]:
    """Every setting of ``cls`` and its sections, in field order."""
    for field in attrs.fields(cls):
        path = (*prefix, field.name)
        if _SETTING in field.metadata:
            yield Declared(path, field.metadata[_SETTING])
        elif _SECTION in field.metadata:
            yield from declared(type(field.default), path)
        elif _RECORD in field.metadata:
            settings: Mapping[str, Setting] = field.metadata[_RECORD]
            for name, declaration in settings.items():
                yield Declared((*path, name), declaration)


def build(cls: type[_T], values: Mapping[tuple[str, ...], object]) -> _T:
    """An instance of ``cls`` with ``values`` (by path) over the declared defaults."""
    built: _T = _build(cls, (), values)
    return built


def _build(
    cls: type[Any], prefix: tuple[str, ...], values: Mapping[tuple[str, ...], object]
) -> Any:
    changes: dict[str, object] = {}
    for field in attrs.fields(cls):
        path = (*prefix, field.name)
        if _SETTING in field.metadata:
            if path in values:
                changes[field.name] = values[path]
        elif _SECTION in field.metadata:
            changes[field.name] = _build(type(field.default), path, values)
        elif _RECORD in field.metadata:
            given = {
                name: values[(*path, name)]
                for name in field.metadata[_RECORD]
                if (*path, name) in values
            }
            changes[field.name] = attrs.evolve(field.default, **given) if given else field.default
    return cls(**changes)
