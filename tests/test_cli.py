"""The command line's global options go where people type them: before the command or
after it (``relate-smtp users add X --config F``), in-process through ``main``."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from relate_smtp.cli import main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if "__" in n]:  # Smtp__Port and the like
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write_config(path: Path, database: Path) -> Path:
    path.write_text(json.dumps({"Storage": {"SqlitePath": str(database)}}))
    return path


def users_in(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute('SELECT "Email" FROM "Users" ORDER BY "Email"')]


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{config}", "users", "add", "a@example.com"],
        ["users", "add", "a@example.com", "--config", "{config}"],
        ["users", "--config", "{config}", "add", "a@example.com"],
        ["users", "add", "--config={config}", "a@example.com"],
    ],
)
def test_config_is_taken_before_or_after_the_command(tmp_path: Path, argv: list[str]) -> None:
    database = tmp_path / "chosen.db"
    config = write_config(tmp_path / "settings.json", database)
    assert main([arg.format(config=config) for arg in argv]) == 0
    assert users_in(database) == ["a@example.com"]


def test_environment_and_overrides_after_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "appsettings.json", tmp_path / "base.db")
    staging = tmp_path / "appsettings.Staging.json"
    write_config(staging, tmp_path / "staging.db")
    assert (
        main(["users", "add", "s@example.com", "--config", str(config), "--environment", "Staging"])
        == 0
    )
    assert users_in(tmp_path / "staging.db") == ["s@example.com"]
    override = tmp_path / "override.db"
    assert (
        main(
            [
                "users",
                "add",
                "o@example.com",
                "--config",
                str(config),
                f"--Storage:SqlitePath={override}",
            ]
        )
        == 0
    )
    assert users_in(override) == ["o@example.com"]


def test_the_later_config_wins(tmp_path: Path) -> None:
    first = write_config(tmp_path / "first.json", tmp_path / "first.db")
    second = write_config(tmp_path / "second.json", tmp_path / "second.db")
    assert main(["--config", str(first), "db", "init", "--config", str(second)]) == 0
    assert (tmp_path / "second.db").exists()
    assert not (tmp_path / "first.db").exists()


def test_unknown_options_after_the_command_are_still_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["users", "add", "a@example.com", "--colour", "red"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --colour red" in capsys.readouterr().err
