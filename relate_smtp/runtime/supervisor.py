"""``serve --workers N``: one parent binding the listeners, N worker processes serving them.

The parent binds every SMTP socket once and hands the same sockets to each worker (the
kernel spreads new connections over the processes accepting on them), serves /healthz and
/metrics itself (worker metrics aggregated with prometheus_client's multiprocess mode),
forwards signals, and restarts a worker that dies. Per-process state — the AUTH rate
limiter and result cache, the connection limits — is per worker; nothing is needed for
correctness that a worker keeps in memory.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence

import attrs
import trio
from prometheus_client import CollectorRegistry, multiprocess

from relate_smtp import app
from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.runtime import tls
from relate_smtp.runtime.health import start_health_server
from relate_smtp.runtime.lifecycle import lifecycle, log_bound, log_start
from relate_smtp.runtime.listeners import (
    BoundListener,
    bind_planned,
    close_all,
    describe,
    plan_listeners,
)
from relate_smtp.storage.opening import open_store

log = logging.getLogger("relate_smtp.supervisor")

LISTEN_FDS_ENV = "RELATE_SMTP_LISTEN_FDS"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
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


@attrs.frozen(kw_only=True)
class Launch:
    """How every worker of one run is started."""

    argv: Sequence[str]
    env: Mapping[str, str]
    fds: Sequence[int]
    metrics_dir: str


class _Worker:
    """One worker slot: keeps a process running until the supervisor stops."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.process: trio.Process | None = None

    async def keep_running(self, launch: Launch) -> None:
        backoff = 1.0
        while not self._supervisor.stopping:
            started = trio.current_time()
            self.process = await trio.lowlevel.open_process(
                launch.argv, env=launch.env, pass_fds=launch.fds
            )
            log.info("worker %d started (pid %d)", self.index, self.process.pid)
            if self._supervisor.stopping:
                # The stop came while the process was being spawned: it missed it.
                self.process.send_signal(signal.SIGTERM)
            code = await self.process.wait()
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                self.process.pid, launch.metrics_dir
            )
            if self._supervisor.stopping:
                return
            if code == app.EXIT_STARTUP:
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
    """The parent process of ``serve --workers N``.

    The constructor only records what to do; :meth:`run` loads the certificate, binds
    the listeners and creates the run's private directory, and removes it on the way out.
    """

    def __init__(
        self, settings: Settings, *, workers: int, argv: Sequence[str], dev_tls: bool
    ) -> None:
        self.settings = settings
        self._argv = argv
        self._dev_tls = dev_tls
        self.stopping = False
        self.stopped = trio.Event()
        self.failed = False
        self._workers = [_Worker(self, index) for index in range(workers)]

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
        """Bind, start the workers, serve health until they have all stopped."""
        certificates = app.load_certificates(self.settings, dev_tls=self._dev_tls)
        plan = plan_listeners(self.settings, has_certificate=certificates is not None)
        sockets = bind_planned(plan)
        # Private to this run: the workers' metric files and the development certificate.
        runtime_dir = tempfile.mkdtemp(prefix="relate-smtp-")
        try:
            launch = self._launch(sockets, runtime_dir, certificates)
            bound: list[BoundListener] = []
            for listener, _ in plan:
                bound.extend(describe(listener, sockets[listener.kind]))
            await self._serve(bound, launch, certificates)
        finally:
            close_all(sockets)
            shutil.rmtree(runtime_dir, ignore_errors=True)
        lifecycle.info("Shutdown complete")

    def _launch(
        self,
        sockets: Mapping[ListenerKind, Sequence[socket.socket]],
        runtime_dir: str,
        certificates: tls.CertificateStore | None,
    ) -> Launch:
        metrics_dir = os.path.join(runtime_dir, "metrics")
        os.mkdir(metrics_dir)
        extra: list[str] = []
        if self._dev_tls and certificates is not None and not self.settings.smtp.certificate_path:
            path = _write_dev_certificate(runtime_dir, certificates.certificate)
            extra.append(f"--Smtp:CertificatePath={path}")
        return Launch(
            argv=worker_argv(self._argv, extra),
            env={**os.environ, LISTEN_FDS_ENV: encode_fds(sockets), METRICS_DIR_ENV: metrics_dir},
            fds=[sock.fileno() for socks in sockets.values() for sock in socks],
            metrics_dir=metrics_dir,
        )

    async def _serve(
        self,
        bound: list[BoundListener],
        launch: Launch,
        certificates: tls.CertificateStore | None,
    ) -> None:
        log_start(self.settings, workers=len(self._workers))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=launch.metrics_dir)  # type: ignore[no-untyped-call]
        async with open_store(self.settings) as store, trio.open_nursery() as nursery:
            probe = app.health_checks(
                self.settings,
                store,
                submission_port=bound[0].port,
                # The parent's view of the certificate: reloaded on SIGHUP like the workers'.
                certificate_health=app.certificate_verdict(certificates),
                registry=registry,
            )
            endpoints = self.settings.health_check.endpoints
            bound.extend(await start_health_server(nursery, endpoints, probe, registry))
            log_bound(bound)
            await nursery.start(
                functools.partial(
                    app.handle_signals,
                    stop=functools.partial(self.stop, signal.SIGTERM),
                    reload=functools.partial(self._reload, certificates),
                )
            )
            async with trio.open_nursery() as workers:
                for worker in self._workers:
                    workers.start_soon(worker.keep_running, launch)
            nursery.cancel_scope.cancel()

    async def _reload(self, certificates: tls.CertificateStore | None) -> None:
        await app.reload_certificates(certificates)
        for worker in self._workers:
            worker.signal(signal.SIGHUP)


def _write_dev_certificate(directory: str, certificate: tls.LoadedCertificate) -> str:
    """The parent's development certificate, for the workers to load (mode 0600)."""
    path = os.path.join(directory, "dev-certificate.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(certificate.chain_pem + certificate.key_pem)
    return path


def run_supervisor(
    settings: Settings, *, workers: int, argv: Sequence[str], dev_tls: bool = False
) -> int:
    """Supervise ``workers`` processes; the exit status (2 for a start-up problem, the
    parent's or a worker's)."""
    supervisor = Supervisor(settings, workers=workers, argv=argv, dev_tls=dev_tls)
    status = app.run_reporting_startup_errors(supervisor.run)
    return app.EXIT_STARTUP if supervisor.failed else status
