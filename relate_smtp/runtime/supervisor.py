"""``serve --workers N``: one parent binding the listeners, N worker processes serving them.

The parent binds every SMTP socket once and hands the same sockets to each worker (the
kernel spreads new connections over the processes accepting on them), serves /healthz and
/metrics itself (worker metrics aggregated with prometheus_client's multiprocess mode),
forwards signals, and restarts a worker that dies. Per-process state — the AUTH rate
limiter and result cache, the connection limits — is per worker; nothing is needed for
correctness that a worker keeps in memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import trio
from prometheus_client import CollectorRegistry, multiprocess

from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.runtime.checks import StatusLike
from relate_smtp.runtime.listeners import StartupError, bind_socket, plan_listeners
from relate_smtp.runtime.run import (
    load_certificates,
    report_startup_error,
    run_reporting_startup_errors,
)
from relate_smtp.runtime.server import (
    BoundListener,
    describe,
    health_checks,
    lifecycle,
    log_bound,
    log_start,
    start_health_server,
)
from relate_smtp.runtime.tls import certificate_status
from relate_smtp.storage.opening import open_store

log = logging.getLogger("relate_smtp.supervisor")

LISTEN_FDS_ENV = "RELATE_SMTP_LISTEN_FDS"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXIT_STARTUP = 2
_FAST_CRASH = 10.0  # a worker dying sooner than this after start backs off further
_MAX_BACKOFF = 30.0


def encode_fds(sockets: Mapping[ListenerKind, Sequence[socket.socket]]) -> str:
    """``submission=5,6;mx=7``: which inherited descriptors serve which listener."""
    return ";".join(
        f"{kind.value}={','.join(str(sock.fileno()) for sock in socks)}"
        for kind, socks in sockets.items()
    )


def decode_fds(text: str) -> dict[ListenerKind, list[socket.socket]]:
    """The sockets a worker inherited, by listener (the inverse of :func:`encode_fds`)."""
    result: dict[ListenerKind, list[socket.socket]] = {}
    for part in filter(None, text.split(";")):
        name, _, fds = part.partition("=")
        result[ListenerKind(name)] = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
    return result


def worker_argv(argv: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The worker's command line: the parent's without ``--workers`` and ``--dev-tls``
    (the parent makes the one development certificate all workers serve), plus
    ``extra`` overrides."""
    result: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif arg != "--dev-tls" and not arg.startswith("--workers="):
            result.append(arg)
    return [sys.executable, "-m", "relate_smtp", *result, *extra]


