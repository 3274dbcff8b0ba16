"""Drives one SMTP connection through the sans-IO core.

The session owns the socket, the clock and the TLS upgrade; the core owns SMTP; the
handlers own the Relate rules. Replies of a pipelined batch leave in one write, made
when the core needs more input, before a TLS handshake, and before closing.
"""

from __future__ import annotations

import logging
import math
import os
from typing import assert_never

import trio

from relate_smtp import telemetry
from relate_smtp.handlers.auth import AuthOutcome
from relate_smtp.handlers.delivery import DeliveryOutcome
from relate_smtp.handlers.policy import Envelope, Principal
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import (
    AUTH_FAILED,
    AUTH_TEMPORARY_FAILURE,
    DATA_TOO_SLOW,
    INSUFFICIENT_RESOURCES,
    INTERNAL_ERROR,
    LOCAL_ERROR,
    RELAY_DENIED,
    SHUTTING_DOWN,
    TIMEOUT,
    TLS_NOT_AVAILABLE,
    UNKNOWN_USER,
    AuthRequest,
    ConnectionClosed,
    Hello,
    MailFrom,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    Pending,
    Quit,
    RcptTo,
    Reply,
    Reset,
    ServerConnection,
    StartTLS,
)
from relate_smtp.runtime import streams, tls
from relate_smtp.runtime.deadlines import Deadlines, deadlines
from relate_smtp.runtime.listeners import Listener
from relate_smtp.runtime.sender_checks import TransactionCheck, span_attributes
from relate_smtp.runtime.services import Services
from relate_smtp.runtime.spool import MessageBuffer
from relate_smtp.storage import StoreError
from relate_smtp.telemetry import SPANS, TAGS, AttributeValue

log = logging.getLogger("relate_smtp.session")

RECEIVE_SIZE = 64 * 1024


