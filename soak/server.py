"""``relate-smtp serve --dev-tls`` for the soak, with one addition: on SIGUSR1 it writes
``soak-probe tasks=<n>`` to stderr, the number of Trio tasks alive in the process.

The server has no way of its own to report its task count, and file descriptors and
RSS can be read from /proc but tasks cannot; everything else is the product's own
start-up path (settings, logging, store, certificates, signals).
"""

from __future__ import annotations

import functools
import resource
import signal
import sys
from collections.abc import Sequence

import trio

from relate_smtp.cli import configure_logging
from relate_smtp.config import Settings, load_settings, split_overrides
from relate_smtp.runtime.run import run_reporting_startup_errors, serve_until_signalled


def count_tasks() -> int:
    """Every task under the root task, the root included."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count = 0
    pending = [root]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


async def report_tasks_on_sigusr1() -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            print(f"soak-probe tasks={count_tasks()}", file=sys.stderr, flush=True)


async def serve_with_probe(settings: Settings) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_tasks_on_sigusr1)
        await serve_until_signalled(settings, dev_tls=True)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str]) -> int:
    overrides, _ = split_overrides(list(argv))
    settings = load_settings(overrides=overrides)
    configure_logging(settings.log_level)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return run_reporting_startup_errors(functools.partial(serve_with_probe, settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
