"""Firmware release tooling (CPython): keys, manifests, key sets, bundles.

The formats are agent/manifest.py's; this side makes them and signs with
`cryptography` (ECDSA P-256, deterministic RFC 6979 nonces, so the same
inputs give the same bytes, signatures included). `verify_bundle` checks a
bundle with the device's own code (agent.manifest, agent.cose, agent.p256),
so what the tool accepts is what a device accepts.

Key files: private keys are PKCS#8 PEM, unencrypted, mode 0600; public keys
are SubjectPublicKeyInfo PEM. A key's kid is agent.manifest.fingerprint of
its 65-byte uncompressed point.
"""

import hashlib
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent import cbor, cose
from agent import manifest as mf
from agent.errors import RemoteError
from cloud.errors import CloudError


class FirmwareError(CloudError):
    """A tool input is missing, unreadable or inconsistent (not a device refusal)."""
    code = "firmware"


# ---------------------------------------------------------------- keys

def generate_key():
    return ec.generate_private_key(ec.SECP256R1())


def public_bytes(key):
    """65-byte uncompressed point of a private or public key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def kid_of(key):
    return mf.fingerprint(public_bytes(key))


def write_keypair(out_dir, name, key=None):
    """Write NAME.key (0600) and NAME.pub into out_dir; return (key path, pub path, kid)."""
    key = key or generate_key()
    os.makedirs(out_dir, exist_ok=True)
    key_path = os.path.join(out_dir, name + ".key")
    pub_path = os.path.join(out_dir, name + ".pub")
    for path in (key_path, pub_path):
        if os.path.exists(path):
            raise FirmwareError("%s exists; refusing to overwrite a key" % path)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    with open(pub_path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path, kid_of(key)


def load_private_key(path):
    data = read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise FirmwareError("%s is not an unencrypted PEM private key: %s" % (path, e)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise FirmwareError("%s is not a P-256 key" % path)
    return key


def load_public_key(path):
    """65 bytes from a PEM public key or a raw 65-byte point. A private key
    is refused: where a public key belongs, a private one must not travel."""
    data = read_file(path, "public key")
    if len(data) == 65 and data[0] == 4:
        return data
    if b"PRIVATE KEY" in data:
        stem, ext = os.path.splitext(path)
        hint = stem + ".pub" if ext == ".key" else "the .pub file `tether fw keygen` wrote beside it"
        raise FirmwareError("%s is a private key; give the public key (%s) instead: a private key "
                            "stays with its owner and is never handed to another tool" % (path, hint))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise FirmwareError("%s is not a PEM public key: %s" % (path, e)) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise FirmwareError("%s is not a P-256 key" % path)
    return public_bytes(key)


def read_file(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FirmwareError("cannot read %s %s: %s" % (what, path, e.strerror)) from None


def write_file(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- signing

def sign1(payload, key, external_aad):
    """Tagged COSE_Sign1, ES256, kid in the protected header, deterministic nonce."""
    protected = cbor.dumps({cose.LABEL_ALG: cose.ALG_ES256, cose.LABEL_KID: kid_of(key)})
    to_be_signed = cbor.dumps([cose.CONTEXT, protected, external_aad, payload])
    der = key.sign(to_be_signed, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return b"\xd2" + cbor.dumps([protected, {}, payload, r.to_bytes(32, "big") + s.to_bytes(32, "big")])


def make_keyset(root_key, release_public_keys, version, revoked_kids=()):
    """A key set (COSE_Sign1 by root_key) listing release_public_keys (65 bytes each)."""
    keys = sorted((mf.fingerprint(pub), pub) for pub in release_public_keys)
    revoked = sorted(set(revoked_kids))
    payload = cbor.dumps({"v": mf.FORMAT_VERSION, "ver": version,
                          "keys": [[kid, pub] for kid, pub in keys], "revoked": revoked})
    try:
        mf.parse_keyset(payload)
    except mf.ManifestError as e:
        raise FirmwareError("key set: %s" % e.message) from None
    return sign1(payload, root_key, mf.AAD_KEYSET)


def read_keyset(keyset_message):
    """The KeySet inside a key set message, signature NOT checked."""
    try:
        payload = cose.decode1(keyset_message)[3]
        return mf.parse_keyset(payload)
    except RemoteError as e:
        raise FirmwareError("not a key set: %s" % e.message) from None


def chunk_table(payload):
    """The chunk hashes of payload end to end: page p of a paged manifest
    is its slice [p * mf.PAGE_BYTES, (p + 1) * mf.PAGE_BYTES)."""
    view = memoryview(payload)
    return b"".join(hashlib.sha256(view[i:i + mf.CHUNK_BYTES]).digest()
                    for i in range(0, len(payload), mf.CHUNK_BYTES))


def check_payload(manifest, payload):
    """What a device checks of a payload, here held whole (the tool, the
    cloud's release check): every chunk, or every page of a paged
    manifest, and the SHA-256 of the whole. ManifestError with the
    device's reason."""
    verifier = mf.ChunkVerifier(manifest, whole=True)
    for index in range(mf.chunk_count(len(payload))):
        verifier.update(index, payload[index * mf.CHUNK_BYTES:(index + 1) * mf.CHUNK_BYTES])
    verifier.finish()


def build_manifest(payload, hw_class, version, security_version, expires_s, rollout_id, pages=None):
    """Deterministic manifest bytes for payload; FirmwareError on a bad field.
    pages: list page hashes instead of chunk hashes. None (the default):
    pages when the chunk hashes are more than one page (over 512 KiB of
    payload): the device then holds one 4 KiB page of them at a time instead
    of the whole list (1 MiB: 8 KiB of hashes in its heap and in every
    write of its download cursor), and images past 1.75 MiB need it."""
    _check_build_inputs(payload, hw_class, version, rollout_id, pages)
    table = chunk_table(payload)
    if pages is None:
        pages = len(table) > mf.PAGE_BYTES
    page_hashes = None
    if pages:
        page_hashes = b"".join(hashlib.sha256(table[i:i + mf.PAGE_BYTES]).digest()
                               for i in range(0, len(table), mf.PAGE_BYTES))
        table = None
    manifest = mf.Manifest(hw_class, version, security_version, len(payload),
                           hashlib.sha256(payload).digest(), table, expires_s, rollout_id, page_hashes)
    try:
        data = manifest.encode()
        mf.parse(data)          # the device's checks, so a bad field fails here
    except RemoteError as e:
        raise FirmwareError("manifest: %s" % e.message) from None
    return data


def _check_build_inputs(payload, hw_class, version, rollout_id, pages):
    """The manifest checks that agent.manifest words for a device, worded for
    the person running the tool (FirmwareError); mf.parse still has the last word."""
    if not payload:
        raise FirmwareError("the payload is empty (0 bytes): there is nothing to sign")
    size_max = mf.INLINE_SIZE_MAX if pages is False else mf.SIZE_MAX
    if len(payload) > size_max:
        raise FirmwareError("the payload is %d bytes, over the %s limit of %d bytes (%s)"
                            % (len(payload), "chunks form's" if pages is False else "manifest's", size_max,
                               "1.75 MiB; the paged form takes up to 224 MiB" if pages is False
                               else "224 MiB"))
    for what, value, chars_max, allowed, shown in (
            ("hardware class", hw_class, mf.HW_CLASS_CHARS_MAX, mf._NAME_CHARS, "A-Z a-z 0-9 . _ -"),
            ("version", version, mf.VERSION_CHARS_MAX, mf._VERSION_CHARS, "A-Z a-z 0-9 . _ - +"),
            ("rollout id", rollout_id, mf.ROLLOUT_CHARS_MAX, mf._NAME_CHARS, "A-Z a-z 0-9 . _ -")):
        if not isinstance(value, str) or not 1 <= len(value) <= chars_max:
            raise FirmwareError("%s %r must be 1..%d characters" % (what, value, chars_max))
        bad = sorted(set(c for c in value if c not in allowed))
        if bad:
            raise FirmwareError("%s %r has %s; allowed: %s" % (
                what, value, ", ".join(repr(c) for c in bad), shown))


def sign_bundle(manifest_bytes, keys, keyset_message):
    """A bundle: the key set plus one COSE_Sign1 per key, in kid order."""
    try:
        mf.parse(manifest_bytes)
    except RemoteError as e:
        raise FirmwareError("manifest: %s" % e.message) from None
    keyset = read_keyset(keyset_message)
    kids = [kid_of(key) for key in keys]
    if len(set(kids)) != len(kids):
        raise FirmwareError("the same key is given twice")
    if not 1 <= len(keys) <= mf.SIGNERS_MAX:
        raise FirmwareError("give 1..%d release keys" % mf.SIGNERS_MAX)
    for kid in kids:
        if kid not in keyset.keys:
            raise FirmwareError("key %s is not in key set %d" % (kid.hex(), keyset.version))
    envelopes = [sign1(manifest_bytes, key, mf.AAD_MANIFEST)
                 for _, key in sorted(zip(kids, keys), key=lambda pair: pair[0])]
    return cbor.dumps({"v": mf.FORMAT_VERSION, "keyset": keyset_message, "sigs": envelopes})


# ---------------------------------------------------------------- verifying, inspecting

def verify_bundle(bundle, payload_path, root_public_key, k, hw_class, security_version,
                  now_s, keyset_version_seen=0):
    """What a device would do: the Manifest, or ManifestError/CBORError with the reason."""
    manifest = mf.verify_release(bundle, root_public_key, k, keyset_version_seen)
    mf.check(manifest, hw_class, security_version, now_s)
    payload = read_file(payload_path, "payload")
    check_payload(manifest, payload)
    return manifest



def describe(bundle):
    """A dict describing a bundle, a manifest or a key set message. Nothing is verified."""
    if bundle[:1] == b"\xd2":
        keyset = read_keyset(bundle)
        return {"kind": "keyset", "keyset": _keyset_dict(keyset, bundle)}
    fields = cbor.loads(bundle)
    if isinstance(fields, dict) and "sigs" in fields:
        return _describe_bundle(bundle)
    return {"kind": "manifest", "manifest": _manifest_dict(bundle)}


def _describe_bundle(bundle):
    keyset_message, envelopes = mf.decode_bundle(bundle)
    keyset = read_keyset(keyset_message)
    signers, manifest_bytes = [], None
    for message in envelopes:
        _, protected, unprotected, payload, _ = cose.decode1(message)
        kid = protected.get(cose.LABEL_KID, unprotected.get(cose.LABEL_KID))
        signers.append(kid.hex() if isinstance(kid, bytes) else repr(kid))
        manifest_bytes = manifest_bytes or payload
    return {"kind": "bundle", "verified": False, "bytes": len(bundle),
            "keyset": _keyset_dict(keyset, keyset_message), "signers": signers,
            "manifest": _manifest_dict(manifest_bytes)}


def _keyset_dict(keyset, message):
    return {"version": keyset.version, "signed_by": cose.decode1(message)[1].get(cose.LABEL_KID, b"").hex(),
            "keys": {kid.hex(): pub.hex() for kid, pub in sorted(keyset.keys.items())},
            "revoked": [kid.hex() for kid in keyset.revoked]}


def _manifest_dict(manifest_bytes):
    m = mf.parse(manifest_bytes)
    return {"hw_class": m.hw_class, "version": m.version, "security_version": m.security_version,
            "size": m.size, "sha256": m.sha256.hex(), "chunks": m.chunk_count(),
            "chunk_bytes": mf.CHUNK_BYTES, "form": "pages" if m.paged else "chunks",
            "pages": mf.page_count(m.chunk_count()) if m.paged else 0,
            "expires_s": m.expires_s, "rollout_id": m.rollout_id,
            "manifest_bytes": len(manifest_bytes),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
