"""Defaults: every setting's default, and where defaults come from."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest

from relate_smtp.config import (
    KNOWN_KEYS,
    HealthCheckSettings,
    LogLevel,
    Settings,
    SmtpSettings,
    declarations,
)
from relate_smtp.protocol import BareLineEndings, ProtocolConfig
from tests.config.helpers import load


def test_no_sources_gives_the_attrs_defaults(tmp_path: Path) -> None:
    assert load(tmp_path) == Settings()


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("smtp.server_name", "localhost"),
        ("smtp.port", 587),
        ("smtp.secure_port", 465),
        ("smtp.require_authentication", True),
        ("smtp.certificate_path", None),
        ("smtp.max_attachment_size_bytes", 26_214_400),
        ("smtp.max_message_size_bytes", 52_428_800),
        ("smtp.allow_insecure_auth", True),
        ("smtp.bare_line_endings", BareLineEndings.NORMALIZE),
        ("smtp.max_recipients", 100),
        ("smtp.max_errors", 10),
        ("smtp.max_recipient_errors", 20),
        ("smtp.command_timeout_seconds", 300),
        ("smtp.data_timeout_seconds", 180),
        ("smtp.min_data_rate_bytes_per_second", 500),
        ("smtp.tls_handshake_timeout_seconds", 30),
        ("smtp.max_connections", 1000),
        ("smtp.max_connections_per_ip", 50),
        ("smtp.client_ipv6_prefix_length", 64),
        (
            "smtp.connection_limit_exempt_networks",
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        ),
        ("smtp.shutdown_timeout_seconds", 20),
        ("smtp.restrict_sender_to_login", False),
        ("smtp.mx.enabled", False),
        ("smtp.mx.port", 25),
        ("smtp.mx.hosted_domains", ()),
        ("smtp.mx.validate_recipients", True),
        ("smtp.proxy_protocol.listeners", ()),
        ("smtp.proxy_protocol.trusted_networks", ()),
        ("default_connection", ""),
        ("health_check.url", "http://localhost:8081"),
        ("health_check.endpoints", (("localhost", 8081),)),
        ("health_check.dns_mx_domain", "gmail.com"),
        ("api.base_url", "http://localhost:5000"),
        ("api.timeout_seconds", 10),
        ("internal_api_key", None),
        ("security.authentication_salt", ""),
        ("security.rate_limit.max_failed_attempts", 5),
        ("security.rate_limit.lockout_window_seconds", 900),
        ("security.rate_limit.base_backoff_delay_seconds", 1),
        ("security.rate_limit.max_backoff_delay_seconds", 30),
        ("storage.sqlite_path", "relate-smtp.db"),
        ("storage.discard_messages", False),
        ("log_level", LogLevel.INFORMATION),
        ("environment", "Production"),
    ],
)
def test_defaults_are_the_specified_ones(tmp_path: Path, attribute: str, expected: object) -> None:
    value: object = load(tmp_path)
    for name in attribute.split("."):
        value = getattr(value, name)
    assert value == expected


def test_mime_limits_are_read(tmp_path: Path) -> None:
    mime = load(
        tmp_path,
        "Smtp:Mime:MaxParts=50",
        "Smtp:Mime:MaxNestingDepth=7",
        "Smtp:Mime:MaxHeaderBytes=4096",
        "Smtp:Mime:MaxHeaderRecipients=20",
        "Smtp:Mime:ParseCpuSeconds=2.5",
        "Smtp:Mime:ParseMemoryBytes=536870912",
    ).smtp.mime
    assert (mime.limits.max_parts, mime.limits.max_nesting_depth) == (50, 7)
    assert (mime.limits.max_header_bytes, mime.limits.max_header_recipients) == (4096, 20)
    assert (mime.parse.cpu_seconds, mime.parse.memory_bytes) == (2.5, 536_870_912)


# --- the declarations ----------------------------------------------------------------


def test_keys_are_unique_and_name_their_field() -> None:
    """The key's last segment names the field (``Smtp:Mx:Port`` → ``port``), except for
    the few whose field says its unit or has a shorter name."""
    declared = list(declarations.declared(Settings))
    assert len(KNOWN_KEYS) == len({key.lower() for key in KNOWN_KEYS}) == len(declared)
    renamed = {
        "ConnectionStrings:DefaultConnection": "default_connection",
        "Internal:ApiKey": "internal_api_key",
        "Logging:LogLevel:Default": "log_level",
        "Security:RateLimit:LockoutWindow": "lockout_window_seconds",
        "Security:RateLimit:BaseBackoffDelay": "base_backoff_delay_seconds",
        "Security:RateLimit:MaxBackoffDelay": "max_backoff_delay_seconds",
        "Smtp:Mime:ParseCpuSeconds": "cpu_seconds",
        "Smtp:Mime:ParseMemoryBytes": "memory_bytes",
    }
    for item in declared:
        name = item.setting.key.rsplit(":", 1)[1]
        snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
        assert item.path[-1] == renamed.get(item.setting.key, snake)


def test_each_declared_default_is_the_settings_default() -> None:
    defaults = Settings()
    for item in declarations.declared(Settings):
        value: object = defaults
        for name in item.path:
            value = getattr(value, name)
        assert value == item.setting.default, item.setting.key


def test_protocol_limits_have_one_home() -> None:
    """The core's defaults are the settings' defaults, not a copy of them."""
    protocol, smtp = ProtocolConfig(), SmtpSettings()
    assert smtp.server_name == protocol.hostname
    assert smtp.max_message_size_bytes == protocol.max_message_size
    assert smtp.max_recipients == protocol.max_recipients
    assert smtp.max_errors == protocol.max_errors
    assert smtp.max_recipient_errors == protocol.max_recipient_errors
    assert smtp.bare_line_endings is protocol.bare_line_endings
    assert smtp.allow_insecure_auth is protocol.allow_insecure_auth


def test_health_endpoints_follow_the_url() -> None:
    health = HealthCheckSettings(url="http://+:9090;http://localhost:1")
    assert health.endpoints == (("::", 9090), ("localhost", 1))


@pytest.mark.parametrize(
    ("level", "logging_level"),
    [(LogLevel.TRACE, logging.DEBUG), (LogLevel.INFORMATION, logging.INFO)],
)
def test_log_levels_map_to_logging(level: LogLevel, logging_level: int) -> None:
    assert level.logging_level == logging_level
    assert LogLevel.NONE.logging_level > logging.CRITICAL
