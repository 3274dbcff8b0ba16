"""The certificate store: loading from the settings, reload, and watching the files."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import hashes

from relate_smtp.config import SmtpSettings
from relate_smtp.runtime.tls import CertificateError, CertificateStore, generate_dev_certificate
from relate_smtp.runtime.tls import reload as tls_reload
from tests.runtime.tls.helpers import (
    UTC,
    Leaf,
    handshake,
    issue,
    replace_file,
    write_pem,
    write_pfx,
)


def test_from_settings_without_certificate_is_none() -> None:
    assert CertificateStore.from_settings(SmtpSettings()) is None


def test_from_settings_loads_the_configured_files(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(leaf.key_pem())
    settings = SmtpSettings(certificate_path=str(cert_path), certificate_key_path=str(key_path))

    store = CertificateStore.from_settings(settings)

    assert store is not None
    assert store.info.serial_number == leaf.cert.serial_number
    assert store.path == str(cert_path)


def test_from_settings_surfaces_a_bad_password(tmp_path: Path, leaf: Leaf) -> None:
    path = write_pfx(tmp_path / "cert.pfx", leaf, b"right")
    settings = SmtpSettings(certificate_path=str(path), certificate_password="wrong")

    with pytest.raises(CertificateError, match="wrong password"):
        CertificateStore.from_settings(settings)


def test_open_warns_about_an_expired_certificate(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(UTC)
    expired = issue(
        ca,
        not_before=now - datetime.timedelta(days=90),
        not_after=now - datetime.timedelta(days=1),
    )
    caplog.set_level(logging.WARNING, logger="relate_smtp.tls")

    store = CertificateStore.from_files(str(write_pem(tmp_path / "c.pem", expired)))

    assert store.status(now).status == "Unhealthy"
    assert any("expired" in r.getMessage() for r in caplog.records)


async def test_reload_serves_the_new_certificate_to_new_handshakes(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pem(tmp_path / "cert.pem", leaf)
    store = CertificateStore.from_files(str(path))
    old_context = store.context
    renewed = issue(ca)
    replace_file(path, renewed.chain_pem() + renewed.key_pem())
    caplog.set_level(logging.INFO, logger="relate_smtp.tls")

    assert store.reload() is True

    assert store.generation == 1
    assert store.context is not old_context
    assert store.info.serial_number == renewed.cert.serial_number
    peer = await handshake(store.context, ca.cert_pem.bytes())
    assert peer.serial_number == renewed.cert.serial_number
    # A session that wrapped its stream before the reload keeps the old certificate.
    assert (await handshake(old_context, ca.cert_pem.bytes())).serial_number == (
        leaf.cert.serial_number
    )
    assert any(r.levelno == logging.INFO and "Reloaded" in r.getMessage() for r in caplog.records)


async def test_reload_of_a_bad_file_keeps_the_old_certificate(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pem(tmp_path / "cert.pem", leaf)
    store = CertificateStore.from_files(str(path))
    old_context = store.context
    replace_file(path, b"garbage")

    assert store.reload() is False

    assert store.context is old_context
    assert store.generation == 0
    assert store.last_error is not None and "not a PEM, DER or PKCS#12" in store.last_error
    errors = [
        r for r in caplog.records if r.name == "relate_smtp.tls" and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert leaf.cert.fingerprint(hashes.SHA1()).hex().upper() in errors[0].getMessage()
    peer = await handshake(store.context, ca.cert_pem.bytes())
    assert peer.serial_number == leaf.cert.serial_number
    assert store.status(datetime.datetime.now(UTC)).status == "Unhealthy"

    # Fixing the file clears the error.
    write_pem(path, leaf)
    assert store.reload() is True
    assert store.last_error is None
    assert store.status(datetime.datetime.now(UTC)).status == "Healthy"


def test_dev_store_does_not_reload() -> None:
    store = CertificateStore.from_loaded(generate_dev_certificate("localhost"))

    assert store.reload() is False
    assert store.path is None
    assert store.generation == 0


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the store has no event to wait on) and fail rather than hang."""
    with trio.fail_after(10):
        while True:
            if condition():
                return
            await trio.sleep(0.005)


async def test_watch_reloads_when_the_file_changes(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf
) -> None:
    path = write_pem(tmp_path / "cert.pem", leaf)
    store = CertificateStore.from_files(str(path))
    renewed = issue(ca)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: store.watch(interval=0.01))
        replace_file(path, renewed.chain_pem() + renewed.key_pem())
        await wait_until(lambda: store.generation == 1)
        nursery.cancel_scope.cancel()

    assert store.info.serial_number == renewed.cert.serial_number


async def test_watch_reloads_when_the_key_file_changes(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf
) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(leaf.key_pem())
    store = CertificateStore.from_files(str(cert_path), key_path=str(key_path))
    renewed = issue(ca)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: store.watch(interval=0.01))
        # Certificate first, key later: the mismatched pair in between must not be the
        # end state.
        replace_file(cert_path, renewed.cert_pem())
        replace_file(key_path, renewed.key_pem())
        await wait_until(lambda: store.info.serial_number == renewed.cert.serial_number)
        nursery.cancel_scope.cancel()


async def test_watch_does_not_retry_a_broken_file_until_it_changes(
    tmp_path: Path,
    ca: trustme.CA,
    leaf: Leaf,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_pem(tmp_path / "cert.pem", leaf)
    store = CertificateStore.from_files(str(path))
    polls = 0
    real_fingerprint = tls_reload._fingerprint

    def counting_fingerprint(paths: tuple[str, ...]) -> tls_reload._Fingerprint:
        nonlocal polls
        polls += 1
        return real_fingerprint(paths)

    monkeypatch.setattr(tls_reload, "_fingerprint", counting_fingerprint)

    def errors() -> int:
        return sum(1 for r in caplog.records if r.levelno == logging.ERROR)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: store.watch(interval=0.01))
        replace_file(path, b"garbage")
        await wait_until(lambda: store.last_error is not None)
        seen = polls
        await wait_until(lambda: polls >= seen + 5)
        assert errors() == 1
        assert store.info.serial_number == leaf.cert.serial_number

        renewed = issue(ca)
        replace_file(path, renewed.chain_pem() + renewed.key_pem())
        await wait_until(lambda: store.generation == 1)
        nursery.cancel_scope.cancel()

    assert store.last_error is None
    assert errors() == 1


async def test_watch_returns_for_a_store_without_files() -> None:
    store = CertificateStore.from_loaded(generate_dev_certificate("localhost"))

    with trio.fail_after(1):
        await store.watch(interval=0.01)
