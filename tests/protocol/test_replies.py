"""Reply validation and rendering, the named replies, and ProtocolConfig."""

from __future__ import annotations

import pytest

import relate_smtp.protocol as protocol
from relate_smtp.protocol import (
    BareLineEndings,
    BodyType,
    ProtocolConfig,
    Reply,
    message_accepted,
)


def test_render_single_and_multi_line() -> None:
    assert Reply(250, "2.0.0", ("OK",)).render() == b"250 2.0.0 OK\r\n"
    assert Reply(250, None, ("a", "b", "c")).render() == b"250-a\r\n250-b\r\n250 c\r\n"
    assert Reply(334, None, ("",)).render() == b"334 \r\n"
    assert Reply(550, "5.1.1", ("x", "y")).render() == b"550-5.1.1 x\r\n550 5.1.1 y\r\n"


@pytest.mark.parametrize(
    ("code", "enhanced", "lines"),
    [
        (199, None, ("x",)),
        (600, None, ("x",)),
        (250, "5.0.0", ("x",)),
        (550, "2.0.0", ("x",)),
        (354, "3.0.0", ("x",)),
        (250, "2.0", ("x",)),
        (250, "2.0.0.0", ("x",)),
        (250, None, ()),
        (250, None, ["x"]),
        (250, None, ("a\r\nMAIL FROM:<x@y>",)),
        (250, None, ("a\n",)),
    ],
)
def test_invalid_replies(code: int, enhanced: str | None, lines: tuple[str, ...]) -> None:
    with pytest.raises((ValueError, TypeError)):
        Reply(code, enhanced, lines)


def test_replies_are_values() -> None:
    assert Reply(250, "2.0.0", ("OK",)) == Reply(250, "2.0.0", ("OK",))
    assert hash(Reply(250, "2.0.0", ("OK",))) == hash(Reply(250, "2.0.0", ("OK",)))
    with pytest.raises(AttributeError):
        Reply(250, "2.0.0", ("OK",)).code = 251  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("AUTH_SUCCEEDED", b"235 2.7.0 Authentication successful\r\n"),
        ("AUTH_FAILED", b"535 5.7.8 Authentication credentials invalid\r\n"),
        (
            "AUTH_TEMPORARY_FAILURE",
            b"454 4.7.0 Temporary authentication failure, try again later\r\n",
        ),
        ("AUTH_REQUIRED", b"530 5.7.0 Authentication required\r\n"),
        ("RELAY_DENIED", b"550 5.7.1 Relay access denied\r\n"),
        ("UNKNOWN_USER", b"550 5.1.1 No such user here\r\n"),
        ("SENDER_NOT_OWNED", b"553 5.7.1 Sender address not owned by the authenticated user\r\n"),
        ("LOCAL_ERROR", b"451 4.3.0 Temporary local problem, try again later\r\n"),
        ("MESSAGE_TOO_BIG", b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
        ("ATTACHMENT_TOO_BIG", b"552 5.3.4 Attachment size exceeds the fixed maximum\r\n"),
        ("SHUTTING_DOWN", b"421 4.3.2 Service shutting down, closing channel\r\n"),
        ("TIMEOUT", b"421 4.4.2 Timeout exceeded, closing channel\r\n"),
        ("DATA_TOO_SLOW", b"421 4.4.2 Data rate too low, closing channel\r\n"),
        ("TOO_MANY_CONNECTIONS", b"421 4.7.0 Too many connections, try again later\r\n"),
        ("TLS_NOT_AVAILABLE", b"454 4.7.0 TLS not available\r\n"),
    ],
)
def test_named_replies(name: str, wire: bytes) -> None:
    assert getattr(protocol, name).render() == wire


def test_message_accepted() -> None:
    assert message_accepted("ABC123").render() == b"250 2.0.0 OK: queued as ABC123\r\n"
    with pytest.raises(ValueError):
        message_accepted("x\r\n250 injected")
    with pytest.raises(ValueError):
        message_accepted("x\n250 injected")
    # Built without the validators, it is the same value as a validated Reply.
    assert message_accepted("Q1") == Reply(250, "2.0.0", ("OK: queued as Q1",))
    assert hash(message_accepted("Q1")) == hash(Reply(250, "2.0.0", ("OK: queued as Q1",)))


def test_public_api_is_complete() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert BareLineEndings("reject") is BareLineEndings.REJECT
    assert BodyType("8BITMIME") is BodyType.EIGHT_BIT_MIME


def test_config_defaults() -> None:
    config = ProtocolConfig()
    assert config.hostname == "localhost"
    assert config.max_message_size == 52_428_800
    assert config.max_recipients == 100
    assert config.max_errors == 10
    assert config.max_command_line == 512
    assert config.max_auth_line == 12288
    assert config.auth_enabled and config.auth_required and config.allow_insecure_auth
    assert not config.tls_available and not config.tls_active
    assert config.bare_line_endings is BareLineEndings.NORMALIZE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": ""},
        {"hostname": "a b"},
        {"max_message_size": -1},
        {"max_recipients": 0},
        {"max_command_line": 0},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProtocolConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        ProtocolConfig("localhost")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        ProtocolConfig().hostname = "x"  # type: ignore[misc]
