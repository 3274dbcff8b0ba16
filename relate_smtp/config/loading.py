"""``load_settings``: read the sources, convert each declared setting, apply the rules."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from relate_smtp.config.declarations import Declared, Setting, build, declared
from relate_smtp.config.rules import apply_rules
from relate_smtp.config.settings import Settings
from relate_smtp.config.sources import Values, read_sources

__all__ = ["load_settings"]

_DECLARED: Final = tuple(declared(Settings))
# Environment variables outside these sections (PATH, HOME, ...) are never looked at.
_SECTIONS: Final = frozenset(item.setting.key.split(":", 1)[0].lower() for item in _DECLARED)


def load_settings(
    *,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Settings:
    """Read every configuration source in ASP.NET's order and return typed settings.

    Later sources win: defaults, ``appsettings.json`` (``config_file``, else the one in
    ``cwd`` if present), ``appsettings.{Environment}.json`` in the same directory,
    environment variables (``Smtp__Port``), then ``overrides`` (``--Smtp:Port=2587``).
    Raises `ConfigError` naming the key for a missing file or any invalid value.
    """
    base_dir = os.getcwd() if cwd is None else cwd
    sources = read_sources(
        config_file=config_file,
        overrides=overrides,
        environ=os.environ if environ is None else environ,
        cwd=base_dir,
        sections=_SECTIONS,
    )
    converted: dict[tuple[str, ...], object] = {}
    for item in _DECLARED:
        _convert(item, sources.values, converted)
    settings = attrs.evolve(build(Settings, converted), environment=sources.environment)
    return apply_rules(settings, sources, cwd=base_dir)


def _convert(item: Declared, values: Values, into: dict[tuple[str, ...], object]) -> None:
    """Convert the value a source gave; leave the path out when the default applies."""
    setting: Setting = item.setting
    if setting.many:
        items = values.items(setting.key)
        if items is not None:
            converted = (setting.convert(setting.key, element) for element in items)
            into[item.path] = tuple(dict.fromkeys(converted))  # drop repeats, keep order
        return
    value = values.get(setting.key) if setting.verbatim else values.value(setting.key)
    if value is not None:
        into[item.path] = setting.convert(setting.key, value)
