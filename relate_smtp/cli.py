"""The ``relate-smtp`` command: serve, db init, users, keys, mail (SPEC §9).

Every command reads the same configuration as ``serve``; every failure prints one clear
message and exits non-zero (2 for bad configuration or start-up problems).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import trio

from relate_smtp.config import ConfigError, LogLevel, Settings, load_settings, split_overrides

log = logging.getLogger("relate_smtp")

EXIT_FAILURE = 1
EXIT_CONFIG = 2

# C0 (tab, newline and ESC among them), DEL and C1 move the cursor or start escape
# sequences; U+2028/U+2029 break lines in some terminals; the bidi embeddings,
# overrides and isolates reorder what is shown ("Trojan Source"); lone surrogates
# (undecodable bytes in argv) would make printing fail. The bidi marks (U+200E, U+200F,
# U+061C) stay: they only nudge neutral characters and are common in right-to-left text.
_ESCAPED = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    *range(0x2028, 0x202F),
    *range(0x2066, 0x206A),
    *range(0xD800, 0xE000),
]
_ONE_LINE = {code: repr(chr(code))[1:-1] for code in _ESCAPED}
_MULTILINE = {code: text for code, text in _ONE_LINE.items() if chr(code) not in "\n\t"}


def printable(text: str, *, multiline: bool = False) -> str:
    """``text`` made safe to print: stored and user-supplied text never drives the terminal.

    Each control character is shown as its Python escape (``\\n``, ``\\x1b``,
    ``\\u202e``), so a value can neither forge an output line nor send an escape
    sequence, and what was escaped stays visible. Backslashes are left as they are:
    the escapes are for reading, not for parsing back, and applying this twice (to a
    message that already holds a ``repr``) changes nothing.

    ``multiline`` is for a message body, which is lines of text: line breaks (CRLF
    becomes LF) and tabs stay; a lone CR, which could overwrite the line, does not.
    """
    if multiline:
        return text.replace("\r\n", "\n").translate(_MULTILINE)
    return text.translate(_ONE_LINE)


class CommandError(Exception):
    """A command failed for a reason the user can act on; printed without a traceback."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse echoes unrecognised arguments; they reach the terminal escaped."""

    def error(self, message: str) -> NoReturn:
        super().error(printable(message))


def _global_options() -> _Parser:
    """Options every command takes, before or after its name: ``relate-smtp users add X
    --config F`` as well as ``relate-smtp --config F users add X``. Suppressed defaults,
    so a position that does not give one leaves the other's value alone. Overrides
    (``--Smtp:Port=2587``) and ``--environment`` are taken out of argv before parsing
    (``split_overrides``), so they work anywhere already."""
    options = _Parser(add_help=False)
    options.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="appsettings.json to read"
    )
    return options


