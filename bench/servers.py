"""The servers under test, as subprocesses, and their CPU and memory read from /proc.

CPU and memory are summed over the server's process tree, so a server with worker
processes is measured whole.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"Listening: submission on (\S+):(\d+) \(none\)")
_PROBLEM = re.compile(r"Traceback|\b(ERROR|CRITICAL|Exception|Error:)\b")

AUTH_USER = "bench@example.com"
_LOG_NUMBERS = itertools.count(1)


class ServerError(RuntimeError):
    """A server could not be started."""


# --- /proc readings ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(child) for child in text.split())
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
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
            match = _LISTENING.search(self.log_text())
            if match:
                host, self.port = match.group(1), int(match.group(2))
                self.host = {"0.0.0.0": "127.0.0.1", "[::]": "::1", "::": "::1"}.get(host, host)
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


def _relate_argv(require_auth: bool, workers: int | None, port: int) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "relate_smtp",
        "serve",
        f"--Smtp:Port={port}",
        "--Smtp:SecurePort=0",
        "--HealthCheck:Url=http://127.0.0.1:0",
        "--HealthCheck:DnsMxDomain=",
        "--Storage:DiscardMessages=true",
        f"--Smtp:RequireAuthentication={'true' if require_auth else 'false'}",
        "--Smtp:MaxConnectionsPerIp=0",
        "--Smtp:MaxConnections=100000",
        "--Security:AuthenticationSalt=relate-smtp-bench",
        "--Logging:LogLevel:Default=Warning",
    ]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def relate_smtp(workdir: Path, *, require_auth: bool = False, workers: int | None = None) -> Server:
    """relate-smtp with the discard store, in ``workdir`` (its SQLite users and keys)."""
    port = free_port()
    name = "relate-smtp-auth" if require_auth else "relate-smtp"
    return Server(name, _relate_argv(require_auth, workers, port), workdir, port=port)


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


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="relate-smtp-bench-"))
