"""Certificate loading, TLS contexts, reload and the certificate health check."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from relate_smtp.config import SmtpSettings
from relate_smtp.runtime.tls import (
    HTTPS_COMPATIBLE,
    CertificateError,
    CertificateInfo,
    CertificateStore,
    LoadedCertificate,
    certificate_status,
    generate_dev_certificate,
    load_certificate,
    server_context,
    wrap_server,
)
from relate_smtp.runtime.tls import reload as tls_reload

HOST = "mail.example.test"
UTC = datetime.UTC


# --------------------------------------------------------------------------- helpers


@attrs.frozen
class Leaf:
    """A certificate issued by a test CA, as cryptography objects."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: tuple[x509.Certificate, ...]

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.intermediates)
        )


def issue(
    ca: trustme.CA,
    name: str = HOST,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Leaf:
    leaf = ca.issue_cert(name, not_before=not_before, not_after=not_after)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    certs = [x509.load_pem_x509_certificate(blob.bytes()) for blob in leaf.cert_chain_pems]
    return Leaf(cert=certs[0], key=key, intermediates=tuple(certs[1:]))


def write_pfx(path: Path, leaf: Leaf, password: bytes | None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"friendly", leaf.key, leaf.cert, list(leaf.intermediates) or None, encryption
        )
    )
    return path


def write_pem(path: Path, leaf: Leaf) -> Path:
    path.write_bytes(leaf.chain_pem() + leaf.key_pem())
    return path


