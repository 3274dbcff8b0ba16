"""The configuration documentation stays in step with the declarations."""

from __future__ import annotations

import pytest

from relate_smtp.config import KNOWN_KEYS
from relate_smtp.config.docs import DOCUMENTS, main, table, table_below, with_tables
from tests.config.helpers import REPO

TABLES = [
    (document, heading, original)
    for document, headings in DOCUMENTS.items()
    for heading, original in zip(headings, (True, False), strict=True)
]


@pytest.mark.parametrize(("document", "heading", "original"), TABLES)
def test_documented_tables_are_the_generated_ones(
    document: str, heading: str, original: bool
) -> None:
    """After changing a setting, run ``python -m relate_smtp.config.docs --write``."""
    markdown = (REPO / document).read_text(encoding="utf-8")
    assert table_below(markdown, heading) == table(original=original)


@pytest.mark.parametrize("key", KNOWN_KEYS)
def test_every_key_is_documented(key: str) -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert f"`{key}`" in reference
    assert f"`{key.replace(':', '__')}" in reference


def test_each_key_is_in_exactly_one_table() -> None:
    rows = [
        line.split("`")[1]
        for original in (True, False)
        for line in table(original=original).splitlines()[2:]
    ]
    assert len(rows) == len(set(rows))
    assert sorted(rows) == sorted(KNOWN_KEYS)


def test_defaults_are_shown_as_an_operator_writes_them() -> None:
    rows = {
        line.split("`")[1]: line.split(" | ")[2]
        for original in (True, False)
        for line in table(original=original).splitlines()[2:]
    }
    assert rows["Smtp:Port"] == "`587`"
    assert rows["Smtp:RequireAuthentication"] == "`true`"
    assert rows["Smtp:CommandTimeoutSeconds"] == "`300`"
    assert rows["Smtp:BareLineEndings"] == "`normalize`"
    assert rows["Smtp:Mx:HostedDomains"] == "`[]`"
    assert rows["Smtp:ConnectionLimitExemptNetworks"] == "`127.0.0.0/8`, `::1/128`"
    assert rows["Security:RateLimit:LockoutWindow"] == "`00:15:00`"
    assert rows["ConnectionStrings:DefaultConnection"] == "empty"
    assert rows["Internal:ApiKey"] == "none"
    assert rows["Logging:LogLevel:Default"] == "`Information`"


def test_with_tables_replaces_only_the_tables() -> None:
    headings = DOCUMENTS["docs/configuration.md"]
    stale = "\n".join(
        [
            "# Title",
            headings[0],
            "",
            "| key | env var | default | meaning |",
            "|---|---|---|---|",
            "| `Old:Key` | `Old__Key` | `1` | gone |",
            "",
            "text between",
            headings[1],
            "",
            "| a |",
            "",
            "after",
        ]
    )
    fresh = with_tables(stale, headings)
    assert table_below(fresh, headings[0]) == table(original=True)
    assert table_below(fresh, headings[1]) == table(original=False)
    assert fresh.startswith("# Title\n") and fresh.endswith("\n\nafter")
    assert "text between" in fresh and "Old:Key" not in fresh
    assert with_tables(fresh, headings) == fresh


def test_a_missing_heading_or_table_is_an_error() -> None:
    with pytest.raises(LookupError, match="no heading"):
        table_below("# Other\n\n| a |", "### Missing")
    with pytest.raises(LookupError, match="no table below"):
        table_below("### Here\ntext\n## Next\n| a |", "### Here")


def test_the_generator_prints_both_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert table(original=True) in printed
    assert table(original=False) in printed
