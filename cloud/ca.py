"""A small ECDSA P-256 certificate authority for one tether deployment.

Everything the cloud trusts comes from here: the broker's server
certificate, one certificate per device (subject CN "<tenant>/<device>",
the *identity*), and the cloud's own MQTT clients ("$cloud/ingest").

Files in the CA directory: ca.crt (PEM) and ca.key (PEM, mode 0600).
Issued device credentials are returned, not stored: the caller decides
where a device key lives.

Clock: every issuing call takes `now` (an aware datetime) so tests and a
seeded simulator can issue certificates that are not yet valid or already
expired; the default is the system clock.
"""

import datetime
import ipaddress
import os
import re
import warnings

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.errors import CAError, IdentityError

TENANT_LEN_MAX = 32
DEVICE_LEN_MAX = 64
INGEST_IDENTITY = "$cloud/ingest"
PROVISIONER_IDENTITY = "$cloud/provisioner"  # on the device listener (rotation)
CLAIMS_IDENTITY = "$cloud/claims"            # on the provisioning listener (claims, recovery)
OTA_IDENTITY = "$cloud/ota"                  # offers and chunks out, update reports in
SUPPORT_IDENTITY = "$cloud/support"          # console audit logs in, grant revocations out
SERVICE_IDENTITIES = (PROVISIONER_IDENTITY, CLAIMS_IDENTITY, OTA_IDENTITY, SUPPORT_IDENTITY)
CLOUD_PREFIX = "$cloud/"
# A factory claim certificate (one per batch) has CN "claim:<batch>"; it is
# issued by a separate claim CA that only the provisioning endpoint trusts.
CLAIM_PREFIX = "claim:"
CLAIM_LEN_MAX = 32
CLAIM_DAYS = 20 * 365  # outlives the devices it enrolls: it is the way back in (docs/identity.md)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"

CA_DAYS = 3650
SERVER_DAYS = 825
DEVICE_DAYS = 365
# Certificates start a little in the past so a device whose clock is a few
# minutes behind the CA's still accepts them.
BACKDATE = datetime.timedelta(minutes=5)

# X.509 (RFC 5280 ub-common-name) caps a CN at 64 characters, but the design
# allows a 32-char tenant, "/", and a 64-char device: 97 characters. OpenSSL
# (so Python's ssl and Mosquitto) reads longer CNs without complaint, and
# tests/test_ca.py checks both brokers accept the longest identity. We only
# switch off cryptography's check for those long CNs.
CN_LEN_X509_MAX = 64

_ID_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


def check_id(kind, value, len_max):
    """Raise IdentityError unless `value` is 1..len_max of [A-Za-z0-9_-]."""
    if not isinstance(value, str) or not 1 <= len(value) <= len_max:
        raise IdentityError("%s id must be 1..%d characters" % (kind, len_max))
    if not _ID_RE.match(value):
        raise IdentityError("%s id may only use A-Z a-z 0-9 _ -: %r" % (kind, value))
    return value


def make_identity(tenant, device):
    check_id("tenant", tenant, TENANT_LEN_MAX)
    check_id("device", device, DEVICE_LEN_MAX)
    return tenant + "/" + device


def parse_identity(identity):
    """'tenant/device' -> (tenant, device); IdentityError if not a device identity."""
    if not isinstance(identity, str) or identity.count("/") != 1:
        raise IdentityError("identity must be 'tenant/device': %r" % (identity,))
    tenant, device = identity.split("/")
    check_id("tenant", tenant, TENANT_LEN_MAX)
    check_id("device", device, DEVICE_LEN_MAX)
    return tenant, device


def is_cloud_identity(identity):
    """True for the cloud's own clients, e.g. '$cloud/ingest'."""
    if not isinstance(identity, str) or not identity.startswith(CLOUD_PREFIX):
        return False
    return bool(_ID_RE.match(identity[len(CLOUD_PREFIX):]))


def make_claim_identity(batch):
    check_id("claim batch", batch, CLAIM_LEN_MAX)
    return CLAIM_PREFIX + batch


def claim_batch(identity):
    """'claim:<batch>' -> '<batch>'; IdentityError for anything else."""
    if not isinstance(identity, str) or not identity.startswith(CLAIM_PREFIX):
        raise IdentityError("not a claim identity: %r" % (identity,))
    return check_id("claim batch", identity[len(CLAIM_PREFIX):], CLAIM_LEN_MAX)


def is_claim_identity(identity):
    try:
        claim_batch(identity)
    except IdentityError:
        return False
    return True


def identity_of(cert):
    """The subject CN of a certificate (x509.Certificate, PEM or DER bytes)."""
    if isinstance(cert, (bytes, bytearray)):
        cert = load_cert(bytes(cert))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CNs over 64 chars, see CN_LEN_X509_MAX
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise IdentityError("certificate must have exactly one subject CN")
    return names[0].value


def load_cert(data):
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CAError("not a certificate: %s" % exc, code="bad_cert") from exc


