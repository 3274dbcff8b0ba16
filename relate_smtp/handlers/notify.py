"""Tell the Relate API about new mail (SPEC §6), off the SMTP reply path.

The 250 never waits for the API: :meth:`Notifier.message_stored` only queues, and one
background task (:meth:`Notifier.run`) posts. The queue is bounded so that an API
outage costs dropped notifications (logged) rather than memory. A notification is
retried only when it certainly did not reach the API (the connection was never made)
or the API said so (5xx): a slow API that times out may already have acted on it, and
being notified twice is worse for users than a missed push, which the app's next sync
repairs.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from typing import Final

import attrs
import httpx
import trio

from relate_smtp.storage import NewEmail, SavedEmail

__all__ = ["NOTIFICATION_PATH", "Notifier", "notification_payload", "notification_url"]

log = logging.getLogger("relate_smtp.notify")

NOTIFICATION_PATH: Final = "/api/internal/notifications/new-email"
DEFAULT_QUEUE_SIZE: Final = 1000
DEFAULT_MAX_ATTEMPTS: Final = 3
# Doubling from here: 0.5 s before the second try, 1 s before the third.
DEFAULT_RETRY_DELAY: Final = 0.5
# Connection set-up gets part of the request budget, so a connect timeout surfaces as
# httpx.ConnectTimeout (retried) before the whole-request deadline (not retried) passes.
_MAX_CONNECT_TIMEOUT: Final = 5.0

# Raised before any byte of the request left: the API cannot have seen it.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def notification_url(base_url: str) -> str:
    """Where notifications go: the path resolved against ``Api:BaseUrl`` by RFC 3986, as
    .NET's HttpClient resolves it for the original host.

    The path is absolute, so it replaces any path and query of the base
    (``http://api:5000/relate/`` → ``http://api:5000/api/internal/…``): an operator's
    base URL keeps reaching the same endpoint it reached before.
    """
    return str(httpx.URL(base_url).join(NOTIFICATION_PATH))


def notification_payload(email: NewEmail, saved: SavedEmail) -> dict[str, object]:
    """The JSON body the original host posted (camelCase, as ASP.NET binds it).

    ``receivedAt`` is ISO 8601 in UTC with microseconds and an explicit offset
    (``2026-11-26T18:05:19.123456+00:00``), which System.Text.Json reads into both
    DateTime and DateTimeOffset without loss.
    """
    received = email.received_at
    if received.tzinfo is None:
        received = received.replace(tzinfo=datetime.UTC)  # the store records UTC
    return {
        "userIds": [str(user_id) for user_id in dict.fromkeys(saved.linked_user_ids)],
        "email": {
            "id": str(saved.id),
            "from": email.from_address,
            "fromDisplay": email.from_display_name,
            "subject": email.subject,
            "receivedAt": received.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
            "hasAttachments": bool(email.attachments),
        },
    }


@attrs.frozen
class _Notification:
    email_id: uuid.UUID
    body: bytes


class Notifier:
    """Queues notifications as messages are stored and posts them in the background.

    Start :meth:`run` with ``nursery.start``; at shutdown call :meth:`aclose`, which stops
    accepting, lets the queue drain within a deadline and then ends :meth:`run`.
    An injected ``client`` is used as is (its timeouts apply) and not closed.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        client: httpx.AsyncClient | None = None,
        retry_delay: float = DEFAULT_RETRY_DELAY,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._url = notification_url(base_url)
        # What the original's PostAsJsonAsync sends.
        self._headers = {"Content-Type": "application/json; charset=utf-8"}
        if api_key:
            self._headers["Authorization"] = f"ApiKey {api_key}"
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._client = client
        self._queue_size = queue_size
        self._send, self._receive = trio.open_memory_channel[_Notification](queue_size)
        self._scope = trio.CancelScope()
        self._started = False
        self._finished = trio.Event()

    # ------------------------------------------------------------------ producer side

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        """Queue the notification for ``saved``; never blocks, never raises.

        Nothing is sent when no recipient is a local user.
        """
        if not saved.linked_user_ids:
            return
        body = json.dumps(notification_payload(email, saved), separators=(",", ":"))
        try:
            self._send.send_nowait(_Notification(saved.id, body.encode()))
        except trio.WouldBlock:
            log.warning(
                "notification queue full (%d waiting); dropped the notification for email %s",
                self._queue_size,
                saved.id,
            )
        except trio.ClosedResourceError:
            log.warning("notifier is shut down; dropped the notification for email %s", saved.id)

    # ------------------------------------------------------------------ consumer side

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Post queued notifications one at a time until :meth:`aclose` ends it.

        Start it with ``await nursery.start(notifier.run)``, so that a later
        :meth:`aclose` knows there is a consumer to wait for.
        """
        if self._started:
            raise RuntimeError("Notifier.run() is already running or has run")
        self._started = True
        task_status.started()
        try:
            with self._scope:
                if self._client is not None:
                    await self._consume(self._client)
                else:
                    timeout = httpx.Timeout(
                        self._timeout, connect=min(self._timeout / 2, _MAX_CONNECT_TIMEOUT)
                    )
                    async with httpx.AsyncClient(timeout=timeout) as client:
                        await self._consume(client)
        finally:
            self._finished.set()

    async def aclose(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain budget, not a cancel
        """Stop accepting, deliver what is queued within ``timeout`` seconds, then stop.

        Whatever is still queued at the deadline is dropped, with a warning.
        """
        self._send.close()
        if self._started:
            with trio.move_on_after(timeout):
                await self._finished.wait()
        undelivered = self._receive.statistics().current_buffer_used
        if undelivered:
            log.warning(
                "shutting down with %d notification(s) not delivered within %g s",
                undelivered,
                timeout,
            )
        self._scope.cancel()
        if self._started:
            await self._finished.wait()

    async def _consume(self, client: httpx.AsyncClient) -> None:
        async for notification in self._receive:
            try:
                await self._deliver(client, notification)
            except Exception:
                # A notification must never take the server down; log and go on.
                log.exception("notification for email %s failed", notification.email_id)

    async def _deliver(self, client: httpx.AsyncClient, notification: _Notification) -> None:
        email_id = notification.email_id
        failure = ""
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                await trio.sleep(self._retry_delay * 2 ** (attempt - 2))
            with trio.move_on_after(self._timeout) as deadline:
                try:
                    response = await client.post(
                        self._url, content=notification.body, headers=self._headers
                    )
                except _NOT_SENT as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    continue
                except httpx.HTTPError as exc:
                    log.warning(
                        "notification for email %s failed and is not retried, since the API "
                        "may have received it: %s: %s",
                        email_id,
                        type(exc).__name__,
                        exc,
                    )
                    return
                if response.is_success:
                    log.debug("notified the API of email %s", email_id)
                    return
                if response.status_code < 500:
                    log.warning(
                        "the API refused the notification for email %s: HTTP %d",
                        email_id,
                        response.status_code,
                    )
                    return
                failure = f"HTTP {response.status_code}"
                continue
            if deadline.cancelled_caught:
                log.warning(
                    "the API did not answer the notification for email %s within %g s; "
                    "not retried, since it may have received it",
                    email_id,
                    self._timeout,
                )
                return
        log.warning(
            "notification for email %s failed after %d attempt(s): %s",
            email_id,
            self._max_attempts,
            failure,
        )
