"""cloud/ca.py: files, certificate contents, identity rules, speed."""

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from brokers import broker, broker_kind, device_factory, pki  # noqa: F401  (fixtures)
from cloud.ca import (
    CA, DEVICE_LEN_MAX, INGEST_IDENTITY, TENANT_LEN_MAX, identity_of, load_cert, make_identity,
    parse_identity,
)
from cloud.errors import CAError, CloudError, IdentityError


@pytest.fixture
def ca(tmp_path):
    return CA.create(str(tmp_path / "ca"), name="test CA")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


# -- files ----------------------------------------------------------------------

def test_create_then_load_gives_the_same_ca(ca):
    loaded = CA.load(ca.dirpath)
    assert loaded.cert == ca.cert
    assert mode(os.path.join(ca.dirpath, "ca.key")) == 0o600
    cert_pem, _ = loaded.issue_device("acme", "dev-1")
    load_cert(cert_pem).verify_directly_issued_by(ca.cert)


def test_create_refuses_to_overwrite(ca):
    with pytest.raises(CAError) as err:
        CA.create(ca.dirpath)
    assert err.value.code == "ca_exists"


def test_load_refuses_missing_or_exposed_key(ca, tmp_path):
    with pytest.raises(CAError) as err:
        CA.load(str(tmp_path / "nowhere"))
    assert err.value.code == "ca_missing"
    os.chmod(os.path.join(ca.dirpath, "ca.key"), 0o644)
    with pytest.raises(CAError) as err:
        CA.load(ca.dirpath)
    assert err.value.code == "ca_key_exposed"


def test_ca_certificate(ca):
    cert = ca.cert
    assert ext(cert, x509.BasicConstraints).value.ca is True
    assert ext(cert, x509.BasicConstraints).critical
    assert ext(cert, x509.KeyUsage).value.key_cert_sign
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)


# -- issued certificates -------------------------------------------------------------

def test_device_certificate(ca):
    cert_pem, key_pem = ca.issue_device("acme", "dev-1", days=30)
    cert = load_cert(cert_pem)
    assert identity_of(cert) == "acme/dev-1"
    cert.verify_directly_issued_by(ca.cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert ext(cert, x509.KeyUsage).value.digital_signature
    assert not ext(cert, x509.KeyUsage).value.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest != ca_ski
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, hours=1)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_serial_numbers_are_random_and_distinct(ca):
    serials = {load_cert(ca.issue_device("acme", "d%d" % i)[0]).serial_number for i in range(50)}
    assert len(serials) == 50
    assert all(s.bit_length() > 100 for s in serials)


def test_issue_with_a_clock_in_the_past_gives_an_expired_certificate(ca):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = load_cert(ca.issue_device("acme", "dev-1", days=1, now=past)[0])
    assert cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc)


def test_server_certificate(ca, tmp_path):
    cert_path, key_path = ca.issue_server(str(tmp_path / "srv"), hosts=("broker.example",))
    assert mode(key_path) == 0o600
    with open(cert_path, "rb") as f:
        cert = load_cert(f.read())
    san = ext(cert, x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"broker.example", "localhost"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert identity_of(cert) == "broker.example"


def test_cloud_client_certificate(ca):
    cert = load_cert(ca.issue_client(INGEST_IDENTITY)[0])
    assert identity_of(cert) == "$cloud/ingest"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("cn", ["acme/dev-1", "$cloud/", "$cloud/a/b", "$cloud/in gest", "cloud/ingest"])
def test_cloud_client_cn_must_be_cloud_name(ca, cn):
    with pytest.raises(IdentityError):
        ca.issue_client(cn)


def test_every_device_gets_its_own_key(ca):
    # Speed is a benchmark (benchmarks/), not a timed assertion here.
    keys = set()
    for i in range(200):
        _, key_pem = ca.issue_device("acme", "dev-%d" % i)
        keys.add(key_pem)
    assert len(keys) == 200


# -- identity rules --------------------------------------------------------------------

LONGEST = ("t" * TENANT_LEN_MAX, "d" * DEVICE_LEN_MAX)


@pytest.mark.parametrize("tenant,device", [
    ("acme", "dev-1"), ("A_b-9", "x"), ("t", "d"), LONGEST,
])
def test_valid_ids(ca, tenant, device):
    identity = make_identity(tenant, device)
    assert parse_identity(identity) == (tenant, device)
    assert identity_of(ca.issue_device(tenant, device)[0]) == identity


@pytest.mark.parametrize("tenant,device", [
    ("", "dev"), ("acme", ""), ("t" * (TENANT_LEN_MAX + 1), "dev"), ("acme", "d" * (DEVICE_LEN_MAX + 1)),
    ("ac/me", "dev"), ("acme", "dev/1"), ("acme", "dev+"), ("acme", "#"), ("acme", "dev 1"),
    ("acme", "dev.1"), ("acmé", "dev"), ("acme", "dev\n"), ("$cloud", "ingest"), (None, "dev"),
])
def test_invalid_ids_are_refused(ca, tenant, device):
    with pytest.raises(IdentityError) as err:
        ca.issue_device(tenant, device)
    assert err.value.code == "bad_identity"
    assert isinstance(err.value, CloudError)


@pytest.mark.parametrize("identity", ["acme", "acme/dev/1", "/dev", "acme/", "$cloud/ingest", "", None])
def test_parse_identity_refuses(identity):
    with pytest.raises(IdentityError):
        parse_identity(identity)


def test_identity_of_accepts_pem_der_and_certificate(ca):
    from cryptography.hazmat.primitives.serialization import Encoding
    pem = ca.issue_device("acme", "dev-1")[0]
    cert = load_cert(pem)
    assert identity_of(pem) == identity_of(cert.public_bytes(Encoding.DER)) == identity_of(cert) == "acme/dev-1"


def test_identity_of_garbage_is_a_ca_error():
    with pytest.raises(CAError):
        identity_of(b"not a certificate")


# -- against both brokers ------------------------------------------------------------

async def test_longest_identity_works_on_both_brokers(broker, device_factory):
    """A 97-char CN is over X.509's 64-char advice; both brokers must still take it."""
    identity = make_identity(*LONGEST)
    dev = device_factory(identity)
    assert await dev.connect() == 0
    assert await dev.publish("t/%s/telemetry" % identity, b"x")
    assert await broker.wait_received(1)
    assert broker.received == [(identity, "t/%s/telemetry" % identity, b"x")]
