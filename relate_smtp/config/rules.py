"""Rules that span settings or look outside them, checked once every value is typed.

A single value is checked by its converter; what is here needs several values (MX
without hosted domains, two listeners on one port), the working directory (files named
by settings) or the sources themselves (the Production rule).
"""

from __future__ import annotations

import attrs

from relate_smtp.config.converters import readable_file, writable_directory
from relate_smtp.config.errors import ConfigError
from relate_smtp.config.settings import Settings, SmtpSettings
from relate_smtp.config.sources import Sources

__all__ = ["apply_rules"]


def apply_rules(settings: Settings, sources: Sources, *, cwd: str) -> Settings:
    """Refuse what no single value shows to be wrong; resolve paths against ``cwd``."""
    _require_hosted_domains(settings.smtp)
    _require_trusted_networks(settings.smtp)
    _require_certificate_for_key(settings.smtp)
    settings = _resolve_certificates(settings, cwd)
    _refuse_port_clashes(settings.smtp)
    settings = _resolve_spool_directory(settings, cwd)
    if sources.explicitly_production:
        _require_database(settings, sources)
    return settings


def _require_hosted_domains(smtp: SmtpSettings) -> None:
    if smtp.mx.enabled and not smtp.mx.hosted_domains:
        raise ConfigError(
            "Smtp:Mx:HostedDomains",
            "is empty but Smtp:Mx:Enabled is true; an MX listener without hosted domains "
            "would be an open relay. List them, e.g. Smtp__Mx__HostedDomains__0=example.com",
        )


def _require_trusted_networks(smtp: SmtpSettings) -> None:
    proxy = smtp.proxy_protocol
    if proxy.listeners and not proxy.trusted_networks:
        raise ConfigError(
            "Smtp:ProxyProtocol:TrustedNetworks",
            "is empty but Smtp:ProxyProtocol:Listeners is not; list the load balancers "
            "allowed to send PROXY headers, e.g. 10.0.0.0/8",
        )


def _require_certificate_for_key(smtp: SmtpSettings) -> None:
    if smtp.certificate_key_path is not None and smtp.certificate_path is None:
        raise ConfigError(
            "Smtp:CertificateKeyPath", "is set but Smtp:CertificatePath is not; set both"
        )


def _resolve_certificates(settings: Settings, cwd: str) -> Settings:
    """The files must be readable now; the TLS module parses them later."""
    smtp = settings.smtp
    certificate, key = smtp.certificate_path, smtp.certificate_key_path
    if certificate is not None:
        certificate = readable_file("Smtp:CertificatePath", certificate, cwd)
    if key is not None:
        key = readable_file("Smtp:CertificateKeyPath", key, cwd)
    smtp = attrs.evolve(smtp, certificate_path=certificate, certificate_key_path=key)
    return attrs.evolve(settings, smtp=smtp)


def _refuse_port_clashes(smtp: SmtpSettings) -> None:
    """Two listeners on one fixed port would fail at bind time with a vaguer error."""
    listeners = [("Smtp:Port", smtp.port), ("Smtp:SecurePort", smtp.secure_port)]
    if smtp.mx.enabled:
        listeners.append(("Smtp:Mx:Port", smtp.mx.port))
    used: dict[int, str] = {}
    for key, port in listeners:
        if port <= 0:  # a free port (Port, Mx:Port) or disabled (SecurePort)
            continue
        if port in used:
            raise ConfigError(key, f"{port} is already the port of {used[port]}")
        used[port] = key


def _resolve_spool_directory(settings: Settings, cwd: str) -> Settings:
    """``Storage:SpoolPath``: an existing, writable directory (relative to ``cwd``)."""
    path = settings.storage.spool_path
    if path is None:
        return settings
    storage = attrs.evolve(
        settings.storage, spool_path=writable_directory("Storage:SpoolPath", path, cwd)
    )
    return attrs.evolve(settings, storage=storage)


def _require_database(settings: Settings, sources: Sources) -> None:
    """The original refuses to start in Production without a connection string (SPEC §2);
    an explicit Storage:SqlitePath says the file is meant to persist (a mounted volume)."""
    if settings.default_connection or sources.values.value("Storage:SqlitePath") is not None:
        return
    raise ConfigError(
        "ConnectionStrings:DefaultConnection",
        "ConnectionStrings:DefaultConnection is required. Set via environment variable "
        "ConnectionStrings__DefaultConnection (the environment is Production; set "
        "Storage:SqlitePath to keep mail in an SQLite file on a persistent volume instead).",
    )
