"""Rebuild the sample firmware images with `tether fw` (see README.md here).

    .venv/bin/python firmware-images/build.py [--out DIR] [--keys DIR]

Keys are made with `tether fw keygen` only when missing, so a rebuild with
the committed keys gives byte-identical files: the payloads are generated
deterministically, the manifests are deterministic CBOR, expiry is absolute,
and signatures use RFC 6979 nonces. The keys are for tests only.
"""

import argparse
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cloud.fw_cli import _standalone  # noqa: E402

HW_CLASS = "sim-v1"
EXPIRES_AT = 4102444800                 # 2100-01-01T00:00:00Z
RELEASES = [                            # version, security version, size, key set, rollout
    ("1.0.0", 1, 10000, "keyset-v1.cose", "sample-1"),
    ("1.1.0", 2, 14000, "keyset-v2.cose", "sample-2"),
]
SIGNERS = ["release-1", "release-2"]


def payload(version, size):
    """Deterministic bytes: SHA-256 in counter mode over the version text."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"tether sample %s %d" % (version.encode(), counter)).digest()
        counter += 1
    return bytes(out[:size])


def fw(*argv):
    status = _standalone([str(a) for a in argv])
    if status != 0:
        raise SystemExit("tether fw %s failed with exit %d" % (argv[0], status))


def build(out, keys):
    os.makedirs(out, exist_ok=True)
    for name in ["root", "release-1", "release-2", "release-3"]:
        if not os.path.exists(os.path.join(keys, name + ".key")):
            fw("keygen", "--out", keys, "--name", name)
    pub = [os.path.join(keys, "release-%d.pub" % i) for i in (1, 2, 3)]
    root = os.path.join(keys, "root.key")
    # v1 lists release-1..3; v2 revokes release-3 (rotation without reflashing)
    fw("keyset", "--root", root, "--release", *pub, "--version", 1,
       "--out", os.path.join(out, "keyset-v1.cose"))
    fw("keyset", "--root", root, "--release", *pub[:2], "--revoke", pub[2], "--version", 2,
       "--out", os.path.join(out, "keyset-v2.cose"))
    for version, security_version, size, keyset, rollout in RELEASES:
        stem = os.path.join(out, "%s-%s" % (HW_CLASS, version))
        with open(stem + ".bin", "wb") as f:
            f.write(payload(version, size))
        fw("build", "--payload", stem + ".bin", "--hw-class", HW_CLASS, "--version", version,
           "--security-version", security_version, "--expires-at", EXPIRES_AT,
           "--rollout-id", rollout, "--out", stem + ".manifest")
        keys_args = []
        for signer in SIGNERS:
            keys_args += ["--key", os.path.join(keys, signer + ".key")]
        fw("sign", "--manifest", stem + ".manifest", *keys_args,
           "--keyset", os.path.join(out, keyset), "--out", stem + ".bundle")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=HERE, help="where to write (default: this directory)")
    parser.add_argument("--keys", default=os.path.join(HERE, "keys"), help="key directory")
    args = parser.parse_args()
    build(args.out, args.keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
