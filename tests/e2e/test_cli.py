"""The ``relate-smtp`` command as a user runs it: a subprocess per command."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from relate_smtp.storage.sqlite import SqliteStore
from tests.storage.helpers import attachment, new_email

# The host is in brackets when it is IPv6: "[::]:2525", "0.0.0.0:2525".
LISTENING = re.compile(r"Listening: (\S+) on (\[[^\]\s]+\]|[^\s:]+):(\d+) \((\w+)\)")


ENVIRONMENT_VARIABLES = ("DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT")


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without configuration that would change a run."""
    prefixes = ("Smtp__", "Storage__", "ConnectionStrings__", *ENVIRONMENT_VARIABLES)
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | extra


def run_cli(
    tmp_path: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("Smtp__", "Storage__"))}
    result = subprocess.run(
        [sys.executable, "-m", "relate_smtp", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


def assert_terminal_safe(output: str) -> None:
    """Nothing but printable characters and the line breaks between output lines."""
    raw = {ch for ch in output if not ch.isprintable() and ch != "\n"}
    assert not raw, f"raw control characters reached the terminal: {raw!r}"


class ServeProcess:
    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relate_smtp",
                "serve",
                "--Smtp:Port=0",
                "--Smtp:SecurePort=0",
                "--HealthCheck:Url=http://127.0.0.1:0",
                *args,
            ],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}

    def wait_listening(self, names: set[str], timeout: float = 30) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while not names <= self.ports.keys():
            assert time.monotonic() < deadline, "server did not start:\n" + "".join(self.lines)
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.ports[match.group(1)] = int(match.group(3))

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        _, rest = self.proc.communicate(timeout=timeout)
        self.lines.append(rest)
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[ServeProcess]]:
    started: list[ServeProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        proc = ServeProcess(tmp_path, *args, env=env)
        started.append(proc)
        return proc

    yield factory  # type: ignore[misc]
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def test_users_keys_and_mail_commands(tmp_path: Path, serve: type[ServeProcess]) -> None:
    run_cli(
        tmp_path,
        "users",
        "add",
        "alice@example.com",
        "--name",
        "Alice",
        "--alias",
        "al@example.com",
    )
    created = run_cli(tmp_path, "keys", "create", "alice@example.com", "--name", "laptop")
    key = created.stdout.strip()
    assert "\n" not in key and len(key) >= 32, "keys create prints the raw key alone"
    listed = run_cli(tmp_path, "keys", "list", "alice@example.com").stdout
    assert "laptop" in listed and key[:12] in listed and key not in listed

    server = serve()
    server.wait_listening({"submission", "health"} - {"health"})
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as smtp:
        smtp.login("alice@example.com", key)
        smtp.sendmail(
            "alice@example.com",
            ["bob@example.org"],
            b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: CLI test\r\n\r\nHello\r\n",
        )
    assert server.stop() == 0

    mail = run_cli(tmp_path, "mail", "list").stdout
    assert "CLI test" in mail
    email_id = mail.split()[0]
    shown = run_cli(tmp_path, "mail", "show", email_id).stdout
    assert "Subject:     CLI test" in shown and "Hello" in shown

    key_id = listed.split()[0]
    run_cli(tmp_path, "keys", "revoke", key_id)
    assert "revoked" in run_cli(tmp_path, "keys", "list", "alice@example.com").stdout
    again = run_cli(tmp_path, "keys", "revoke", key_id, check=False)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_keys_list_shows_a_hostile_key_name_escaped_on_its_own_line(tmp_path: Path) -> None:
    run_cli(tmp_path, "users", "add", "alice@example.com")
    run_cli(tmp_path, "keys", "create", "alice@example.com", "--name", "\x1b]0;pwned\x07\nx")

    listed = run_cli(tmp_path, "keys", "list", "alice@example.com").stdout

    assert listed.count("\n") == 1
    assert_terminal_safe(listed)
    assert r"\x1b]0;pwned\x07\nx" in listed


def test_mail_commands_show_hostile_headers_escaped(tmp_path: Path) -> None:
    email = new_email(
        from_address="a@x.test\nforged",
        subject="Invoice\r\nFrom: boss@example.com\x1b[2J",
        attachments=(attachment("x.pdf\nFrom: forged", b"%PDF"),),
        text_body="one\ntwo",
    )

    async def store_it() -> None:
        store = await SqliteStore.open(tmp_path / "relate-smtp.db")
        try:
            await store.save_email(email)
        finally:
            await store.aclose()

    trio.run(store_it)

    listed = run_cli(tmp_path, "mail", "list").stdout
    assert listed.count("\n") == 1
    assert_terminal_safe(listed)
    shown = run_cli(tmp_path, "mail", "show", str(email.id)).stdout
    # 8 header lines, the attachment, the blank line, 2 body lines.
    assert shown.count("\n") == 12
    assert_terminal_safe(shown)
    assert r"Attachment:  x.pdf\nFrom: forged (" in shown
    assert r"Subject:     Invoice\r\nFrom: boss@example.com\x1b[2J" in shown


def test_unrecognised_arguments_are_echoed_escaped(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "db", "init", "\x1b[2J\u202e", check=False)

    assert result.returncode == 2
    assert_terminal_safe(result.stderr)
    assert r"unrecognized arguments: \x1b[2J\u202e" in result.stderr


def test_serve_logs_listening_lines_and_exits_0_on_sigterm(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    server = serve()
    server.wait_listening({"submission"})
    assert server.stop() == 0
    log = "".join(server.lines)
    assert "Starting SMTP server on port 0 (plain)" in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--Smtp:Port=abc"], "Smtp:Port"),
        (["--Smtp:Mx:Enabled=true"], "Smtp:Mx:HostedDomains"),
        (["--Smtp:CertificatePath=/nonexistent/cert.pfx"], "Smtp:CertificatePath"),
        (["--Storage:SqlitePath=/nonexistent/dir/relate.db"], "Storage:SqlitePath"),
    ],
)
def test_bad_configuration_exits_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = run_cli(tmp_path, "serve", "--Smtp:Port=0", *args, check=False)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable", ENVIRONMENT_VARIABLES)
def test_explicit_production_without_a_database_exits_2(tmp_path: Path, variable: str) -> None:
    """SPEC §2: like the original, a host told it runs in Production refuses to start
    without ConnectionStrings:DefaultConnection rather than keep mail in a local file."""
    result = run_cli(
        tmp_path,
        "serve",
        "--Smtp:Port=0",
        check=False,
        env=clean_environ(**{variable: "Production"}),
    )
    assert result.returncode == 2
    assert "ConnectionStrings:DefaultConnection is required" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "relate-smtp.db").exists()


