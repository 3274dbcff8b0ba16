"""Certificate loading: PFX, DER and PEM files, keys, chains, and what is refused."""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relate_smtp.runtime.tls import CertificateError, load_certificate, server_context
from tests.runtime.tls.helpers import Leaf, handshake, issue, write_pem, write_pfx


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
