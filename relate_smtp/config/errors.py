"""The one error configuration raises: it names the key, so start-up can print one line."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration value is missing or invalid; ``key`` names it (``Smtp:Port``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