class Session:
    """One connection from greeting to close."""

    # Slots: thousands of idle sessions are held at once, and a dict each costs more.
    __slots__ = (
        "_buffer",
        "_bytes",
        "_client_ip",
        "_client_port",
        "_clock",
        "_command_deadline",
        "_conn",
        "_data_budget",
        "_deadline",
        "_deadlines",
        "_endpoint_port",
        "_helo",
        "_listener",
        "_messages",
        "_nursery",
        "_outcome",
        "_plain_fd",
        "_principal",
        "_recipients",
        "_sender",
        "_sender_check",
        "_services",
        "_shutting_down",
        "_stream",
        "_timeouts",
        "_tls",
        "_user_addresses",
        "_waiting",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: tuple[str, int],
        listener: Listener,
        services: Services,
    ) -> None:
        self._stream: trio.abc.Stream = stream
        # The descriptor of a plain TCP stream, for replies written without a wait.
        self._plain_fd = stream.fd if type(stream) is streams.PlainStream else -1
        self._client_ip, self._client_port = client
        self._listener = listener
        self._services = services
        self._timeouts = services.timeouts
        self._conn: ServerConnection | None = None
        # One cancel scope per session, cancelled by shutdown or, through ``expire``,
        # by this run's ``Deadlines`` once ``deadline`` has passed. The deadline moves
        # with each read and reply; it is "infinite" while the handlers decide.
        self._clock: trio.CancelScope | None = None
        self._deadline = math.inf
        self._deadlines: Deadlines | None = None
        self._waiting: str | None = None  # "receive" | "send" while blocked on the peer
        self._shutting_down = False
        self._principal: Principal | None = None
        self._user_addresses: tuple[str, ...] | None = None
        self._recipients: list[str] = []
        self._buffer: MessageBuffer | None = None
        self._tls = listener.implicit_tls
        self._messages = 0
        self._bytes = 0
        self._outcome = "closed"
        self._command_deadline = 0.0
        self._data_budget = 0.0
        self._sender = ""  # MAIL FROM of the transaction, for the rcpt_to span
        self._endpoint_port = 0  # the port connected to, for spans; 0 until traced
        self._helo = ""
        # Sender authentication (MX only): the nursery its lookups run in, and the
        # transaction being checked.
        self._nursery: trio.Nursery | None = None
        self._sender_check: TransactionCheck | None = None

    # ---- the server's view -------------------------------------------------------

    @property
    def in_message(self) -> bool:
        return self._conn is not None and self._conn.in_message

    @property
    def deadline(self) -> float:
        """When the wait for the peer in progress times out (``Deadlines`` reads it)."""
        return self._deadline

    def expire(self) -> None:
        """The deadline passed: interrupt the wait (``Deadlines`` calls this)."""
        clock = self._clock
        if clock is not None:
            clock.cancel()

    def request_shutdown(self) -> None:
        """Close at the next command boundary; a session waiting for a command is
        interrupted at once, one receiving a message may finish it first."""
        self._shutting_down = True
        if self._clock is not None and not self.in_message:
            self._clock.cancel()

    async def run(self) -> None:
        """The session under its span: one trace per connection."""
        if not telemetry.enabled():
            await self._run()
            return
        with telemetry.span(SPANS.session, self._session_tags(), kind="server") as span:
            try:
                await self._run()
            finally:
                span.set_attribute(TAGS.outcome, self._outcome)
                span.set_attribute(TAGS.messages, self._messages)
                span.set_attribute(TAGS.tls, self._tls)

    async def _run(self) -> None:
        metrics = self._services.metrics
        metrics.connection_opened()
        linger = False
        watch = self._deadlines = deadlines()
        watch.watch(self)
        try:
            conn: ServerConnection | None = None
            # The clock also covers the implicit-TLS handshake, so that shutdown can
            # interrupt a client that connected and never said a word.
            with trio.CancelScope() as clock:
                self._clock = clock
                if self._listener.implicit_tls and not await self._start_tls():
                    return
                self._conn = conn = ServerConnection(self._listener.protocol)
                checks = self._services.sender_checks
                if not self._checks_senders:
                    await self._converse(conn)
                elif checks is not None and checks.nursery is not None:
                    self._nursery = checks.nursery  # the server's (see SenderChecks.run)
                    await self._converse(conn)
                else:
                    await self._converse_checking_senders(conn)
            self._clock = None
            self._deadline = math.inf
            if clock.cancelled_caught:
                if conn is None:
                    self._outcome = "shutdown"
                else:
                    await self._interrupted(conn)
            # A final reply was sent to a peer that may still be talking.
            linger = conn is not None and conn.closed and self._waiting != "send"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._outcome = "peer hung up"
        except Exception:
            self._outcome = "internal error"
            log.exception("session from %s failed", self._client_ip)
            metrics.internal_error("session")
            linger = await self._try_abort(INTERNAL_ERROR)
        finally:
            self._clock = None
            watch.unwatch(self)
            self._nursery = None
            self._end_sender_check()  # its lookups stop with the session
            self._discard_message()
            try:
                if linger:
                    await streams.linger(self._stream, after_quit=self._outcome == "quit")
            finally:
                await streams.close_now(self._stream)
            metrics.connection_closed()
            self._log_summary()

    # ---- the loop -----------------------------------------------------------------

    @property
    def _checks_senders(self) -> bool:
        return self._services.sender_checks is not None and self._listener.kind is ListenerKind.MX

    async def _converse_checking_senders(self, conn: ServerConnection) -> None:
        """``_converse`` with a nursery of its own for the sender checks' DNS lookups,
        which end with the session (when the server's is not there: a session run
        outside ``Server.serve``). An error of the conversation leaves the nursery as
        itself, not in a group, so ``run`` handles it as on any other listener."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._converse(conn)
            except Exception as exc:
                failure = exc
            finally:
                self._nursery = None
                self._end_sender_check()
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _interrupted(self, conn: ServerConnection) -> None:
        """The session clock ran out, or shutdown interrupted a wait for a command."""
        if self._waiting == "send":
            self._outcome = "client not reading"
            return
        if self._waiting == "handshake":
            # The client was told 220 and speaks TLS now: plaintext would be garbage.
            self._outcome = "shutdown" if self._shutting_down else "timeout"
            return
        if self._shutting_down and not conn.in_message:
            self._outcome = "shutdown"
            conn.abort(SHUTTING_DOWN)
        else:
            self._outcome = "timeout"
            log.info("timeout from %s", self._client_ip)
            receiving = self._buffer is not None and self._buffer.size > 0
            conn.abort(DATA_TOO_SLOW if conn.in_message and receiving else TIMEOUT)
        with trio.move_on_after(self._timeouts.tls_handshake):
            await self._stream.send_all(conn.data_to_send())

    async def _converse(self, conn: ServerConnection) -> None:
        self._command_deadline = trio.current_time() + self._timeouts.command
        self._deadline = self._command_deadline
        while True:
            event = conn.next_event()
            if event is Pending.NEED_DATA:
                replied = await self._flush(conn)
                conn.receive_data(await self._receive(conn, replied=replied))
                continue
            if event is Pending.PAUSED:
                await self._flush(conn)
                if not await self._start_tls():
                    return
                conn.tls_started()
                # RFC 3207 §4.2: nothing learnt before TLS counts after it.
                self._principal = None
                self._user_addresses = None
                self._reset_transaction()
                continue
            match event:
                case Hello():
                    self._helo = event.domain
                    conn.accept()
                case AuthRequest():
                    await self._authenticate(conn, event)
                case MailFrom():
                    await self._mail_from(conn, event)
                case RcptTo():
                    await self._rcpt_to(conn, event)
                case StartTLS():
                    if self._services.tls_context() is None:
                        conn.reject(TLS_NOT_AVAILABLE)
                    else:
                        conn.accept()
                case MessageStart():
                    self._discard_message()
                    self._buffer = self._services.spool.buffer()
                    self._data_budget = self._timeouts.data
                case MessageChunk():
                    if self._buffer is not None:
                        self._buffer.append(event.data)
                    if self._sender_check is not None:
                        self._sender_check.message_chunk(event.data)
                case MessageEnd():
                    await self._message_end(conn, event.size)
                case MessageAborted():
                    self._discard_message()
                    self._end_sender_check()
                    self._services.metrics.reject("message_aborted")
                case Reset():
                    self._reset_transaction()
                case Quit():
                    self._outcome = "quit"
                case ConnectionClosed():
                    await self._flush(conn)
                    return
                case _:
                    assert_never(event)

    async def _receive(self, conn: ServerConnection, *, replied: bool) -> bytes:
        """One read under the clock that applies now: the command deadline, or the data
        budget while a message streams in. ``replied``: a reply was just sent."""
        if self._shutting_down and not conn.in_message:
            self._outcome = "shutdown"
            conn.abort(SHUTTING_DOWN)
            return b""
        in_message = conn.in_message
        if in_message:
            now = trio.current_time()
            self._deadline = now + min(self._data_budget, self._timeouts.data)
        else:
            self._deadline = self._command_deadline
        self._waiting = "receive"
        data: bytes | bytearray
        if self._plain_fd >= 0:
            watch = self._deadlines
            assert watch is not None
            others = len(watch) > 1  # every session of this run is watched there
            data = await streams.receive_plain(
                self._plain_fd, RECEIVE_SIZE, replied=replied, others=others
            )
        else:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        self._waiting = None
        if in_message:
            self._account_data(len(data), trio.current_time() - now)
        return bytes(data)

    def _account_data(self, size: int, elapsed: float) -> None:
        """Postfix's smtpd_min_data_rate: each read spends its time from the budget and
        earns size/rate back, never beyond the data timeout."""
        rate = self._timeouts.min_data_rate
        if rate <= 0:
            self._data_budget = self._timeouts.data
            return
        self._data_budget = min(self._timeouts.data, self._data_budget - elapsed + size / rate)

    async def _flush(self, conn: ServerConnection) -> bool:
        """Send the queued replies; False when there were none."""
        data = conn.data_to_send()
        if not data:
            return False
        # A reply means the peer completed a command: the next one gets a full period
        # (RFC 5321 §4.5.3.2), while a line dribbled in byte by byte never earns one. The
        # same deadline bounds this write, so a peer that reads nothing is cut too.
        watch = self._deadlines
        assert watch is not None
        self._deadline = self._command_deadline = watch.now + self._timeouts.command
        if self._plain_fd >= 0:
            # Replies are small and the socket buffer is almost always free: write them
            # straight away, skipping the scheduler round trip of an awaited send. Trio
            # still does any write that would block.
            try:
                written = os.write(self._plain_fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if written == len(data):
                return True
            data = data[written:]
        self._waiting = "send"
        await self._stream.send_all(data)
        self._waiting = None
        return True

    def _pause_clock(self) -> None:
        """No deadline while the handlers decide (bcrypt, the database): only waits on
        the peer are timed."""
        self._deadline = math.inf

    async def _try_abort(self, reply: Reply) -> bool:
        """Say ``reply`` (a 421) if the session is still open; True once it was sent."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            conn.abort(reply)
            with trio.move_on_after(1) as scope:
                await self._stream.send_all(conn.data_to_send())
        except Exception:
            log.debug("could not send the closing reply", exc_info=True)
            return False
        return not scope.cancelled_caught

    # ---- TLS ----------------------------------------------------------------------

    async def _start_tls(self) -> bool:
        context = self._services.tls_context()
        if context is None:
            self._outcome = "no certificate"
            return False
        ssl_stream = tls.wrap_server(self._stream, context)
        metrics = self._services.metrics
        name = self._listener.name
        self._waiting = "handshake"
        with trio.move_on_after(self._timeouts.tls_handshake) as scope:
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._outcome = "tls handshake failed"
                metrics.record_tls(name, ok=False)
                log.info(
                    "TLS handshake with %s failed: %s", self._client_ip, streams.describe_error(exc)
                )
                return False
        self._waiting = None
        if scope.cancelled_caught:
            self._outcome = "tls handshake timeout"
            metrics.record_tls(name, ok=False)
            log.info("TLS handshake with %s timed out", self._client_ip)
            return False
        self._stream = ssl_stream
        self._plain_fd = -1
        self._tls = True
        metrics.record_tls(name, ok=True)
        return True

    # ---- decisions ----------------------------------------------------------------

    async def _authenticate(self, conn: ServerConnection, event: AuthRequest) -> None:
        self._pause_clock()
        with telemetry.span(SPANS.auth, {TAGS.auth_user: event.username}) as span:
            result = await self._services.authenticator.authenticate(
                event.username,
                event.password,
                self._client_ip,
                authorization_id=event.authorization_id,
            )
            span.set_attribute(TAGS.auth_success, result.outcome is AuthOutcome.SUCCESS)
            if result.outcome is AuthOutcome.BLOCKED:
                span.set_attribute(TAGS.auth_rate_limited, True)
        self._services.metrics.record_auth(result)
        if result.outcome is AuthOutcome.SUCCESS and result.user_id and result.address:
            self._principal = Principal(user_id=result.user_id, address=result.address)
            self._user_addresses = None
            conn.accept()
            return
        if result.outcome is AuthOutcome.FAILED:
            conn.reject(AUTH_FAILED)
        else:
            conn.reject(AUTH_TEMPORARY_FAILURE)

    async def _mail_from(self, conn: ServerConnection, event: MailFrom) -> None:
        if self._shutting_down:
            # A transaction pipelined behind the last message must not start now.
            self._outcome = "shutdown"
            conn.abort(SHUTTING_DOWN)
            return
        services = self._services
        addresses: tuple[str, ...] = ()
        if self._principal is not None and services.mailbox_filter.restrict_sender_to_login:
            self._pause_clock()
            try:
                addresses = await self._addresses_of_user(self._principal)
            except StoreError as exc:
                log.warning("sender check failed (database): %s", exc)
                conn.reject(LOCAL_ERROR)
                return
        with telemetry.span(SPANS.mail_from, self._filter_tags(event.address)):
            reply = await services.mailbox_filter.check_sender(
                self._listener.kind, self._principal, event.address, addresses
            )
        if reply is None:
            self._sender = event.address
            self._recipients = []
            self._begin_sender_check(event.address)
            conn.accept()
        else:
            services.metrics.reject("sender")
            conn.reject(reply)

    def _begin_sender_check(self, mail_from: str) -> None:
        """Issue 15: SPF of an unauthenticated MX transaction starts at MAIL FROM."""
        self._end_sender_check()
        checks = self._services.sender_checks
        if checks is None or self._nursery is None or self._principal is not None:
            return
        self._sender_check = checks.begin(
            self._nursery, client_ip=self._client_ip, helo=self._helo, mail_from=mail_from
        )

    def _end_sender_check(self) -> None:
        check, self._sender_check = self._sender_check, None
        if check is not None:
            check.cancel()

    async def _addresses_of_user(self, principal: Principal) -> tuple[str, ...]:
        if self._user_addresses is None:
            self._user_addresses = await self._services.store.user_addresses(principal.user_id)
        return self._user_addresses

    async def _rcpt_to(self, conn: ServerConnection, event: RcptTo) -> None:
        if self._principal is None and self._listener.kind is ListenerKind.MX:
            self._pause_clock()  # the recipient check may ask the database
        path = Envelope(
            local_part=event.local_part, domain=event.domain, source_route=event.source_route
        )
        with telemetry.span(SPANS.rcpt_to, self._filter_tags(self._sender, event.address)) as span:
            reply, stored_as = await self._services.mailbox_filter.decide_recipient(
                self._listener.kind, self._principal, path
            )
            if reply is RELAY_DENIED:
                span.set_attribute(TAGS.relay_rejected, True)
            elif reply is UNKNOWN_USER:
                span.set_attribute(TAGS.unknown_recipient, True)
        if reply is None:
            self._recipients.append(stored_as or event.address)
            conn.accept()
        else:
            self._services.metrics.reject("recipient")
            conn.reject(reply)

    async def _message_end(self, conn: ServerConnection, size: int) -> None:
        self._pause_clock()
        buffer, self._buffer = self._buffer, None
        started = trio.current_time()
        try:
            if buffer is None or buffer.failed:
                outcome = DeliveryOutcome(reply=INSUFFICIENT_RESOURCES)
            else:
                outcome = await self._deliver(buffer)
        finally:
            if buffer is not None:
                buffer.discard()
            self._end_sender_check()
        elapsed = trio.current_time() - started
        self._services.metrics.record_delivery(outcome, size=size, elapsed=elapsed)
        self._recipients = []
        reply = outcome.reply
        if reply.code < 400:
            self._messages += 1
            self._bytes += size
            conn.accept(reply)
        else:
            conn.reject(reply)

    async def _deliver(self, buffer: MessageBuffer) -> DeliveryOutcome:
        """The handlers' outcome; a bug among them is answered 451 (the sender keeps
        the message) but never silently: its traceback is logged and it is counted in
        ``smtp_internal_errors_total``, which the ``smtp`` health check reports."""
        services = self._services
        # Sender authentication and the memory budget share the data timeout: the
        # client waits for one reply.
        wait_limit = self._timeouts.data
        check, self._sender_check = self._sender_check, None
        try:
            message = buffer.finish()
            if check is not None:
                started = trio.current_time()
                with telemetry.span(SPANS.sender_auth) as span:
                    refused = await check.finish(message, wait_limit=wait_limit)
                    if check.verdict is not None and telemetry.enabled():
                        for key, value in span_attributes(check.verdict).items():
                            span.set_attribute(key, value)
                if refused is not None:
                    return refused
                wait_limit = max(0.0, wait_limit - (trio.current_time() - started))
            return await services.delivery.deliver(
                message,
                envelope_recipients=tuple(self._recipients),
                sent_by_user_id=self._principal.user_id if self._principal else None,
                wait_limit=wait_limit,
            )
        except Exception:
            log.exception("message from %s not stored: internal error", self._client_ip)
            services.metrics.internal_error("delivery")
            return DeliveryOutcome(reply=LOCAL_ERROR)

    def _reset_transaction(self) -> None:
        self._recipients = []
        self._discard_message()
        self._end_sender_check()

    def _discard_message(self) -> None:
        """Forget the message being received, and remove its spool file if it has one."""
        if self._buffer is not None:
            self._buffer.discard()
            self._buffer = None

    def _session_tags(self) -> dict[str, AttributeValue]:
        """The session span's tags; notes the port connected to for the filter spans."""
        stream = self._stream
        if isinstance(stream, streams.PlainStream):
            self._endpoint_port = int(stream.socket.getsockname()[1])
        return {
            TAGS.client_address: self._client_ip,
            TAGS.client_port: self._client_port,
            TAGS.listener: self._listener.name,
            TAGS.endpoint_port: self._endpoint_port,
        }

    def _filter_tags(
        self, sender: str, recipient: str | None = None
    ) -> dict[str, AttributeValue] | None:
        """The original's MxMailboxFilter tags (``smtp.to`` for a recipient)."""
        if not telemetry.enabled():
            return None
        tags: dict[str, AttributeValue] = {}
        if recipient is not None:
            tags[TAGS.recipient] = recipient
        tags[TAGS.sender] = sender
        tags[TAGS.endpoint_port] = self._endpoint_port
        tags[TAGS.is_authenticated] = self._principal is not None
        return tags

    def _log_summary(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        user = self._principal.address if self._principal else "-"
        log.info(
            "session %s:%d listener=%s tls=%s user=%s messages=%d bytes=%d outcome=%s",
            self._client_ip,
            self._client_port,
            self._listener.name,
            "yes" if self._tls else "no",
            user,
            self._messages,
            self._bytes,
            self._outcome,
        )