def test_quickstart_serve_warns_once_naming_the_sqlite_file(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """No environment named (the README's quickstart): the embedded store, one warning."""
    server = serve(env=clean_environ())
    server.wait_listening({"submission"})
    assert server.stop() == 0
    warnings = [line for line in server.lines if "embedded SQLite file" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]
    assert str(tmp_path / "relate-smtp.db") in warnings[0]


def test_production_with_an_explicit_sqlite_path_starts(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    server = serve(
        env=clean_environ(
            ASPNETCORE_ENVIRONMENT="Production", Storage__SqlitePath=str(tmp_path / "mail.db")
        )
    )
    server.wait_listening({"submission"})
    assert server.stop() == 0
    assert (tmp_path / "mail.db").exists()


def test_port_in_use_exits_2_naming_the_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli(
            tmp_path,
            "serve",
            f"--Smtp:Port={port}",
            "--Smtp:SecurePort=0",
            "--HealthCheck:Url=http://127.0.0.1:0",
            check=False,
        )
    assert result.returncode == 2
    assert "Smtp:Port" in result.stderr and "Traceback" not in result.stderr


def test_admin_command_with_database_down_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = run_cli(
        tmp_path,
        "users",
        "add",
        "alice@example.com",
        f"--ConnectionStrings:DefaultConnection=Host=127.0.0.1;Port={closed_port};Timeout=2",
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("relate-smtp: ")


def test_dev_tls_serves_starttls_and_implicit_tls(tmp_path: Path) -> None:
    import socket
    import ssl

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        secure_port = sock.getsockname()[1]
    server = ServeProcess(
        tmp_path, "--dev-tls", f"--Smtp:SecurePort={secure_port}", "--Smtp:ServerName=localhost"
    )
    try:
        server.wait_listening({"submission", "submission-tls"})
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the development certificate is self-signed
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as smtp:
            smtp.starttls(context=context)
            assert smtp.ehlo()[0] == 250
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.ports["submission-tls"], timeout=10, context=context
        ) as smtp:
            assert smtp.ehlo()[0] == 250
            assert smtp.sock is not None and isinstance(smtp.sock, ssl.SSLSocket)
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "development only" in "".join(server.lines)
