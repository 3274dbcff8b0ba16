"""The configuration tables of README.md and docs/configuration.md, made from the declarations.

``python -m relate_smtp.config.docs`` prints the two tables (the original's keys, then the
keys added here); ``--write`` puts them into the documents of the current directory, below
their headings. A test compares the documents with these tables, so a setting changed in
code and not in the docs fails the build.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from relate_smtp.config.declarations import Setting, declared
from relate_smtp.config.settings import Settings

__all__ = ["DOCUMENTS", "table", "table_below", "with_tables"]

#: Each document and the headings its two tables sit under: original keys, added keys.
DOCUMENTS: Final = {
    "README.md": ("### Keys compatible with the original", "### Keys added by relate-smtp"),
    "docs/configuration.md": ("### Compatible with the original", "### Added by relate-smtp"),
}

_HEADER: Final = "| key | env var | default | meaning |\n|---|---|---|---|"


def table(*, original: bool) -> str:
    """The markdown table of the original's keys, or of the keys added by relate-smtp."""
    rows = [
        f"| `{s.key}` | `{s.environment_variable}` | {_default(s)} | {s.doc} |"
        for s in (item.setting for item in declared(Settings))
        if s.original == original
    ]
    return "\n".join([_HEADER, *rows])


def _default(setting: Setting) -> str:
    if isinstance(setting.shown, str):
        return setting.shown
    if setting.shown is not None:
        return f"`{setting.shown(setting.default)}`"
    return _show(setting.default)


def _show(value: object) -> str:
    match value:
        case None:
            return "none"
        case "":
            return "empty"
        case bool():
            return f"`{str(value).lower()}`"
        case float() if value.is_integer():
            return f"`{int(value)}`"
        case enum.Enum():
            return f"`{value.value}`"
        case ():
            return "`[]`"
        case tuple():
            return ", ".join(_show(item) for item in value)
        case ipaddress.IPv4Network() | ipaddress.IPv6Network() | str() | int() | float():
            return f"`{value}`"
    raise TypeError(f"no documentation form for a default of type {type(value).__name__}")


def table_below(markdown: str, heading: str) -> str:
    """The first table after the line ``heading`` (its lines starting with ``|``)."""
    start, end = _table_span(markdown.split("\n"), heading)
    return "\n".join(markdown.split("\n")[start:end])


def with_tables(markdown: str, headings: Sequence[str]) -> str:
    """``markdown`` with the tables below ``headings`` (original, added) regenerated."""
    lines = markdown.split("\n")
    for heading, original in zip(headings, (True, False), strict=True):
        start, end = _table_span(lines, heading)
        lines[start:end] = table(original=original).split("\n")
    return "\n".join(lines)


def _table_span(lines: list[str], heading: str) -> tuple[int, int]:
    try:
        index = lines.index(heading)
    except ValueError:
        raise LookupError(f"no heading {heading!r}") from None
    start = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("|")), len(lines))
    if any(line.startswith("#") for line in lines[index + 1 : start]):
        raise LookupError(f"no table below {heading!r}")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relate_smtp.config.docs",
        description="Print the configuration tables made from the setting declarations.",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"rewrite the tables in {' and '.join(DOCUMENTS)} (run from the repository root)",
    )
    args = parser.parse_args(argv)
    if not args.write:
        print(f"{DOCUMENTS['README.md'][0]}\n\n{table(original=True)}\n")
        print(f"{DOCUMENTS['README.md'][1]}\n\n{table(original=False)}")
        return 0
    for name, headings in DOCUMENTS.items():
        path = Path(name)
        path.write_text(with_tables(path.read_text(encoding="utf-8"), headings), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