def replace_file(path: Path, content: bytes) -> None:
    """Swap in new content atomically, as deployment tools do (new inode)."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(content)
    os.replace(staging, path)


def pem_count(chain_pem: bytes) -> int:
    return chain_pem.count(b"-----BEGIN CERTIFICATE-----")


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        data += chunk
    return data


async def handshake(
    server_ctx: ssl.SSLContext, trusted_pem: bytes, hostname: str = HOST
) -> x509.Certificate:
    """Run a verified in-memory handshake, exchange a line each way, return the peer cert."""
    client_ctx = ssl.create_default_context(cadata=trusted_pem.decode())
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = wrap_server(server_transport, server_ctx)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=hostname)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        await client.send_all(b"EHLO client.example\r\n")
        assert await receive_exactly(server, 21) == b"EHLO client.example\r\n"
        await server.send_all(b"250 ok\r\n")
        assert await receive_exactly(client, 8) == b"250 ok\r\n"
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def leaf(ca: trustme.CA) -> Leaf:
    return issue(ca)


# --------------------------------------------------------------------------- loading


def test_pfx_with_password_loads(tmp_path: Path, leaf: Leaf) -> None:
    path = write_pfx(tmp_path / "cert.pfx", leaf, b"s3cret")

    loaded = load_certificate(str(path), password="s3cret")

    assert loaded.info.serial_number == leaf.cert.serial_number
    assert loaded.info.subject == leaf.cert.subject.rfc4514_string()
    assert b"PRIVATE KEY" in loaded.key_pem


def test_pfx_wrong_password_says_so(tmp_path: Path, leaf: Leaf) -> None:
    path = write_pfx(tmp_path / "cert.pfx", leaf, b"s3cret")

    with pytest.raises(CertificateError, match="wrong password") as excinfo:
        load_certificate(str(path), password="nope")
    assert str(path) in str(excinfo.value)


def test_pfx_missing_password_says_one_is_needed(tmp_path: Path, leaf: Leaf) -> None:
    path = write_pfx(tmp_path / "cert.pfx", leaf, b"s3cret")

    with pytest.raises(CertificateError, match=r"needs a password.*Smtp:CertificatePassword"):
        load_certificate(str(path), password=None)


@pytest.mark.parametrize("password", [None, ""])
def test_pfx_without_password_loads(tmp_path: Path, leaf: Leaf, password: str | None) -> None:
    path = write_pfx(tmp_path / "cert.pfx", leaf, None)

    loaded = load_certificate(str(path), password=password)

    assert loaded.info.serial_number == leaf.cert.serial_number


def test_pfx_chain_is_ordered_leaf_first(tmp_path: Path) -> None:
    root = trustme.CA()
    leaf = issue(root.create_child_ca())
    path = write_pfx(tmp_path / "cert.pfx", leaf, b"pw")

    loaded = load_certificate(str(path), password="pw")

    chain = x509.load_pem_x509_certificates(loaded.chain_pem)
    assert [c.serial_number for c in chain] == [
        leaf.cert.serial_number,
        leaf.intermediates[0].serial_number,
    ]


def test_der_certificate_with_key_path_loads(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.cer"
    cert_path.write_bytes(leaf.cert.public_bytes(serialization.Encoding.DER))
    key_path = tmp_path / "cert.key"
    key_path.write_bytes(leaf.key_pem())

    loaded = load_certificate(str(cert_path), key_path=str(key_path))

    assert loaded.info.serial_number == leaf.cert.serial_number


def test_der_certificate_without_key_names_the_key_setting(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.cer"
    cert_path.write_bytes(leaf.cert.public_bytes(serialization.Encoding.DER))

    with pytest.raises(CertificateError, match=r"no private key.*Smtp:CertificateKeyPath"):
        load_certificate(str(cert_path))


def test_der_key_file_is_accepted(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())
    key_path = tmp_path / "cert.key.der"
    key_path.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    loaded = load_certificate(str(cert_path), key_path=str(key_path))

    assert loaded.info.serial_number == leaf.cert.serial_number


def test_pem_with_cert_and_key_in_one_file_loads(tmp_path: Path, leaf: Leaf) -> None:
    path = write_pem(tmp_path / "combined.pem", leaf)

    loaded = load_certificate(str(path))

    assert loaded.info.serial_number == leaf.cert.serial_number


def test_pem_key_before_certificate_loads(tmp_path: Path, leaf: Leaf) -> None:
    path = tmp_path / "combined.pem"
    path.write_bytes(leaf.key_pem() + leaf.cert_pem())

    assert load_certificate(str(path)).info.serial_number == leaf.cert.serial_number


def test_pem_cert_with_separate_key_file_loads(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(leaf.key_pem())

    loaded = load_certificate(str(cert_path), key_path=str(key_path))

    assert loaded.info.serial_number == leaf.cert.serial_number


def test_pem_cert_without_key_names_the_key_setting(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())

    with pytest.raises(CertificateError, match="Smtp:CertificateKeyPath"):
        load_certificate(str(cert_path))


@pytest.mark.parametrize("leaf_last", [False, True], ids=["leaf-first", "leaf-last"])
def test_pem_chain_is_served_leaf_first(tmp_path: Path, leaf_last: bool) -> None:
    root = trustme.CA()
    leaf = issue(root.create_child_ca())
    intermediate_pem = leaf.intermediates[0].public_bytes(serialization.Encoding.PEM)
    certs = intermediate_pem + leaf.cert_pem() if leaf_last else leaf.chain_pem()
    path = tmp_path / "fullchain.pem"
    path.write_bytes(certs + leaf.key_pem())

    loaded = load_certificate(str(path))

    chain = x509.load_pem_x509_certificates(loaded.chain_pem)
    assert [c.serial_number for c in chain] == [
        leaf.cert.serial_number,
        leaf.intermediates[0].serial_number,
    ]


async def test_pem_chain_lets_a_client_trusting_only_the_root_verify(tmp_path: Path) -> None:
    root = trustme.CA()
    leaf = issue(root.create_child_ca())
    path = write_pem(tmp_path / "fullchain.pem", leaf)

    peer = await handshake(server_context(load_certificate(str(path))), root.cert_pem.bytes())

    assert peer.serial_number == leaf.cert.serial_number


def test_encrypted_pem_key_opens_with_password(tmp_path: Path, leaf: Leaf) -> None:
    path = tmp_path / "combined.pem"
    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path.write_bytes(leaf.cert_pem() + encrypted)

    assert load_certificate(str(path), password="pw").info.serial_number == (
        leaf.cert.serial_number
    )
    with pytest.raises(CertificateError, match=r"encrypted.*Smtp:CertificatePassword"):
        load_certificate(str(path))
    with pytest.raises(CertificateError, match="wrong password"):
        load_certificate(str(path), password="other")


def test_garbage_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cert.pfx"
    path.write_bytes(os.urandom(512))

    with pytest.raises(CertificateError, match="not a PEM, DER or PKCS#12"):
        load_certificate(str(path))


def test_damaged_pem_certificate_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")

    with pytest.raises(CertificateError, match="damaged CERTIFICATE"):
        load_certificate(str(path))


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(b"")

    with pytest.raises(CertificateError, match="is empty"):
        load_certificate(str(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pfx"

    with pytest.raises(CertificateError, match="does not exist") as excinfo:
        load_certificate(str(path))
    assert str(path) in str(excinfo.value)


def test_missing_key_file_is_named(tmp_path: Path, leaf: Leaf) -> None:
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(leaf.cert_pem())

    with pytest.raises(CertificateError, match=r"key file.*absent.key.*does not exist"):
        load_certificate(str(cert_path), key_path=str(tmp_path / "absent.key"))


def test_key_not_matching_certificate_is_rejected(tmp_path: Path, ca: trustme.CA) -> None:
    leaf, other = issue(ca), issue(ca)
    path = tmp_path / "mixed.pem"
    path.write_bytes(leaf.cert_pem() + other.key_pem())

    with pytest.raises(CertificateError, match="does not match the certificate"):
        load_certificate(str(path))


def test_info_matches_dotnet_thumbprint_and_is_utc(tmp_path: Path, leaf: Leaf) -> None:
    loaded = load_certificate(str(write_pem(tmp_path / "c.pem", leaf)))

    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert loaded.info.thumbprint == hashlib.sha1(der).hexdigest().upper()
    assert loaded.info.not_before == leaf.cert.not_valid_before_utc
    assert loaded.info.not_after == leaf.cert.not_valid_after_utc
    assert loaded.info.not_after.utcoffset() == datetime.timedelta(0)


def test_private_key_is_kept_out_of_repr(tmp_path: Path, leaf: Leaf) -> None:
    loaded = load_certificate(str(write_pem(tmp_path / "c.pem", leaf)))

    assert b"PRIVATE KEY" in loaded.key_pem
    assert "PRIVATE KEY" not in repr(loaded)


# --------------------------------------------------------------------------- contexts


def test_server_context_settings(tmp_path: Path, leaf: Leaf) -> None:
    ctx = server_context(load_certificate(str(write_pem(tmp_path / "c.pem", leaf))))

    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_leaves_no_files_behind(
    tmp_path: Path, leaf: Leaf, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_certificate(str(write_pem(tmp_path / "c.pem", leaf)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    server_context(loaded)

    assert list(scratch.iterdir()) == []


def test_server_context_rejects_what_openssl_refuses(leaf: Leaf) -> None:
    # Consistent for cryptography, but the chain is not PEM OpenSSL can read.
    broken = LoadedCertificate(
        chain_pem=b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        key_pem=leaf.key_pem(),
        info=CertificateInfo.from_x509(leaf.cert),
    )

    with pytest.raises(CertificateError, match="TLS library refused"):
        server_context(broken)


async def test_handshake_serves_the_certificate(tmp_path: Path, ca: trustme.CA, leaf: Leaf) -> None:
    ctx = server_context(
        load_certificate(str(write_pfx(tmp_path / "c.pfx", leaf, b"pw")), password="pw")
    )

    peer = await handshake(ctx, ca.cert_pem.bytes())

    assert peer.serial_number == leaf.cert.serial_number


async def test_missing_close_notify_reads_as_end_of_stream(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf
) -> None:
    assert HTTPS_COMPATIBLE
    ctx = server_context(load_certificate(str(write_pem(tmp_path / "c.pem", leaf))))
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = wrap_server(server_transport, ctx)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=HOST)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        await client_transport.aclose()  # TCP goes away, no TLS close_notify

        assert await server.receive_some() == b""


# --------------------------------------------------------------------------- reloading


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


# --------------------------------------------------------------------------- dev certificate


@pytest.mark.parametrize("server_hostname", ["mx.dev.test", "localhost", "127.0.0.1"])
async def test_dev_certificate_handshake(server_hostname: str) -> None:
    dev = generate_dev_certificate("mx.dev.test")

    peer = await handshake(server_context(dev), dev.chain_pem, hostname=server_hostname)

    assert peer.serial_number == dev.info.serial_number


def test_dev_certificate_is_short_lived_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = datetime.datetime.now(UTC)

    dev = generate_dev_certificate("mx.dev.test")
    CertificateStore.from_loaded(dev)

    assert "CN=mx.dev.test" in dev.info.subject
    lifetime = dev.info.not_after - before
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30, minutes=1)
    assert dev.info.not_before < before
    assert list(tmp_path.iterdir()) == []


def test_dev_certificate_accepts_a_long_hostname() -> None:
    name = ("a" * 60 + ".") * 3 + "test"

    dev = generate_dev_certificate(name)

    cert = x509.load_pem_x509_certificate(dev.chain_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert name in san.get_values_for_type(x509.DNSName)


# --------------------------------------------------------------------------- health


NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def info_expiring_in(days: float) -> CertificateInfo:
    return CertificateInfo(
        subject="CN=mail.example.test",
        issuer="CN=Test CA",
        serial_number=42,
        not_before=NOW - datetime.timedelta(days=60),
        not_after=NOW + datetime.timedelta(days=days),
        thumbprint="AB" * 20,
    )


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (60, "Healthy"),
        (30, "Healthy"),
        (29.9, "Degraded"),
        (20, "Degraded"),
        (7, "Degraded"),
        (6.9, "Unhealthy"),
        (5, "Unhealthy"),
        (-1, "Unhealthy"),
        (None, "Healthy"),
    ],
)
def test_certificate_status_thresholds(days: float | None, expected: str) -> None:
    info = None if days is None else info_expiring_in(days)

    assert certificate_status(info, NOW).status == expected


def test_certificate_status_data_for_the_health_json() -> None:
    result = certificate_status(info_expiring_in(20.5), NOW)

    assert result.data == {
        "subject": "CN=mail.example.test",
        "notBefore": "2025-04-02T12:00:00Z",
        "notAfter": "2025-06-22T00:00:00Z",
        "daysUntilExpiry": 20.5,
        "thumbprint": "AB" * 20,
    }
    assert "20 days" in result.description


def test_certificate_status_expired_says_so() -> None:
    result = certificate_status(info_expiring_in(-3), NOW)

    assert "expired" in result.description
    assert result.data is not None and result.data["daysUntilExpiry"] == -3.0


def test_certificate_status_none_configured_has_no_data() -> None:
    result = certificate_status(None, NOW)

    assert result.data is None
    assert result.description == "No certificate configured"


def test_certificate_status_not_yet_valid_is_unhealthy() -> None:
    info = attrs.evolve(info_expiring_in(90), not_before=NOW + datetime.timedelta(days=1))

    result = certificate_status(info, NOW)

    assert result.status == "Unhealthy"
    assert "not valid before" in result.description


@pytest.mark.parametrize("info", [None, info_expiring_in(90)], ids=["never-loaded", "serving"])
def test_certificate_status_unreadable_is_unhealthy(info: CertificateInfo | None) -> None:
    result = certificate_status(info, NOW, error="cert.pem does not exist")

    assert result.status == "Unhealthy"
    assert "cert.pem does not exist" in result.description
