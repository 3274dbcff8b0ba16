"""Where settings come from, merged in ASP.NET's order into one case-insensitive view.

Later sources win: ``appsettings.json`` (``--config FILE``, else the one in the working
directory), ``appsettings.{Environment}.json`` beside it, environment variables
(``Smtp__Port``, ``CUSTOMCONNSTR_…``), then command-line overrides (``--Smtp:Port=2587``).
Every source is flattened into ``section:key`` paths (arrays by index) holding text, as
ASP.NET's configuration does; turning that text into typed values is the loader's job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Final

import attrs

from relate_smtp.config.errors import ConfigError

__all__ = [
    "DEFAULT_ENVIRONMENT",
    "Sources",
    "Values",
    "is_override",
    "read_sources",
    "split_overrides",
]

#: The environment when no source names one (the generic host's default).
DEFAULT_ENVIRONMENT: Final = "Production"

# ASP.NET maps these Azure App Service variables to ``ConnectionStrings:<name>``;
# POSTGRESQLCONNSTR_ is what Azure sets for a PostgreSQL connection string.
_CONNECTION_STRING_PREFIXES: Final = (
    "CUSTOMCONNSTR_",
    "POSTGRESQLCONNSTR_",
    "MYSQLCONNSTR_",
    "SQLAZURECONNSTR_",
    "SQLCONNSTR_",
)

_ENVIRONMENT_VARIABLES: Final = ("DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT")

# An override key has at least two segments (``Smtp:Port``), so the CLI's own flags
# (``--config``, ``--name``) and e-mail addresses never look like one.
_OVERRIDE_KEY: Final = re.compile(r"[A-Za-z_][\w.-]*(?::[\w.-]+)+", re.ASCII)

# JSON extras that ASP.NET's reader skips. Strings are matched first so that "//" or
# "," inside a value is left alone.
_JSON_COMMENT: Final = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?\*/', re.DOTALL)
_JSON_TRAILING_COMMA: Final = re.compile(r'"(?:[^"\\]|\\.)*"|,(?=\s*[}\]])')

_Raw = dict[str, str | None]


@attrs.frozen
class Sources:
    """The merged values and the environment name (``Production`` unless ``named``)."""

    values: Values
    environment: str
    named: bool

    @property
    def explicitly_production(self) -> bool:
        """Production named by a source rather than assumed (``IsProduction`` ignores
        case): a container image sets it, a developer's ``relate-smtp serve`` does not."""
        return self.named and self.environment.lower() == "production"


def read_sources(
    *,
    config_file: str | None,
    overrides: Sequence[str],
    environ: Mapping[str, str],
    cwd: str,
    sections: Collection[str],
) -> Sources:
    """Read and merge every source; environment variables outside ``sections`` (lower
    case: ``smtp``, ``api``, …) are never looked at (PATH, HOME, …)."""
    cli = _from_overrides(overrides)
    environment = _environment_name(environ, cli)

    if config_file is None:
        path = os.path.join(cwd, "appsettings.json")
    else:
        path = os.path.join(cwd, config_file)
        if not os.path.isfile(path):
            raise ConfigError("--config", f'"{config_file}" does not exist or is not a file')
    name = environment or DEFAULT_ENVIRONMENT
    environment_path = os.path.join(os.path.dirname(path), f"appsettings.{name}.json")

    raw: _Raw = {}
    for candidate in (path, environment_path):
        if os.path.isfile(candidate):
            raw.update(_read_json_file(candidate))
    raw.update(_from_environ(environ, sections))
    raw.update(cli)
    return Sources(Values(raw), name, named=environment is not None)


def is_override(arg: str) -> bool:
    """Tell whether an argv token is a configuration override rather than a CLI flag.

    True for ``--Smtp:Port=1``, ``/Smtp:Port=1``, ``Smtp:Port=1``, ``--Smtp:Port`` (whose
    value is the next token) and ``--environment``; false for ``--config`` and the like.
    """
    if arg.startswith("--"):
        name = arg[2:].partition("=")[0]
    elif arg.startswith("/"):
        name = arg[1:].partition("=")[0]
    elif "=" in arg:
        name = arg.partition("=")[0]
    else:
        return False
    return _OVERRIDE_KEY.fullmatch(name) is not None or name.lower() == "environment"


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into (overrides, other arguments), each in its original order.

    An override without ``=`` takes the next token as its value, as ASP.NET does, so
    ``--Smtp:Port 2587`` stays together.
    """
    overrides: list[str] = []
    rest: list[str] = []
    tokens = iter(argv)
    for arg in tokens:
        if not is_override(arg):
            rest.append(arg)
            continue
        overrides.append(arg)
        if "=" not in arg:
            value = next(tokens, None)
            if value is not None:
                overrides.append(value)
    return overrides, rest


# --- the environment name ---------------------------------------------------------


def _environment_name(environ: Mapping[str, str], cli: _Raw) -> str | None:
    """The generic host's rule: ``--environment``, then the DOTNET_/ASPNETCORE_ variables."""
    for value in (cli.get("environment"), *(environ.get(k) for k in _ENVIRONMENT_VARIABLES)):
        if value and value.strip():
            return value.strip()
    return None


# --- appsettings files ------------------------------------------------------------


