"""Settings parsing and the package's place in the layers."""

from __future__ import annotations

import pathlib
import re

import pytest

from relate_smtp.sender_auth import Mode, NameServer, SenderAuthSettings, parse_name_servers
from relate_smtp.sender_auth._domains import author_domains, organizational_domain


def test_defaults_follow_the_issue() -> None:
    settings = SenderAuthSettings()

    assert settings.mode is Mode.OBSERVE
    assert settings.dns_servers == ()
    assert settings.dns_timeout_seconds == 5
    assert settings.reject_spf_fail is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", NameServer(address="192.0.2.53")),
        ("192.0.2.53:5353", NameServer(address="192.0.2.53", port=5353)),
        ("2001:db8::53", NameServer(address="2001:db8::53")),
        ("[2001:db8::53]", NameServer(address="2001:db8::53")),
        ("[2001:db8::53]:5353", NameServer(address="2001:db8::53", port=5353)),
    ],
)
def test_name_server_forms(text: str, expected: NameServer) -> None:
    assert NameServer.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["dns.example", "192.0.2.53:0", "192.0.2.53:x", "[2001:db8::53", "192.0.2.1:70000"]
)
def test_bad_name_servers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        NameServer.parse(text)


def test_name_server_list_from_a_string_or_a_list() -> None:
    expected = (NameServer(address="192.0.2.1"), NameServer(address="::1", port=53))
    assert parse_name_servers("192.0.2.1, ::1") == expected
    assert parse_name_servers(["192.0.2.1", "::1"]) == expected
    assert parse_name_servers("") == ()


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SenderAuthSettings(dns_timeout_seconds=0)


def test_author_domains_are_normalised_and_deduplicated() -> None:
    assert author_domains(['"A" <a@Example.COM.>, b@example.com', "c@münchen.example"]) == (
        "example.com",
        "xn--mnchen-3ya.example",
    )
    assert author_domains(["undisclosed-recipients:;"]) == ()


def test_organizational_domains() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") is None
    assert organizational_domain("x.user.github.io") == "user.github.io"


def test_package_imports_no_runtime_handlers_or_storage() -> None:
    package = pathlib.Path(__file__).parents[2] / "relate_smtp" / "sender_auth"
    forbidden = re.compile(
        r"^\s*(?:from|import)\s+(?:relate_smtp\.(?:runtime|handlers|storage)|\.\.)",
        re.MULTILINE,
    )
    for path in package.glob("*.py"):
        assert not forbidden.search(path.read_text()), path.name
