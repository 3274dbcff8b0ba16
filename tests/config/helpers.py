"""Loading settings from a temporary directory, as a test would write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from relate_smtp.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(directory: Path, name: str, content: dict[str, Any] | str) -> Path:
    path = directory / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def load(tmp_path: Path, *overrides: str, **environ: str) -> Settings:
    return load_settings(overrides=overrides, environ=environ, cwd=str(tmp_path))


def error(tmp_path: Path, *overrides: str, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, *overrides, **environ)
    return caught.value
