"""The ``serve`` command in one process: open the store, run the server until a signal.

A ``--workers`` worker runs this too, on the sockets its parent bound.
"""

from __future__ import annotations

import functools
import gc
import socket
from collections.abc import Mapping, Sequence

import trio

from relate_smtp import app
from relate_smtp.app import run_reporting_startup_errors
from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.storage.opening import open_store

__all__ = ["run_reporting_startup_errors", "run_server", "serve_until_signalled"]


async def serve_until_signalled(
    settings: Settings,
    *,
    dev_tls: bool,
    sockets: Mapping[ListenerKind, Sequence[socket.socket]] | None = None,
) -> None:
    """Run one server until SIGTERM/SIGINT; SIGHUP reloads the certificate.

    With ``sockets`` (inherited from a ``--workers`` parent) this process is a worker:
    it serves those sockets and leaves /healthz and /metrics to the parent.
    """
    certificates = app.load_certificates(settings, dev_tls=dev_tls)
    # Telemetry outlives the store, so that the last commits' spans are flushed too.
    async with app.open_telemetry(settings) as exporting, open_store(settings) as store:
        await app.check_store(store)
        server = app.build_server(
            settings,
            store=store,
            tls_context=app.tls_context_of(certificates),
            certificate_health=app.certificate_verdict(certificates),
            instruments=exporting.instruments,
        )

        def stop() -> None:
            exporting.stopping()
            server.shutdown()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    app.handle_signals,
                    stop=stop,
                    reload=functools.partial(app.reload_certificates, certificates),
                )
            )
            if certificates is not None and certificates.path is not None:
                nursery.start_soon(certificates.watch)

            async def serve(*, task_status: trio.TaskStatus[object]) -> None:
                await server.serve(sockets=sockets, health=sockets is None, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            freeze_startup_heap()


def freeze_startup_heap() -> None:
    """Leave what start-up built out of every later garbage collection.

    Modules, settings, TLS material and the Public Suffix List (some 100,000 objects)
    live as long as the process; each full collection would traverse them again, and
    sessions allocate enough for collections to run every few hundred messages.
    ``gc.freeze`` moves them to a generation the collector never scans (they are still
    freed normally). Only for a serving process: tests run many servers in one.
    """
    gc.collect()
    gc.freeze()


def run_server(
    settings: Settings,
    *,
    dev_tls: bool = False,
    sockets: Mapping[ListenerKind, Sequence[socket.socket]] | None = None,
) -> int:
    """Serve in this process; the exit status (2 for a start-up problem)."""
    return run_reporting_startup_errors(
        functools.partial(serve_until_signalled, settings, dev_tls=dev_tls, sockets=sockets)
    )