def _parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = _Parser(
        prog="relate-smtp",
        description="SMTP host of the Relate mail platform.",
        epilog="Configuration overrides use ASP.NET syntax: --Smtp:Port=2587",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the SMTP server")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the listeners (default 1: serve in this process)",
    )
    serve.add_argument(
        "--dev-tls",
        action="store_true",
        help="use an ephemeral self-signed certificate (development only)",
    )

    db = commands.add_parser("db", parents=[common], help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("init", parents=[common], help="create the Relate tables when absent")

    users = commands.add_parser("users", parents=[common], help="manage users")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", parents=[common], help="create a user")
    add.add_argument("email")
    add.add_argument("--name", help="display name")
    add.add_argument(
        "--alias", action="append", default=[], metavar="ADDRESS", help="verified extra address"
    )

    keys = commands.add_parser("keys", parents=[common], help="manage SMTP API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser(
        "create", parents=[common], help="create a key; prints the raw key once"
    )
    create.add_argument("email")
    create.add_argument("--name", default="smtp", help="key name")
    create.add_argument(
        "--scope", action="append", default=None, metavar="SCOPE", help="scope (default: smtp)"
    )
    listing = keys_commands.add_parser("list", parents=[common], help="list a user's keys")
    listing.add_argument("email")
    revoke = keys_commands.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("key_id")

    mail = commands.add_parser("mail", parents=[common], help="read stored mail")
    mail_commands = mail.add_subparsers(dest="mail_command", required=True)
    mail_list = mail_commands.add_parser("list", parents=[common], help="most recent messages")
    mail_list.add_argument("--limit", type=int, default=20)
    show = mail_commands.add_parser(
        "show", parents=[common], help="one message with recipients and attachments"
    )
    show.add_argument("id")
    return parser


def configure_logging(log_level: LogLevel) -> None:
    level = log_level.logging_level
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level <= logging.CRITICAL:
        # The start-up lines (SPEC §1) are parsed by scripts: keep them at any level
        # short of "None".
        logging.getLogger("relate_smtp.lifecycle").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, own = split_overrides(args_list)
        args = _parser().parse_args(own)
        config_file = getattr(args, "config", None)
        settings = load_settings(config_file=config_file, overrides=overrides)
        configure_logging(settings.log_level)
        return _dispatch(args, settings, args_list)
    except ConfigError as exc:
        print(f"relate-smtp: configuration error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except CommandError as exc:
        print(f"relate-smtp: {printable(str(exc))}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace, settings: Settings, argv: Sequence[str]) -> int:
    from relate_smtp.runtime.run import run_server
    from relate_smtp.runtime.supervisor import LISTEN_FDS_ENV, decode_fds, run_supervisor

    _raise_open_file_limit()
    inherited = os.environ.pop(LISTEN_FDS_ENV, None)
    if inherited is not None:
        return run_server(settings, dev_tls=args.dev_tls, sockets=decode_fds(inherited))
    if args.workers < 1:
        raise CommandError("--workers must be at least 1", EXIT_CONFIG)
    if args.workers > 1:
        return run_supervisor(settings, workers=args.workers, argv=argv, dev_tls=args.dev_tls)
    return run_server(settings, dev_tls=args.dev_tls)


def _dispatch(args: argparse.Namespace, settings: Settings, argv: Sequence[str]) -> int:
    from relate_smtp import admin

    match args.command:
        case "serve":
            return _serve(args, settings, argv)
        case "db":
            return _run(admin.db_init, settings)
        case "users":
            return _run(lambda s: admin.users_add(s, args.email, args.name, args.alias), settings)
        case "keys":
            match args.keys_command:
                case "create":
                    scopes = args.scope or ["smtp"]
                    return _run(
                        lambda s: admin.keys_create(s, args.email, args.name, scopes), settings
                    )
                case "list":
                    return _run(lambda s: admin.keys_list(s, args.email), settings)
                case _:
                    return _run(lambda s: admin.keys_revoke(s, _uuid(args.key_id)), settings)
        case "mail":
            if args.mail_command == "list":
                return _run(lambda s: admin.mail_list(s, args.limit), settings)
            return _run(lambda s: admin.mail_show(s, _uuid(args.id)), settings)
    _unreachable(args.command)


def _run(command: Callable[[Settings], Awaitable[None]], settings: Settings) -> int:
    from relate_smtp.app import find_exception

    try:
        trio.run(command, settings)
    except BaseException as exc:
        problem = find_exception(exc, admin_errors())
        if problem is None:
            raise
        print(f"relate-smtp: {printable(str(problem))}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def admin_errors() -> tuple[type[Exception], ...]:
    from relate_smtp.admin import AdminError
    from relate_smtp.storage import StoreError

    # What a command reports on purpose (a taken address is AddressTaken, a value too
    # long TooLong, ...); anything else is a bug and keeps its traceback.
    return (AdminError, StoreError)


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"{text!r} is not an id (expected a UUID)") from None


def _raise_open_file_limit() -> None:
    """Many concurrent sessions need many descriptors: take the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit: %s", exc)


def _unreachable(value: object) -> NoReturn:
    raise CommandError(f"unknown command {value!r}")


__all__ = ["main", "printable"]
