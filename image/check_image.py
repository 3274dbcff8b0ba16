"""Run the built container image as the original's compose service and check it serves.

``nox -s image`` builds the image and then runs this script; it is not part of the
pytest suite. The image runs under ``buildah run --isolation chroot --network host`` as
the image's user, with the image's own entrypoint and command and the environment block
of the compose service in docs/deploy.md (its ``${…}`` variables filled in as an
operator's ``.env`` would, its ports moved to free ones through the same variables, the
hosts ``postgres`` and ``api`` pointing at this machine). Checks:

- the image: non-root user, the original's ports and health URL, Production, the
  capability on the entrypoint's interpreter, no build-time CA bundle left in it;
- an empty connection string: exit 2 with the original's message;
- ``db init``, ``users add``, ``keys create`` through the entrypoint;
- the server as the image's user (not root), listening on a port below 1024;
- ``/healthz`` 200 through ``wget`` in the image (the compose file's health check and
  the image's own HEALTHCHECK);
- an authenticated message stored in PostgreSQL, an MX message for a hosted domain,
  the notification to the API with ``Authorization: ApiKey …``;
- SIGTERM: idle sessions get 421, exit 0 within ``Smtp:ShutdownTimeoutSeconds``;
- the same as PID 1 of a PID namespace (as under Docker or Kubernetes);
- with CAP_NET_BIND_SERVICE dropped from the bounding set the entrypoint still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import secrets
import shlex
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml

# The original's message (api/src/Relate.Smtp.SmtpHost/Program.cs).
ORIGINAL_MESSAGE = (
    "ConnectionStrings:DefaultConnection is required. "
    "Set via environment variable ConnectionStrings__DefaultConnection"
)
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# What an operator's .env would hold for the compose file.
OPERATOR_VARIABLES = {
    "POSTGRES_USER": "postgres",
    "POSTGRES_PASSWORD": "unused-with-trust-auth",
    "SMTP_SERVER_NAME": "mail.example.test",
    "SMTP_MX_ENABLED": "true",
    "SMTP_MX_HOSTED_DOMAIN": "example.test",
}
# Variables holding a port (in a URL or alone) that may be moved to a free port.
PORT_VARIABLES = ("Smtp__Port", "Smtp__SecurePort", "Smtp__Mx__Port", "HealthCheck__Url")
START_TIMEOUT = 60.0
NOTIFICATION_PATH = "/api/internal/notifications/new-email"


class CheckFailed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def step(message: str) -> None:
    print(f"image check: {message}", flush=True)


# -- the compose service -------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\})"
)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``,
    ``${VAR?err}`` and ``$$``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name is None:
            return "$"
        op, arg, value = match.group("op"), match.group("arg"), variables.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise CheckFailed(f"compose variable {name} is required: {arg}")
        return value or ""

    return _VARIABLE.sub(replace, text)


@dataclass
class ComposeService:
    image: str
    environment: dict[str, str]
    healthcheck: list[str]


def read_compose_service(markdown: Path, name: str, variables: Mapping[str, str]) -> ComposeService:
    """The ``name`` service of the first YAML block in ``markdown`` holding ``services:``."""
    blocks = re.findall(r"```ya?ml\n(.*?)```", markdown.read_text(encoding="utf-8"), re.S)
    documents = [yaml.safe_load(block) for block in blocks if "services:" in block]
    check(documents, f"{markdown}: no compose file")
    service: dict[str, Any] = documents[0]["services"][name]
    raw = service["environment"]
    items = raw if isinstance(raw, list) else [f"{k}={v}" for k, v in raw.items()]
    environment = {}
    for item in items:
        key, _, value = str(item).partition("=")
        environment[key] = interpolate(value, variables)
    return ComposeService(
        image=interpolate(service["image"], variables),
        environment=environment,
        healthcheck=[interpolate(str(part), variables) for part in service["healthcheck"]["test"]],
    )


def move_port(value: str, port: int) -> str:
    """``value`` (a port or a URL with one) with its port replaced by ``port``."""
    if value.strip().isdigit():
        return str(port)
    moved, count = re.subn(r"^([a-z]+://[^/:;]+):\d+", rf"\g<1>:{port}", value)
    check(count == 1, f"no port in {value!r}")
    return moved


def url_port(value: str) -> int:
    match = re.match(r"^[a-z]+://[^/:;]+:(\d+)", value)
    check(match, f"no port in {value!r}")
    assert match is not None
    return int(match.group(1))


# -- ports and processes ---------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(("::", port))
        except OSError:
            return False
    return True


def free_ports(count: int, candidates: Sequence[int]) -> list[int]:
    found = [port for port in candidates if port_is_free(port)][:count]
    check(len(found) == count, f"not {count} free ports in {candidates[0]}..{candidates[-1]}")
    return found


def high_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in ports and port_is_free(port):
            ports.append(port)
    return ports


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def status_field(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1:]
    raise CheckFailed(f"no {name} in /proc/{pid}/status")


def server_process(parent: int) -> int:
    """The server: the process under ``parent`` running ``-m relate_smtp``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for pid in descendants(parent):
            if "relate_smtp" in cmdline(pid):
                return pid
        time.sleep(0.1)
    raise CheckFailed(f"no server process under {parent}")


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckFailed(f"server exited {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise CheckFailed(f"port {port} not open after {START_TIMEOUT:.0f} s:\n{log.read_text()}")


# -- PostgreSQL and the fake API --------------------------------------------------------


def psql(sql: str, database: str = "postgres") -> str:
    url = POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + database
    result = subprocess.run(
        ["psql", url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True,
        text=True,
        check=False,
    )
    check(result.returncode == 0, f"psql {sql!r}: {result.stderr.strip()}")
    return result.stdout.strip()


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"relate_smtp_image_{secrets.token_hex(6)}"
    psql(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Notifications:
    received: list[tuple[str, str | None]] = field(default_factory=list)


@contextlib.contextmanager
def fake_api(port: int) -> Iterator[Notifications]:
    """The Relate API's notification endpoint: records (path, Authorization)."""
    notes = Notifications()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            notes.received.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield notes
    finally:
        server.shutdown()
        server.server_close()


# -- the image ---------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    storage: list[str]
    config: dict[str, Any]

    @property
    def command(self) -> list[str]:
        return [*(self.config.get("Entrypoint") or []), *(self.config.get("Cmd") or [])]

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "root")

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env") or [])


def inspect_image(name: str, storage: list[str]) -> Image:
    output = subprocess.run(
        ["podman", *storage, "image", "inspect", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inspected = json.loads(output)[0]
    config = dict(inspected["Config"])
    # podman shows the HEALTHCHECK beside Config, docker inside it.
    config.setdefault("Healthcheck", inspected.get("Healthcheck"))
    return Image(name=name, storage=storage, config=config)


class Container:
    """A buildah working container of the image; ``run`` uses its entrypoint's way."""

    def __init__(self, image: Image, hosts: Mapping[str, str]) -> None:
        self.image = image
        self.name = f"relate-smtp-check-{secrets.token_hex(4)}"
        adds = [f"--add-host={host}:{ip}" for host, ip in hosts.items()]
        self._buildah(["from", "--pull-never", "--name", self.name, *adds, image.name])
        self.rootfs = Path(self._buildah(["mount", self.name]).strip())

    def _buildah(self, args: list[str]) -> str:
        return subprocess.run(
            ["buildah", *self.image.storage, *args], capture_output=True, text=True, check=True
        ).stdout

    def run_argv(self, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        return [
            "buildah",
            *self.image.storage,
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--user",
            self.image.user,
            *(f"--env={key}={value}" for key, value in env.items()),
            self.name,
            "--",
            *argv,
        ]

    def run(
        self, argv: Sequence[str], env: Mapping[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.run_argv(argv, env), capture_output=True, text=True, timeout=timeout, check=False
        )

    def passwd_entry(self, user: str) -> tuple[int, int]:
        """UID and GID of ``user`` (``name``, ``uid``, ``name:group`` or ``uid:gid``)."""
        name, _, group = user.partition(":")
        for line in (self.rootfs / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if name in (fields[0], fields[2]):
                uid, gid = int(fields[2]), int(fields[3])
                return uid, int(group) if group.isdigit() else gid
        raise CheckFailed(f"user {user} not in the image's /etc/passwd")

    def remove(self) -> None:
        for action in ("umount", "rm"):
            subprocess.run(
                ["buildah", *self.image.storage, action, self.name],
                capture_output=True,
                check=False,
            )


def expect(result: subprocess.CompletedProcess[str], what: str, status: int = 0) -> str:
    check(
        result.returncode == status,
        f"{what}: exit {result.returncode}, wanted {status}\n{result.stdout}{result.stderr}",
    )
    return result.stdout


# -- the checks --------------------------------------------------------------------------


def check_image_config(image: Image, container: Container, host_bundle: Path) -> None:
    check(image.user not in ("", "root", "0") and not image.user.startswith("0:"), "runs as root")
    uid, _ = container.passwd_entry(image.user)
    check(uid != 0, f"image user {image.user} has UID 0")
    ports = set(image.config.get("ExposedPorts") or {})
    check({"25/tcp", "587/tcp", "465/tcp", "8081/tcp"} <= ports, f"EXPOSE: {sorted(ports)}")
    env = image.env
    check(env.get("HealthCheck__Url") == "http://+:8081", "HealthCheck__Url")
    check(env.get("DOTNET_ENVIRONMENT") == "Production", "DOTNET_ENVIRONMENT")
    check("PIP_CERT" not in env, "the build's PIP_CERT is in the image's environment")
    check(image.config.get("Healthcheck"), "no HEALTHCHECK (build with --format docker)")
    bundle = container.rootfs / "etc/ssl/certs/ca-certificates.crt"
    if bundle.is_file() and host_bundle.is_file():
        check(bundle.read_bytes() != host_bundle.read_bytes(), "the build's CA bundle is baked in")
    interpreter = container.rootfs / "opt/relate-smtp/bin/python3-netbind"
    capability = os.getxattr(interpreter, "security.capability")
    permitted = int.from_bytes(capability[4:8], "little")
    check(permitted & (1 << 10), "python3-netbind lacks cap_net_bind_service")
    step(f"image: user {image.user} (UID {uid}), ports {sorted(ports)}, Production, capability")


def check_empty_connection_string(container: Container, env: Mapping[str, str]) -> None:
    empty = {**env, "ConnectionStrings__DefaultConnection": ""}
    result = container.run(container.image.command, empty, timeout=START_TIMEOUT)
    expect(result, "empty connection string", status=2)
    check(ORIGINAL_MESSAGE in result.stderr, f"message: {result.stderr!r}")
    step("empty ConnectionStrings__DefaultConnection: exit 2 with the original's message")


@contextlib.contextmanager
def running(
    argv: Sequence[str], log: Path, health_port: int
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The server started by ``argv``, serving once its health port is open; killed on
    the way out if a check failed before it was stopped."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(health_port, process, log)
        yield process, server_process(process.pid)
    finally:
        if process.poll() is None:
            for pid in descendants(process.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


def stop_server(
    process: subprocess.Popen[bytes], pid: int, budget: float, log: Path, idle_port: int
) -> float:
    """SIGTERM the server with one idle session open; the session gets 421."""
    with socket.create_connection(("127.0.0.1", idle_port), 5) as idle:
        idle.settimeout(budget)
        greeting = idle.recv(1024)
        check(greeting.startswith(b"220"), f"greeting {greeting!r}")
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        farewell = idle.recv(1024)
    try:
        status = process.wait(timeout=budget + 10)
    except subprocess.TimeoutExpired:
        process.kill()
        raise CheckFailed(f"still running {budget + 10:.0f} s after SIGTERM") from None
    elapsed = time.monotonic() - started
    check(farewell.startswith(b"421"), f"idle session got {farewell!r} at shutdown")
    check(status == 0, f"exit status {status} after SIGTERM:\n{log.read_text()}")
    check(elapsed <= budget, f"SIGTERM took {elapsed:.1f} s, budget {budget} s")
    return elapsed


def send_messages(
    ports: Mapping[str, int], login: str, key: str, server_name: str, subject: str
) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = login, login, subject
    message.set_content("Sent through the container image.")
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as smtp:
        code, banner = smtp.ehlo("client.example.test")
        check(code == 250 and banner.startswith(server_name.encode()), f"EHLO {banner!r}")
        smtp.login(login, key)
        refused = smtp.send_message(message)
        check(not refused, f"refused {refused}")
    inbound = EmailMessage()
    inbound["From"], inbound["To"] = "sender@elsewhere.example", login
    inbound["Subject"] = f"{subject} (MX)"
    inbound.set_content("Inbound through the container image.")
    with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
        refused = smtp.send_message(inbound)
        check(not refused, f"MX refused {refused}")
        smtp.mail("sender@elsewhere.example")
        code, _ = smtp.rcpt("nobody@example.test")
        check(code == 550, f"MX answered {code} for an unknown user")
        smtp.rset()


def run_checks(args: argparse.Namespace) -> float:
    storage = ["--root", args.root, "--runroot", args.runroot, "--storage-driver", "overlay"]
    with (
        tempfile.TemporaryDirectory(prefix="relate-smtp-image-") as logs,
        scratch_database() as database,
    ):
        workdir = Path(logs)
        variables = {
            **OPERATOR_VARIABLES,
            "POSTGRES_DB": database,
            "INTERNAL_API_KEY": secrets.token_urlsafe(16),
        }
        compose = read_compose_service(Path(args.compose), "smtp", variables)
        image = inspect_image(compose.image, storage)
        step(f"{compose.image}: {shlex.join(image.command)} as {image.user}")
        env = dict(compose.environment)
        for key in (*PORT_VARIABLES, "Api__BaseUrl", "ConnectionStrings__DefaultConnection"):
            check(key in env, f"the compose service does not set {key}")

        # Move the ports through the same variables: the listeners to free ports below
        # 1024 where the image's capability is needed, the rest to free high ports.
        low = free_ports(3, range(1023, 900, -1))
        high = high_ports(2)
        ports = {"submission": low[0], "mx": low[1], "submission-tls": low[2]}
        health_port, api_port = high
        original_health = url_port(env["HealthCheck__Url"])
        env["Smtp__Port"] = move_port(env["Smtp__Port"], ports["submission"])
        env["Smtp__Mx__Port"] = move_port(env["Smtp__Mx__Port"], ports["mx"])
        env["Smtp__SecurePort"] = move_port(env["Smtp__SecurePort"], ports["submission-tls"])
        env["HealthCheck__Url"] = move_port(env["HealthCheck__Url"], health_port)
        env["Api__BaseUrl"] = move_port(env["Api__BaseUrl"], api_port)
        unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
        step(
            f"ports {ports}, health {health_port}, api {api_port} "
            f"(ip_unprivileged_port_start={unprivileged})"
        )
        hosts = {"postgres": "127.0.0.1", "api": "127.0.0.1"}
        container = Container(image, hosts)
        try:
            check_image_config(image, container, Path(args.host_bundle))
            check_empty_connection_string(container, env)
            entrypoint = image.entrypoint
            expect(container.run([*entrypoint, "db", "init"], env), "db init")
            login = "alice@example.test"
            expect(container.run([*entrypoint, "users", "add", login], env), "users add")
            created = container.run([*entrypoint, "keys", "create", login], env)
            key = expect(created, "keys create").strip()
            step("db init, users add, keys create through the entrypoint")

            budget = float(env.get("Smtp__ShutdownTimeoutSeconds", "20"))
            log = workdir / "buildah-run.log"
            with (
                fake_api(api_port) as notes,
                running(container.run_argv(image.command, env), log, health_port) as (
                    process,
                    pid,
                ),
            ):
                uids = status_field(pid, "Uid")
                expected_uid, _ = container.passwd_entry(image.user)
                check(uids == [str(expected_uid)] * 4, f"server UIDs {uids}")
                step(f"server PID {pid} runs as UID {expected_uid}, not root")
                for port in (ports["submission"], ports["mx"]):
                    wait_for_port(port, process, log)
                check_health(container, env, compose, original_health, health_port)
                subject = f"image check {secrets.token_hex(4)}"
                send_messages(ports, login, key, env["Smtp__ServerName"], subject)
                check_stored(container, env, database, subject)
                check_notified(notes, variables["INTERNAL_API_KEY"])
                elapsed = stop_server(process, pid, budget, log, ports["submission"])
            step(f"SIGTERM under buildah run: 421 to an idle session, exit 0 in {elapsed:.1f} s")
            check_pid1(container, env, health_port, ports["submission"], budget, workdir)
            check_without_capability(container)
        finally:
            container.remove()
    return budget


def check_health(
    container: Container,
    env: Mapping[str, str],
    compose: ComposeService,
    original_port: int,
    health_port: int,
) -> None:
    url = f"http://localhost:{health_port}/healthz"
    result = container.run(["wget", "-S", "-O", "/dev/null", url], env)
    expect(result, "wget /healthz")
    check(re.search(r"HTTP/1\.[01] 200", result.stderr), f"/healthz: {result.stderr}")
    kind, *test = compose.healthcheck
    check(kind == "CMD-SHELL", f"compose healthcheck {compose.healthcheck}")
    command = test[0].replace(f"localhost:{original_port}/", f"localhost:{health_port}/")
    expect(container.run(["sh", "-c", command], env), f"compose health check {command!r}")
    own = container.image.config["Healthcheck"]["Test"]
    check(own[0] == "CMD-SHELL", f"HEALTHCHECK {own}")
    expect(container.run(["sh", "-c", own[1]], env), "the image's HEALTHCHECK")
    step("/healthz 200 through wget in the image; compose and image health checks pass")


def check_stored(container: Container, env: Mapping[str, str], database: str, subject: str) -> None:
    listing = expect(container.run([*container.image.entrypoint, "mail", "list"], env), "list")
    check(subject in listing and f"{subject} (MX)" in listing, f"mail list:\n{listing}")
    quoted = subject.replace("'", "''")
    count = psql(f"""SELECT count(*) FROM "Emails" WHERE "Subject" LIKE '{quoted}%'""", database)
    check(count == "2", f"{count} rows in Emails")
    step(f"authenticated and MX messages stored in PostgreSQL database {database}")


def check_notified(notes: Notifications, api_key: str) -> None:
    deadline = time.monotonic() + 15
    while len(notes.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    check(notes.received, "no notification reached the API")
    for path, authorization in notes.received:
        check(path == NOTIFICATION_PATH, f"notification to {path}")
        check(authorization == f"ApiKey {api_key}", f"Authorization {authorization!r}")
    step(f"{len(notes.received)} notifications to {NOTIFICATION_PATH} with the ApiKey")


def check_pid1(
    container: Container,
    env: Mapping[str, str],
    health_port: int,
    smtp_port: int,
    budget: float,
    workdir: Path,
) -> None:
    """The entrypoint as PID 1 of its own PID namespace, as a container runtime starts it."""
    image = container.image
    uid, gid = container.passwd_entry(image.user)
    hosts = container.rootfs / "etc/hosts"
    hosts.write_text("127.0.0.1 localhost postgres api\n::1 localhost\n")
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        f"--mount-proc={container.rootfs / 'proc'}",
        "chroot",
        f"--userspec={uid}:{gid}",
        f"--groups={gid}",
        str(container.rootfs),
        "/usr/bin/env",
        "-i",
        "-C",
        image.config.get("WorkingDir") or "/",
        *(f"{key}={value}" for key, value in {**image.env, **env}.items()),
        *image.command,
    ]
    log = workdir / "pid1.log"
    with running(argv, log, health_port) as (process, pid):
        namespace_pids = status_field(pid, "NSpid")
        check(namespace_pids[-1] == "1", f"server is PID {namespace_pids[-1]} in its namespace")
        elapsed = stop_server(process, pid, budget, log, smtp_port)
    step(f"SIGTERM to the server as PID 1: 421 to an idle session, exit 0 in {elapsed:.1f} s")


def check_without_capability(container: Container) -> None:
    """With CAP_NET_BIND_SERVICE out of the bounding set (``--cap-drop=ALL``) the kernel
    refuses to execute the capable interpreter; the entrypoint runs the plain one."""
    uid, gid = container.passwd_entry(container.image.user)
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_bind_service",
            "--",
            "unshare",
            "--mount",
            f"--mount-proc={container.rootfs / 'proc'}",
            "chroot",
            f"--userspec={uid}:{gid}",
            f"--groups={gid}",
            str(container.rootfs),
            *container.image.entrypoint,
            "--help",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    expect(result, "entrypoint without CAP_NET_BIND_SERVICE in the bounding set")
    check("usage: relate-smtp" in result.stdout, result.stdout)
    step("entrypoint runs with CAP_NET_BIND_SERVICE dropped from the bounding set")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="podman/buildah storage root")
    parser.add_argument("--runroot", required=True, help="podman/buildah run root")
    parser.add_argument(
        "--compose", default="docs/deploy.md", help="markdown with the compose file"
    )
    parser.add_argument("--host-bundle", required=True, help="the CA bundle lent to the build")
    args = parser.parse_args(argv)
    try:
        run_checks(args)
    except CheckFailed as exc:
        print(f"image check FAILED: {exc}", file=sys.stderr)
        return 1
    step("all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