class _Worker:
    """One worker slot: keeps a process running until the supervisor stops."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.process: trio.Process | None = None

    async def keep_running(self) -> None:
        backoff = 1.0
        while not self._supervisor.stopping:
            started = trio.current_time()
            self.process = await trio.lowlevel.open_process(
                self._supervisor.argv,
                env=self._supervisor.worker_env,
                pass_fds=self._supervisor.fds,
            )
            log.info("worker %d started (pid %d)", self.index, self.process.pid)
            if self._supervisor.stopping:
                # The stop came while the process was being spawned: it missed it.
                self.process.send_signal(signal.SIGTERM)
            code = await self.process.wait()
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                self.process.pid, self._supervisor.metrics_dir
            )
            if self._supervisor.stopping:
                return
            if code == EXIT_STARTUP:
                log.error("worker %d could not start (exit 2); stopping", self.index)
                self._supervisor.fail()
                return
            lived = trio.current_time() - started
            backoff = backoff * 2 if lived < _FAST_CRASH else 1.0
            backoff = min(backoff, _MAX_BACKOFF)
            log.warning(
                "worker %d (pid %d) exited with status %s; restarting in %.0f s",
                self.index,
                self.process.pid,
                code,
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._supervisor.stopped.wait()

    def signal(self, signum: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signum)


class Supervisor:
    """The parent process of ``serve --workers N``."""

    def __init__(
        self, settings: Settings, *, workers: int, argv: Sequence[str], dev_tls: bool
    ) -> None:
        self.settings = settings
        self._certificates = load_certificates(settings, dev_tls=dev_tls)
        self.stopping = False
        self.stopped = trio.Event()
        self.failed = False
        self._plan = plan_listeners(settings, has_certificate=self._certificates is not None)
        self.sockets = self._bind()
        self.fds = [sock.fileno() for socks in self.sockets.values() for sock in socks]
        # Private to this run: the workers' metric files and the development certificate.
        self.runtime_dir = tempfile.mkdtemp(prefix="relate-smtp-")
        self.metrics_dir = os.path.join(self.runtime_dir, "metrics")
        os.mkdir(self.metrics_dir)
        extra: list[str] = []
        if dev_tls and self._certificates is not None and not settings.smtp.certificate_path:
            extra.append(f"--Smtp:CertificatePath={self._write_dev_certificate()}")
        self.argv = worker_argv(argv, extra)
        self.worker_env = {
            **os.environ,
            LISTEN_FDS_ENV: encode_fds(self.sockets),
            METRICS_DIR_ENV: self.metrics_dir,
        }
        self._workers = [_Worker(self, index) for index in range(workers)]

    def _write_dev_certificate(self) -> str:
        assert self._certificates is not None
        certificate = self._certificates.certificate
        path = os.path.join(self.runtime_dir, "dev-certificate.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(certificate.chain_pem + certificate.key_pem)
        return path

    def _bind(self) -> dict[ListenerKind, list[socket.socket]]:
        bound: dict[ListenerKind, list[socket.socket]] = {}
        try:
            for listener, port in self._plan:
                bound[listener.kind] = [bind_socket(listener.kind, port)]
        except StartupError:
            for socks in bound.values():
                for sock in socks:
                    sock.close()
            raise
        return bound

    def fail(self) -> None:
        self.failed = True
        self.stop(signal.SIGTERM)

    def stop(self, signum: int) -> None:
        if not self.stopping:
            lifecycle.info("Shutting down: stopping %d workers", len(self._workers))
        self.stopping = True
        self.stopped.set()
        for worker in self._workers:
            worker.signal(signum)

    async def run(self) -> None:
        log_start(self.settings, workers=len(self._workers))
        bound: list[BoundListener] = []
        for listener, _ in self._plan:
            bound.extend(describe(listener, self.sockets[listener.kind]))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        async with open_store(self.settings) as store, trio.open_nursery() as nursery:
            probe = health_checks(
                self.settings,
                store,
                submission_port=bound[0].port,
                certificate_health=self._certificate_health(),
            )
            bound.extend(await start_health_server(nursery, self.settings, probe, registry))
            log_bound(bound)
            nursery.start_soon(self._forward_signals)
            async with trio.open_nursery() as workers:
                for worker in self._workers:
                    workers.start_soon(worker.keep_running)
            nursery.cancel_scope.cancel()
        lifecycle.info("Shutdown complete")

    def _certificate_health(self) -> Callable[[], StatusLike]:
        """The parent's view of the certificate: reloaded on SIGHUP like the workers'."""
        certificates = self._certificates
        if certificates is None:
            return lambda: certificate_status(None, datetime.now(UTC))
        return lambda: certificates.status(datetime.now(UTC))

    async def _forward_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if self._certificates is not None:
                        await trio.to_thread.run_sync(self._certificates.reload)
                    for worker in self._workers:
                        worker.signal(signal.SIGHUP)
                else:
                    log.info("received %s, stopping the workers", signal.Signals(signum).name)
                    self.stop(signal.SIGTERM)

    def close(self) -> None:
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def run_supervisor(
    settings: Settings, *, workers: int, argv: Sequence[str], dev_tls: bool = False
) -> int:
    try:
        supervisor = Supervisor(settings, workers=workers, argv=argv, dev_tls=dev_tls)
    except StartupError as exc:
        return report_startup_error(exc)
    try:
        status = run_reporting_startup_errors(supervisor.run)
    finally:
        supervisor.close()
    return EXIT_STARTUP if supervisor.failed else status
