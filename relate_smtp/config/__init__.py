"""Settings: defaults → appsettings*.json → environment (``Smtp__Port``) → ``--Key:Path`` overrides.

Each setting is declared once, on its field in `settings` (key, type, default, converter,
doc); loading, the key list and the documentation tables derive from those declarations.
The rest of the program sees only typed, validated values.

- ``declarations``: how a setting is declared, and walking the declarations;
- ``settings``: the settings records, one per section;
- ``sources``: appsettings files, environment variables, overrides, the environment name;
- ``converters`` (with ``timespan``): typed value parsers;
- ``rules``: checks across settings; ``loading``: ``load_settings``;
- ``docs``: the configuration tables of README.md and docs/configuration.md.
"""

from __future__ import annotations

from relate_smtp.config.converters import IPNetwork, LogLevel, is_host_name
from relate_smtp.config.errors import ConfigError
from relate_smtp.config.loading import load_settings
from relate_smtp.config.settings import (
    KNOWN_KEYS,
    ApiSettings,
    HealthCheckSettings,
    MimeSettings,
    MxSettings,
    OtelSettings,
    ProxyProtocolSettings,
    RateLimitSettings,
    SecuritySettings,
    Settings,
    SmtpSettings,
    StorageSettings,
)
from relate_smtp.config.sources import is_override, split_overrides

__all__ = [
    "KNOWN_KEYS",
    "ApiSettings",
    "ConfigError",
    "HealthCheckSettings",
    "IPNetwork",
    "LogLevel",
    "MimeSettings",
    "MxSettings",
    "OtelSettings",
    "ProxyProtocolSettings",
    "RateLimitSettings",
    "SecuritySettings",
    "Settings",
    "SmtpSettings",
    "StorageSettings",
    "is_host_name",
    "is_override",
    "load_settings",
    "split_overrides",
]