def _read_json_file(path: str) -> _Raw:
    """Flatten an appsettings file; comments and trailing commas are allowed as in ASP.NET."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except UnicodeDecodeError:
        raise ConfigError(path, "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        # Numbers stay as their source text, as in ASP.NET: "1.0" is then not an int.
        document = json.loads(
            _strip_json_extras(text),
            parse_int=str,
            parse_float=str,
            parse_constant=str,
            object_pairs_hook=_JsonObject,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(document, _JsonObject):
        raise ConfigError(path, "must hold a JSON object ({...}) at the top level")
    raw: _Raw = {}
    _flatten(document, "", raw, path)
    return raw


class _JsonObject(list[tuple[str, object]]):
    """A JSON object as its list of pairs, so duplicate keys are seen, not merged."""


def _strip_json_extras(text: str) -> str:
    """Blank out comments and trailing commas, keeping every line and column in place."""

    def blank(match: re.Match[str]) -> str:
        found = match.group()
        return found if found.startswith('"') else re.sub(r"[^\n]", " ", found)

    return _JSON_TRAILING_COMMA.sub(blank, _JSON_COMMENT.sub(blank, text))


def _flatten(node: object, prefix: str, out: _Raw, source: str) -> None:
    """Store ``node`` under ``prefix``: objects by member name, arrays by index."""
    children: list[tuple[str, object]]
    if isinstance(node, _JsonObject):
        children = list(node)
    elif isinstance(node, list):
        children = [(str(index), item) for index, item in enumerate(node)]
    else:
        _put(out, prefix, _json_scalar(node), source)
        return
    if not children:
        # ASP.NET keeps an empty object or array as a null value: "set, but empty".
        _put(out, prefix, None, source)
        return
    for name, child in children:
        _flatten(child, f"{prefix}:{name}" if prefix else name, out, source)


def _put(out: _Raw, key: str, value: str | None, source: str) -> None:
    if key.lower() in out:
        raise ConfigError(source, f'duplicate key "{key}" (keys are case-insensitive)')
    out[key.lower()] = value


def _json_scalar(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # strings, and numbers kept as their text


# --- environment variables and overrides ----------------------------------------------


def _from_environ(environ: Mapping[str, str], sections: Collection[str]) -> _Raw:
    """``Smtp__Mx__Port`` (or ``Smtp:Mx:Port``) → ``smtp:mx:port``, known sections only."""
    raw: _Raw = {}
    for name, value in environ.items():
        key = name
        for prefix in _CONNECTION_STRING_PREFIXES:
            if name.upper().startswith(prefix):
                key = "ConnectionStrings:" + name[len(prefix) :]
                break
        key = key.replace("__", ":").lower()
        section, colon, _ = key.partition(":")
        if colon and section in sections:
            raw[key] = value
    return raw


def _from_overrides(args: Sequence[str]) -> _Raw:
    """Parse overrides with ASP.NET's command-line rules, but fail loudly on bad tokens."""
    raw: _Raw = {}
    tokens = iter(args)
    for arg in tokens:
        if arg.startswith("--"):
            body = arg[2:]
        elif arg.startswith("/"):
            body = arg[1:]
        elif arg.startswith("-"):
            raise ConfigError(arg, "is not a configuration override; write --Section:Key=value")
        elif "=" in arg:
            body = arg
        else:
            raise ConfigError(arg, "is not a configuration override; write --Section:Key=value")
        key, equals, value = body.partition("=")
        if not key:
            raise ConfigError(arg, "has no key; write --Section:Key=value")
        if not equals:
            following = next(tokens, None)
            if following is None:
                raise ConfigError(key, f"{arg} has no value; write {arg}=value or {arg} value")
            value = following
        raw[key.lower()] = value
    return raw


# --- the merged view ------------------------------------------------------------------


class Values:
    """The merged sources, looked up case-insensitively by canonical key."""

    def __init__(self, raw: _Raw) -> None:
        self._raw = raw

    def get(self, key: str) -> str | None:
        """The raw value; None when no source sets it or the last one set JSON null."""
        return self._raw.get(key.lower())

    def value(self, key: str) -> str | None:
        """The value stripped of spaces; None when unset or blank, so the default applies."""
        value = self.get(key)
        if value is None or not value.strip():
            return None
        return value.strip()

    def items(self, key: str) -> list[str] | None:
        """Array elements in index order; None when no source mentions the array.

        Blank elements are dropped, so a later source can remove an index by emptying it.
        A plain value instead of indexes is read as a comma-separated list.
        """
        prefix = key.lower() + ":"
        indexed: list[tuple[int, str]] = []
        has_children = False
        for name, value in self._raw.items():
            if not name.startswith(prefix):
                continue
            has_children = True
            index, nested, _ = name[len(prefix) :].partition(":")
            if not index.isascii() or not index.isdigit():
                raise ConfigError(key, f'"{index}" is not an array index; use {key}:0, {key}:1')
            if nested:
                raise ConfigError(f"{key}:{index}", "must be a string, not an object")
            if value is not None and value.strip():
                indexed.append((int(index), value.strip()))
        if has_children:
            return [value for _, value in sorted(indexed, key=lambda pair: pair[0])]
        if key.lower() not in self._raw:
            return None
        return [part.strip() for part in (self.get(key) or "").split(",") if part.strip()]
