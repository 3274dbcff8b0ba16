"""The servers under test, as subprocesses, and their CPU and memory read from /proc.

CPU and memory are summed over the server's process tree, so a server with worker
processes is measured whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
# The host is in brackets when it is IPv6: "[::]:2525", "0.0.0.0:2525".
_LISTENING = r"Listening: {listener} on (\[[^\]\s]+\]|[^\s:]+):(\d+) \(none\)"
_DNS_LISTENING = re.compile(r"DNS listening on 127\.0\.0\.1:(\d+)")
_PROBLEM = re.compile(r"Traceback|\b(ERROR|CRITICAL|Exception|Error:)\b")

AUTH_USER = "bench@example.com"
SQLITE_STORE = "stored-mail.db"  # the full-path SQLite store, in the working directory
CONNECTION_ENV = "ConnectionStrings__DefaultConnection"
ADMIN_URL = os.environ.get(
    "RELATE_SMTP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)

Store = Literal["discard", "sqlite", "postgres"]
#: The MX scenarios' ``Smtp:Mx:SenderAuthentication:Mode``.
SenderAuth = Literal["off", "observe"]
_LOG_NUMBERS = itertools.count(1)


class ServerError(RuntimeError):
    """A server could not be started."""


# --- /proc readings ------------------------------------------------------------------


def _children_files(pid: int) -> list[int] | None:
    """Children from ``/proc/<pid>/task/*/children``; None where the kernel lacks it."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        path = Path(f"/proc/{pid}/task/{task}/children")
        if not path.exists():
            return None
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in path.read_text().split())
    return found


def _parents() -> dict[int, list[int]]:
    """Every process's children, from the ppid field of each ``/proc/<n>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (worker processes included)."""
    first = _children_files(pid)
    by_parent = _parents() if first is None else None
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        if by_parent is not None:
            todo.extend(by_parent.get(current, ()))
        else:
            todo.extend((first if current == pid else _children_files(current)) or ())
    return tree


def cpu_seconds(pid: int) -> float:
    """user + system CPU of the process tree (live processes, plus reaped children)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{member}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[11..14] = utime stime cutime cstime (stat fields 14..17)
            total += sum(int(value) for value in fields[11:15])
    return total / _TICK


def _status_kib(pid: int, key: str) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
                    break
    return total


def rss_kib(pid: int) -> int:
    """Resident memory of the process tree in KiB."""
    return _status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of the tree; False where the kernel does not allow it."""
    ok = True
    for member in process_tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def peak_rss_kib(pid: int) -> int:
    """Peak resident memory (VmHWM) of the tree in KiB, summed over its processes."""
    return _status_kib(pid, "VmHWM")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(value) for value in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user/nice
    return (sum(values[:8]) - idle) / _TICK


# --- processes ---------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            ok = sock.recv(512).startswith(b"220")
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            return ok
    except OSError:
        return False


@dataclass
class Server:
    """A server process under test."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"
    listener: str = "submission"  # whose ``Listening:`` line gives the port
    notes: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait for a ``Listening: submission`` line or a greeting on ``port``."""
        self.log_path = self.cwd / f"{self.name}-{next(_LOG_NUMBERS)}.log"
        log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            self.argv, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            match = re.search(_LISTENING.format(listener=self.listener), self.log_text())
            if match:
                host, self.port = match.group(1).strip("[]"), int(match.group(2))
                self.host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
                return
            if self.port and _greets(self.host, self.port):
                return
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"{self.name} did not start within {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=25)
        except subprocess.TimeoutExpired:
            self.notes.append("did not stop within 25 s of SIGTERM; killed")
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def problems(self, limit: int = 12) -> list[str]:
        """Log lines that look like errors or tracebacks (first ``limit``, then a count)."""
        hits = [line for line in self.log_text().splitlines() if _PROBLEM.search(line)]
        if len(hits) > limit:
            return [*hits[:limit], f"... and {len(hits) - limit} more"]
        return hits


def aiosmtpd_sink(workdir: Path, auth: tuple[str, str] | None = None) -> Server:
    """aiosmtpd with a discarding ``handle_DATA`` (and an authenticator when ``auth``)."""
    argv = [sys.executable, "-m", "bench.aiosmtpd_sink", "--port", "0"]
    if auth is not None:
        argv += ["--auth", f"{auth[0]}:{auth[1]}"]
    name = "aiosmtpd-auth" if auth else "aiosmtpd"
    return Server(name, argv, workdir, env={"PYTHONPATH": str(REPO)})


def bare_trio(workdir: Path) -> Server:
    """The bare Trio responder (``bench/bare_trio.py``): what Trio alone costs."""
    argv = [sys.executable, "-m", "bench.bare_trio", "--port", "0"]
    return Server("trio-bare", argv, workdir, env={"PYTHONPATH": str(REPO)})


def smtp_source_path() -> str | None:
    """Postfix's ``smtp-source`` (package postfix), the C client of issue 16."""
    return shutil.which("smtp-source") or next(
        (p for p in ("/usr/sbin/smtp-source", "/usr/lib/postfix/smtp-source") if os.path.exists(p)),
        None,
    )


def _relate_argv(require_auth: bool, workers: int | None, port: int, store: Store) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "relate_smtp",
        "serve",
        f"--Smtp:Port={port}",
        "--Smtp:SecurePort=0",
        "--HealthCheck:Url=http://127.0.0.1:0",
        "--HealthCheck:DnsMxDomain=",
        f"--Smtp:RequireAuthentication={'true' if require_auth else 'false'}",
        "--Smtp:MaxConnectionsPerIp=0",
        "--Smtp:MaxConnections=100000",
        "--Security:AuthenticationSalt=relate-smtp-bench",
        "--Logging:LogLevel:Default=Warning",
    ]
    if store == "discard":
        argv.append("--Storage:DiscardMessages=true")
    elif store == "sqlite":
        argv.append(f"--Storage:SqlitePath={SQLITE_STORE}")
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def _mx_argv(port: int, sender_auth: SenderAuth, dns_port: int) -> list[str]:
    """The MX listener for ``bench.sender_auth.HOSTED_DOMAIN``, its checks asking the
    bench's DNS server (any recipient there is taken: no user lookup per message)."""
    from bench.sender_auth import HOSTED_DOMAIN

    return [
        "--Smtp:Mx:Enabled=true",
        f"--Smtp:Mx:Port={port}",
        f"--Smtp:Mx:HostedDomains:0={HOSTED_DOMAIN}",
        "--Smtp:Mx:ValidateRecipients=false",
        f"--Smtp:Mx:SenderAuthentication:Mode={sender_auth}",
        f"--Smtp:Mx:SenderAuthentication:DnsServers:0=127.0.0.1:{dns_port}",
    ]


def relate_smtp(
    workdir: Path,
    *,
    require_auth: bool = False,
    workers: int | None = None,
    store: Store = "discard",
    postgres: PostgresDatabase | None = None,
    sender_auth: SenderAuth | None = None,
    dns_port: int = 0,
) -> Server:
    """relate-smtp in ``workdir``: the discard store (users and keys in its SQLite file),
    or the full path into ``SQLITE_STORE`` there or into ``postgres``; with
    ``sender_auth``, measured on its MX listener with the checks in that mode."""
    port = free_port()
    name = "relate-smtp" + ("-auth" if require_auth else "")
    if store != "discard":
        name += f"-{store}"
    if workers is not None:
        name += f"-w{workers}"
    env: dict[str, str] = {}
    if store == "postgres":
        if postgres is None or not postgres.created:
            raise ServerError("no PostgreSQL database for the full-path scenarios")
        env[CONNECTION_ENV] = postgres.url
    argv = _relate_argv(require_auth, workers, port, store)
    if sender_auth is None:
        return Server(name, argv, workdir, env, port)
    mx_port = free_port()
    argv += _mx_argv(mx_port, sender_auth, dns_port)
    name += f"-mx-{sender_auth}"
    return Server(name, argv, workdir, env, mx_port, listener="mx")


@dataclass
class DnsProcess:
    """``python -m bench.dns_server`` serving the MX scenarios' records on loopback."""

    cwd: Path
    process: subprocess.Popen[str] | None = None
    port: int = 0

    def start(self, records: list[tuple[str, str]], timeout: float = 30.0) -> int:
        """Start it and return its port once it answers."""
        argv = [sys.executable, "-m", "bench.dns_server"]
        for name, text in records:
            argv += ["--txt", f"{name}={text}"]
        self.process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = _DNS_LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                return self.port
        self.stop()
        raise ServerError("the bench DNS server did not start")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_relate(server: Server) -> None:
    """Start relate-smtp; without ``--workers`` support, fall back to one process."""
    try:
        server.start()
    except ServerError as exc:
        if "--workers" in server.argv and "unrecognized arguments" in str(exc):
            index = server.argv.index("--workers")
            del server.argv[index : index + 2]
            server.notes.append("`serve --workers` is not supported yet: ran one process")
            server.start()
        else:
            raise


def relate_credentials(workdir: Path) -> tuple[str, str]:
    """Create the benchmark user and an SMTP key in ``workdir``'s SQLite store."""
    base = [sys.executable, "-m", "relate_smtp"]

    def run(*args: str) -> str:
        done = subprocess.run(
            [*base, *args], cwd=workdir, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise ServerError(f"relate-smtp {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    run("users", "add", AUTH_USER, "--name", "Bench")
    key = run("keys", "create", AUTH_USER).splitlines()[-1]
    return AUTH_USER, key


def relate_runnable() -> str | None:
    """None when ``relate_smtp serve`` can be imported; else the reason it cannot."""
    probe = "import relate_smtp.runtime.run"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def smtp_sink_path() -> str | None:
    """Postfix's ``smtp-sink`` when installed (the C reference)."""
    return shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink") if Path(p).exists()),
        None,
    )


def postfix_sink(workdir: Path) -> Server | None:
    """Postfix ``smtp-sink`` on a free port, when installed."""
    path = smtp_sink_path()
    if path is None:
        return None
    port = free_port()
    # -c counts, -u/-a as root drops privileges; 4096 is the backlog
    argv = [path, "-a", "-u", "nobody", f"127.0.0.1:{port}", "4096"]
    return Server("smtp-sink", argv, workdir, port=port)


# --- stores ------------------------------------------------------------------------


def sqlite_emails(path: Path) -> int:
    """Rows in ``Emails`` of an SQLite store (0 before the server has created it)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        try:
            return int(db.execute('SELECT count(*) FROM "Emails"').fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise


def _on_postgres(url: str, sql: str) -> Any:
    async def go() -> Any:
        con = await asyncpg.connect(url, timeout=10)
        try:
            return await con.fetchval(sql)
        finally:
            await con.close()

    return asyncio.run(go())


@dataclass
class PostgresDatabase:
    """A temporary database on the shared PostgreSQL server, initialised by ``db init``."""

    admin_url: str = ADMIN_URL
    name: str = field(default_factory=lambda: f"relate_bench_{secrets.token_hex(6)}")
    created: bool = False

    @property
    def url(self) -> str:
        base, _, _ = self.admin_url.partition("?")
        return base.rsplit("/", 1)[0] + "/" + self.name

    def create(self, workdir: Path) -> None:
        """Create the database and its tables (``relate-smtp db init``)."""
        try:
            _on_postgres(self.admin_url, f'CREATE DATABASE "{self.name}"')
        except (OSError, asyncpg.PostgresError) as exc:
            raise ServerError(f"PostgreSQL at {self.admin_url} unavailable: {exc}") from exc
        self.created = True
        done = subprocess.run(
            [sys.executable, "-m", "relate_smtp", "db", "init"],
            cwd=workdir,
            env={**os.environ, CONNECTION_ENV: self.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise ServerError(f"relate-smtp db init: {(done.stderr or done.stdout).strip()}")

    def emails(self) -> int:
        """Rows in ``Emails``."""
        return int(_on_postgres(self.url, 'SELECT count(*) FROM "Emails"'))

    def drop(self) -> None:
        if self.created:
            _on_postgres(self.admin_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="relate-smtp-bench-"))
