"""The ``certificate`` health check's verdict (SPEC §7), in the health JSON's vocabulary,
without depending on the health module's types."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Final, Literal

import attrs

from relate_smtp.runtime.tls.certificates import CertificateInfo

# Health thresholds (SPEC §7): fewer days left than these → Degraded / Unhealthy.
DEGRADED_BELOW: Final = datetime.timedelta(days=30)
UNHEALTHY_BELOW: Final = datetime.timedelta(days=7)

HealthStatus = Literal["Healthy", "Degraded", "Unhealthy"]


@attrs.frozen(kw_only=True)
class CertificateStatus:
    """The ``certificate`` health check's verdict, in the health JSON's vocabulary."""

    status: HealthStatus
    description: str
    data: Mapping[str, str | float] | None = attrs.field(default=None, hash=False)
    """``subject``, ``notBefore``, ``notAfter``, ``daysUntilExpiry``, ``thumbprint``."""


def certificate_status(
    info: CertificateInfo | None,
    now: datetime.datetime,
    *,
    error: str | None = None,
) -> CertificateStatus:
    """Grade a certificate for the ``certificate`` health check (SPEC §7).

    None configured → Healthy. Otherwise by time left until ``not_after``: 30 days or
    more → Healthy, less → Degraded, less than 7 days, expired or not yet valid →
    Unhealthy. ``error`` (the file could not be read on the last reload) → Unhealthy,
    with the data of the certificate still being served when there is one.
    ``daysUntilExpiry`` is fractional days rounded to two places, negative once expired.
    """
    if info is None:
        if error is not None:
            return CertificateStatus(status="Unhealthy", description=error)
        return CertificateStatus(status="Healthy", description="No certificate configured")
    left = info.not_after - now
    data: dict[str, str | float] = {
        "subject": info.subject,
        "notBefore": _iso(info.not_before),
        "notAfter": _iso(info.not_after),
        "daysUntilExpiry": round(left.total_seconds() / 86400, 2),
        "thumbprint": info.thumbprint,
    }
    status: HealthStatus
    if error is not None:
        status, description = "Unhealthy", f"Certificate file unreadable: {error}"
    elif left <= datetime.timedelta(0):
        status, description = "Unhealthy", f"Certificate expired on {_iso(info.not_after)}"
    elif now < info.not_before:
        status, description = "Unhealthy", f"Certificate not valid before {_iso(info.not_before)}"
    else:
        days = math.floor(left / datetime.timedelta(days=1))
        summary = f"Certificate expires in {days} days ({_iso(info.not_after)})"
        if left < UNHEALTHY_BELOW:
            status = "Unhealthy"
        elif left < DEGRADED_BELOW:
            status = "Degraded"
        else:
            status = "Healthy"
        description = summary
    return CertificateStatus(status=status, description=description, data=data)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
