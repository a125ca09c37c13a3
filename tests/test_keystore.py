"""Device keystores: the key is made on the device, signs there, never leaves
it (sim: export refused; linux: encrypted at rest, decrypted only into the
TLS context), and a certificate issued from its CSR connects over mTLS."""

import asyncio
import hashlib
import os
import ssl
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives import hashes

from agent import p256
from board.keystore import FileKeystore, KeyExportRefused, MemoryKeystore
from cloud.ca import CA
from cloud.errors import CAError


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    return MemoryKeystore() if request.param == "memory" else FileKeystore(tmp_path / "keys")


def test_signatures_verify_with_the_public_key_only(store):
    pub = store.generate("identity")
    digest = hashlib.sha256(b"challenge").digest()
    sig = store.sign("identity", digest)
    assert p256.verify(pub, digest, sig)                      # the portable verifier
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
    key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
               digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # and cryptography
    assert not p256.verify(pub, hashlib.sha256(b"other").digest(), sig)


def test_every_device_makes_its_own_key(store):
    assert store.generate("a") != store.generate("b")


def test_private_key_export_is_refused(store):
    store.generate("identity")
    with pytest.raises(KeyExportRefused):
        store.export("identity")


def test_file_keystore_is_encrypted_at_rest_and_private(tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    ks.generate("identity")
    path, _ = ks.tls_key("identity")
    pem = open(path, "rb").read()
    assert b"ENCRYPTED PRIVATE KEY" in pem and b"BEGIN PRIVATE KEY" not in pem
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ks.kek_path).st_mode) == 0o600
    assert FileKeystore.capabilities["encrypted_at_rest"] and not FileKeystore.capabilities["hardware_backed"]
    assert MemoryKeystore.capabilities["non_exportable"]


def test_the_csr_proves_possession_and_the_cloud_picks_the_identity(store, tmp_path):
    ca = CA.create(str(tmp_path / "ca"))
    store.generate("identity")
    csr = store.csr("identity", "anything-the-device-claims")
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(ca.issue_from_csr(csr, "acme", "dev-1"))
    assert cert.subject.rfc4514_string() == "CN=acme/dev-1"
    tampered = csr.replace(csr[100:104], b"AAAA")
    with pytest.raises(CAError):
        ca.issue_from_csr(tampered, "acme", "dev-1")


async def test_device_made_key_connects_over_mtls_without_leaving_the_device(tmp_path):
    from cloud.service import Cloud
    from cloud.ca import write_public
    from agent import mqtt
    cloud = Cloud(tmp_path / "cloud")
    await cloud.start()
    try:
        ks = FileKeystore(tmp_path / "device-keys")
        ks.generate("identity")
        cert_path = tmp_path / "device.crt"
        write_public(str(cert_path), cloud.ca.issue_from_csr(ks.csr("identity", "x"), "acme", "dev-7"))
        keyfile, password = ks.tls_key("identity")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cloud.ca_path)
        ctx.load_cert_chain(str(cert_path), keyfile, password=password)  # decrypted only in here
        reader, writer = await asyncio.open_connection(cloud.host, cloud.port, ssl=ctx, server_hostname="localhost")
        writer.write(mqtt.connect("acme/dev-7", 30))
        await writer.drain()
        assert mqtt.Parser().feed(await asyncio.wait_for(reader.readexactly(4), 5))[0].return_code == 0
        writer.close()
    finally:
        await cloud.stop()