def write_private(path, data):
    """Write `data` to `path` with mode 0600, all or nothing."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def _name(cn):
    if len(cn) <= CN_LEN_X509_MAX:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)
    return x509.Name([attr])


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(digital_signature=False, cert_sign=False):
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


class CA:
    """Signs certificates with one P-256 key. Create once, load after."""

    def __init__(self, cert, key, dirpath=None):
        self.cert = cert
        self.key = key
        self.dirpath = dirpath
        self._ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    @property
    def cert_pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self):
        if self.dirpath is None:
            raise CAError("this CA has no directory", code="ca_no_dir")
        return os.path.join(self.dirpath, CA_CERT_FILE)

    @classmethod
    def create(cls, dirpath, name="tether CA", days=CA_DAYS, now=None):
        """Make a new CA in `dirpath`; refuses to overwrite an existing one."""
        key_path = os.path.join(dirpath, CA_KEY_FILE)
        cert_path = os.path.join(dirpath, CA_CERT_FILE)
        if os.path.exists(key_path) or os.path.exists(cert_path):
            raise CAError("a CA already exists in %s" % dirpath, code="ca_exists")
        os.makedirs(dirpath, exist_ok=True)
        now = now or _utcnow()
        key = _new_key()
        subject = _name(name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, dirpath)

    @classmethod
    def load(cls, dirpath):
        key_path = os.path.join(dirpath, CA_KEY_FILE)
        cert_path = os.path.join(dirpath, CA_CERT_FILE)
        if not (os.path.exists(key_path) and os.path.exists(cert_path)):
            raise CAError("no CA in %s" % dirpath, code="ca_missing")
        if os.stat(key_path).st_mode & 0o077:
            raise CAError("%s is readable by others; chmod 600 it" % key_path, code="ca_key_exposed")
        with open(cert_path, "rb") as f:
            cert = load_cert(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if key.public_key() != cert.public_key():
            raise CAError("ca.key does not match ca.crt in %s" % dirpath, code="ca_key_mismatch")
        return cls(cert, key, dirpath)

    def _issue(self, cn, eku, days, now, san=None, public_key=None, seconds=None):
        """-> (cert_pem, key_pem); with public_key (the device made its own
        key) -> (cert_pem, None): there is no private key to hand out.
        `seconds`, when given, is the lifetime instead of `days`."""
        now = now or _utcnow()
        lifetime = datetime.timedelta(seconds=seconds) if seconds is not None else datetime.timedelta(days=days)
        key = _new_key() if public_key is None else None
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key if public_key is not None else key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                public_key if public_key is not None else key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                           critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), None if key is None else _key_pem(key)

    def crl_pem(self, serials, days=7, now=None):
        """A CRL revoking these serial numbers, signed by this CA."""
        now = now or _utcnow()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.cert.subject)
                   .last_update(now - BACKDATE)
                   .next_update(now + datetime.timedelta(days=days)))
        for serial in sorted(set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue_device(self, tenant, device, days=DEVICE_DAYS, now=None):
        """-> (cert_pem, key_pem) for identity '<tenant>/<device>' (clientAuth)."""
        identity = make_identity(tenant, device)
        return self._issue(identity, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)

    def issue_from_csr(self, csr_pem, tenant, device, days=DEVICE_DAYS, now=None, seconds=None):
        """A device certificate for a key the device made itself. The CSR
        (PEM or DER) must verify (the device holds the key) and be for a
        P-256 key; the identity comes from the cloud's decision (tenant,
        device), never from the CSR's subject. -> cert_pem."""
        return self.issue_for_key(csr_public_key(csr_pem), tenant, device, days, now, seconds)

    def issue_for_key(self, public_key, tenant, device, days=DEVICE_DAYS, now=None, seconds=None):
        """A device certificate for a P-256 public key already checked (from a
        verified CSR). -> cert_pem."""
        identity = make_identity(tenant, device)
        cert_pem, _ = self._issue(identity, ExtendedKeyUsageOID.CLIENT_AUTH, days, now,
                                  public_key=public_key, seconds=seconds)
        return cert_pem

    def issue_claim(self, batch, days=CLAIM_DAYS, now=None):
        """-> (cert_pem, key_pem) of the factory claim certificate for a batch."""
        return self._issue(make_claim_identity(batch), ExtendedKeyUsageOID.CLIENT_AUTH, days, now)

    def signed(self, cert):
        """True if this CA signed `cert` (x509.Certificate), whatever its dates."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def issue_client(self, cn=INGEST_IDENTITY, days=DEVICE_DAYS, now=None):
        """-> (cert_pem, key_pem) for one of the cloud's own clients ('$cloud/<name>')."""
        if not is_cloud_identity(cn):
            raise IdentityError("cloud client CN must be '$cloud/<name>': %r" % (cn,))
        return self._issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)

    def issue_server(self, dirpath, hosts=("localhost", "127.0.0.1", "::1"), days=SERVER_DAYS, now=None):
        """Write server.crt and server.key (0600) into `dirpath` -> (cert_path, key_path).

        `hosts` are DNS names or IP addresses for the subjectAltName; the
        first is also the CN. localhost and 127.0.0.1 are always included.
        """
        hosts = list(hosts)
        for extra in ("localhost", "127.0.0.1"):
            if extra not in hosts:
                hosts.append(extra)
        san = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
        cert_pem, key_pem = self._issue(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, now, san)
        os.makedirs(dirpath, exist_ok=True)
        cert_path = os.path.join(dirpath, SERVER_CERT_FILE)
        key_path = os.path.join(dirpath, SERVER_KEY_FILE)
        write_private(key_path, key_pem)
        write_public(cert_path, cert_pem)
        return cert_path, key_path


def csr_public_key(csr_data):
    """The P-256 public key of a CSR (PEM or DER) whose signature verifies;
    CAError(code bad_csr) otherwise."""
    try:
        if bytes(csr_data).lstrip().startswith(b"-----"):
            csr = x509.load_pem_x509_csr(bytes(csr_data))
        else:
            csr = x509.load_der_x509_csr(bytes(csr_data))
    except (ValueError, TypeError) as e:
        raise CAError("not a CSR: %s" % e, code="bad_csr") from None
    if not csr.is_signature_valid:
        raise CAError("CSR signature does not verify", code="bad_csr")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CAError("device keys must be ECDSA P-256", code="bad_csr")
    return public_key


def _general_name(host):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
