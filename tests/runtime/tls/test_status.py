"""The certificate verdict for the health check: thresholds, data and the unhealthy cases."""

from __future__ import annotations

import datetime

import attrs
import pytest

from relate_smtp.runtime.tls import CertificateInfo, certificate_status
from tests.runtime.tls.helpers import UTC

NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def info_expiring_in(days: float) -> CertificateInfo:
    return CertificateInfo(
        subject="CN=mail.example.test",
        issuer="CN=Test CA",
        serial_number=42,
        not_before=NOW - datetime.timedelta(days=60),
        not_after=NOW + datetime.timedelta(days=days),
        thumbprint="AB" * 20,
    )


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (60, "Healthy"),
        (30, "Healthy"),
        (29.9, "Degraded"),
        (20, "Degraded"),
        (7, "Degraded"),
        (6.9, "Unhealthy"),
        (5, "Unhealthy"),
        (-1, "Unhealthy"),
        (None, "Healthy"),
    ],
)
def test_certificate_status_thresholds(days: float | None, expected: str) -> None:
    info = None if days is None else info_expiring_in(days)

    assert certificate_status(info, NOW).status == expected


def test_certificate_status_data_for_the_health_json() -> None:
    result = certificate_status(info_expiring_in(20.5), NOW)

    assert result.data == {
        "subject": "CN=mail.example.test",
        "notBefore": "2025-04-02T12:00:00Z",
        "notAfter": "2025-06-22T00:00:00Z",
        "daysUntilExpiry": 20.5,
        "thumbprint": "AB" * 20,
    }
    assert "20 days" in result.description


def test_certificate_status_expired_says_so() -> None:
    result = certificate_status(info_expiring_in(-3), NOW)

    assert "expired" in result.description
    assert result.data is not None and result.data["daysUntilExpiry"] == -3.0


def test_certificate_status_none_configured_has_no_data() -> None:
    result = certificate_status(None, NOW)

    assert result.data is None
    assert result.description == "No certificate configured"


def test_certificate_status_not_yet_valid_is_unhealthy() -> None:
    info = attrs.evolve(info_expiring_in(90), not_before=NOW + datetime.timedelta(days=1))

    result = certificate_status(info, NOW)

    assert result.status == "Unhealthy"
    assert "not valid before" in result.description


@pytest.mark.parametrize("info", [None, info_expiring_in(90)], ids=["never-loaded", "serving"])
def test_certificate_status_unreadable_is_unhealthy(info: CertificateInfo | None) -> None:
    result = certificate_status(info, NOW, error="cert.pem does not exist")

    assert result.status == "Unhealthy"
    assert "cert.pem does not exist" in result.description
