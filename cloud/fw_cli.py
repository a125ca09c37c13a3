"""`tether fw`: firmware release keys, manifests, signatures, verification.

    add_parser(subparsers)   adds `fw` and its subcommands to tether's parser
    main(args) -> int        runs the parsed `fw` command
    _standalone(argv)        the same without cloud/cli.py (tests, recipes)

Exit codes: 0 done / verified, 1 the bundle is refused (the reason code is
printed), 2 usage or an input the tool cannot use.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

from agent import cbor
from agent import manifest as mf
from agent.errors import RemoteError
from cloud import firmware
from cloud.firmware import FirmwareError
from cloud.rollout_release import MIN_VALIDITY_S_DEFAULT

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Signed firmware releases. A release is a payload plus a bundle: the manifest
(hardware class, version, security version, size, SHA-256 of the payload and
of each 4 KiB chunk, or over 512 KiB of each page of 128 chunk hashes,
expiry, rollout id), signed by k or more release keys, with the release key
set signed by the offline root key. Devices trust only the root public key.

  tether fw keygen --out keys --name root
  tether fw keygen --out keys --name release-1     (and release-2, release-3)
  tether fw keyset --root keys/root.key --release keys/release-*.pub --version 1 --out keyset.cose
  tether fw build --payload app.bin --hw-class sim-v1 --version 1.2.0 --security-version 3 \\
                  --expires-in-days 180 --rollout-id r1 --out app.manifest
  tether fw sign --manifest app.manifest --key keys/release-1.key --key keys/release-2.key \\
                 --keyset keyset.cose --out app.bundle
  tether fw verify --bundle app.bundle --payload app.bin --root keys/root.pub --k 2 \\
                   --hw-class sim-v1 --security-version 3
  tether fw inspect --bundle app.bundle
"""


def add_parser(subparsers):
    """Add `fw` (with keygen, keyset, build, sign, verify, inspect) to subparsers."""
    fw = subparsers.add_parser("fw", help="firmware release keys, manifests, signatures",
                               description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = fw.add_subparsers(dest="fw_command", metavar="FW_COMMAND")
    _add_keygen(sub)
    _add_keyset(sub)
    _add_build(sub)
    _add_sign(sub)
    _add_verify(sub)
    _add_inspect(sub)
    fw.set_defaults(fw_parser=fw)
    return fw


def _add_keygen(sub):
    p = sub.add_parser("keygen", help="make a P-256 key pair (root or release)",
                       description="Write NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub (PEM) into "
                       "DIR and print the key's kid (first 8 bytes of SHA-256 of the public point). "
                       "Refuses to overwrite. Keep the root key offline.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    p.add_argument("--name", default="release-1", help="file name stem: root, release-N, ... "
                   "(default release-1)")


def _add_keyset(sub):
    p = sub.add_parser("keyset", help="sign the list of release keys with the root key",
                       description="Write a key set: the release public keys and the kids revoked, "
                       "with a version, signed by the root key (COSE_Sign1). Devices refuse a set "
                       "older than one they have seen, so give each new set a higher version.")
    p.add_argument("--root", required=True, metavar="KEY", help="root private key")
    p.add_argument("--release", required=True, nargs="+", metavar="PUB",
                   help="release public keys (the .pub files)")
    p.add_argument("--revoke", nargs="+", default=[], metavar="PUB_OR_KID",
                   help="release keys to revoke: public key files or 16-hex-digit kids")
    p.add_argument("--version", required=True, type=_uint, help="set version (monotonic)")
    p.add_argument("--out", required=True, metavar="FILE")


def _add_build(sub):
    p = sub.add_parser("build", help="make the manifest of a payload (deterministic)",
                       description="Hash the payload (whole, and per 4 KiB chunk) and write the "
                       "manifest as deterministic CBOR. A payload up to 512 KiB lists its chunk "
                       "hashes; a larger one (up to 224 MiB) lists the hash of each page of 128 "
                       "chunk hashes instead (the chunks form holds at most 1.75 MiB). The same "
                       "inputs give the same bytes; a "
                       "relative expiry counts from --now (default $SOURCE_DATE_EPOCH, else the clock). "
                       "An expiry not after --now (default: the clock) is refused; one that leaves "
                       "`tether cloud releases add` (which wants %d days of validity left) less than "
                       "a day to register the release is warned about."
                       % (MIN_VALIDITY_S_DEFAULT // 86400))
    p.add_argument("--payload", required=True, metavar="FILE", help="the firmware image")
    p.add_argument("--hw-class", required=True,
                   help="hardware class the image is for, e.g. sim-v1 (A-Z a-z 0-9 . _ -)")
    p.add_argument("--version", required=True, help="release version text, e.g. 1.2.0 (A-Z a-z 0-9 . _ - +)")
    p.add_argument("--security-version", required=True, type=_uint,
                   help="anti-rollback counter; devices refuse anything below theirs")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--expires-in-days", type=_days, metavar="D",
                      help="expiry D days after --now (the cloud wants at least %d)"
                      % (MIN_VALIDITY_S_DEFAULT // 86400))
    when.add_argument("--expires-at", type=_uint, metavar="UNIX_S", help="absolute expiry")
    p.add_argument("--now", type=_uint, metavar="UNIX_S",
                   help="base for --expires-in-days and the time the expiry is checked against "
                   "(default: $SOURCE_DATE_EPOCH, else the clock, for the base; the clock for the check)")
    p.add_argument("--rollout-id", required=True, help="rollout this release belongs to")
    p.add_argument("--pages", action="store_true",
                   help="list page hashes even for a payload of one page of chunk hashes or less "
                   "(default: automatic, pages only over 512 KiB; a device then fetches each page "
                   "before the chunks it covers)")
    p.add_argument("--out", required=True, metavar="MANIFEST")


def _add_sign(sub):
    p = sub.add_parser("sign", help="sign a manifest with release keys into a bundle",
                       description="Sign the manifest with each release key (COSE_Sign1, ES256) "
                       "and write a bundle holding the key set and the signatures. Every key must "
                       "be in the key set. Signatures are deterministic (RFC 6979).")
    p.add_argument("--manifest", required=True, metavar="M", help="manifest from `tether fw build`")
    p.add_argument("--key", required=True, action="append", metavar="K",
                   help="release private key; repeat for each signer")
    p.add_argument("--keyset", required=True, metavar="FILE", help="key set from `tether fw keyset`")
    p.add_argument("--out", required=True, metavar="BUNDLE")


def _add_verify(sub):
    p = sub.add_parser("verify", help="check a bundle and payload as a device would",
                       description="Run the device's checks (agent/manifest.py): key set signed by "
                       "the root, k distinct current release signers, hardware class, security "
                       "version, expiry, then the payload chunk by chunk and whole. Exit 0 when "
                       "accepted, 1 with the reason code when refused.")
    p.add_argument("--bundle", required=True, metavar="B")
    p.add_argument("--payload", required=True, metavar="FILE")
    p.add_argument("--root", required=True, metavar="PUB", help="root public key (the .pub file)")
    p.add_argument("--k", type=int, default=2, help="release signers required (default 2)")
    p.add_argument("--hw-class", required=True, help="the device's hardware class")
    p.add_argument("--security-version", type=_uint, default=0, help="the device's current one")
    p.add_argument("--keyset-version-seen", type=_uint, default=0,
                   help="newest key set version the device has accepted (default 0)")
    p.add_argument("--now", type=_uint, metavar="UNIX_S", help="the device's clock (default: now)")


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="show a bundle, manifest or key set (not verified)",
                       description="Print what a bundle (or a manifest, or a key set) says, "
                       "without checking signatures: use `tether fw verify` for that.")
    p.add_argument("--bundle", required=True, metavar="B")
    p.add_argument("--json", action="store_true", help="JSON instead of text")


def _uint(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a non-negative integer" % text)
    return value


def _days(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("%r is not a number of days" % text)
    return value


def _when(seconds):
    """Seconds since the epoch as "2024-01-02T03:04:05Z (1704164645)"."""
    try:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        text = "?"
    return "%s (%d)" % (text, seconds)


def _write(path, data):
    """firmware.write_file, creating the parent directories (as keygen does)."""
    if os.path.isdir(path):
        raise FirmwareError("--out %s is a directory; give a file name" % path)
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        firmware.write_file(path, data)
    except OSError as e:
        try:
            os.remove(path + ".tmp")
        except OSError:
            pass
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            raise FirmwareError("cannot write %s: a part of %s is a file, not a directory"
                                % (path, parent)) from None
        raise FirmwareError("cannot write %s: %s" % (path, e.strerror or e)) from None


# ---------------------------------------------------------------- commands

def main(args):
    command = COMMANDS.get(getattr(args, "fw_command", None))
    if command is None:
        args.fw_parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return command(args)
    except FirmwareError as e:
        print("tether fw %s: %s" % (args.fw_command, e.message), file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:                # a file the commands above did not wrap: one line, not a traceback
        where = " %s" % e.filename if e.filename else ""
        print("tether fw %s:%s: %s" % (args.fw_command, where, e.strerror or e), file=sys.stderr)
        return EXIT_USAGE


def keygen(args):
    if not args.name or args.name.strip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") \
            or args.name.startswith("."):
        raise FirmwareError("--name must be letters, digits, '.', '_' or '-' (not leading '.')")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FirmwareError("--out %s is a file; give a directory for the key files" % args.out)
    key_path, pub_path, kid = firmware.write_keypair(args.out, args.name)
    print("kid %s\nprivate %s (mode 0600)\npublic  %s" % (kid.hex(), key_path, pub_path))
    return EXIT_OK


def keyset(args):
    root = firmware.load_private_key(args.root)
    releases = [firmware.load_public_key(path) for path in args.release]
    revoked = [_kid(text) for text in args.revoke]
    message = firmware.make_keyset(root, releases, args.version, revoked)
    _write(args.out, message)
    print("key set version %d: %d release keys, %d revoked, signed by root %s -> %s"
          % (args.version, len(releases), len(revoked), firmware.kid_of(root).hex(), args.out))
    return EXIT_OK


def _kid(text):
    if len(text) == 16 and not os.path.exists(text):
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    return mf.fingerprint(firmware.load_public_key(text))


def build(args):
    payload = firmware.read_file(args.payload, "payload")
    if not payload:
        raise FirmwareError("payload %s is empty (0 bytes): there is nothing to sign" % args.payload)
    if args.expires_at is not None:
        expires_s = args.expires_at
    else:
        base_s = args.now if args.now is not None else int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
        expires_s = base_s + int(args.expires_in_days * 86400)
    now_s = args.now if args.now is not None else int(time.time())
    _check_expiry(expires_s, now_s)
    data = firmware.build_manifest(payload, args.hw_class, args.version, args.security_version,
                                   expires_s, args.rollout_id, pages=args.pages or None)
    _write(args.out, data)
    print("manifest %s: %s %s, security version %d, %d bytes in %d chunks (%s), expires %s -> %s"
          % (hashlib.sha256(data).hexdigest()[:16], args.hw_class, args.version,
             args.security_version, len(payload), mf.chunk_count(len(payload)),
             _form(firmware.describe(data)["manifest"]), _when(expires_s), args.out))
    return EXIT_OK


def _check_expiry(expires_s, now_s):
    """Refuse an expiry devices would refuse at once (or the manifest cannot
    hold); warn when `tether cloud releases add` would refuse it as
    expires_soon, or would within a day."""
    if expires_s >= mf.TIME_END:
        raise FirmwareError("expiry %s is past the manifest's limit %s"
                            % (_when(expires_s), _when(mf.TIME_END - 1)))
    if expires_s <= now_s:
        raise FirmwareError("expiry %s is not after now %s: every device and the cloud refuse an "
                            "expired manifest" % (_when(expires_s), _when(now_s)))
    deadline_s = expires_s - MIN_VALIDITY_S_DEFAULT
    if deadline_s < now_s + 86400:
        if deadline_s < now_s:
            consequence = "the cloud will refuse this one (expires_soon)"
        else:
            consequence = "this one must be added by %s" % _when(deadline_s)
        print("tether fw build: warning: the manifest expires %s, %.1f days after now %s; "
              "`tether cloud releases add` refuses a release that expires less than %d days "
              "(%d s) after it is added, so %s. Give a later expiry (e.g. --expires-in-days 180)."
              % (_when(expires_s), (expires_s - now_s) / 86400, _when(now_s),
                 MIN_VALIDITY_S_DEFAULT // 86400, MIN_VALIDITY_S_DEFAULT, consequence), file=sys.stderr)


def sign(args):
    manifest_bytes = firmware.read_file(args.manifest, "manifest")
    _check_manifest(args.manifest, manifest_bytes)
    keys = [firmware.load_private_key(path) for path in args.key]
    keyset_message = firmware.read_file(args.keyset, "key set")
    bundle = firmware.sign_bundle(manifest_bytes, keys, keyset_message)
    _write(args.out, bundle)
    print("bundle: %d signatures (%s), %d bytes -> %s"
          % (len(keys), ", ".join(sorted(firmware.kid_of(k).hex() for k in keys)), len(bundle), args.out))
    return EXIT_OK


def _kind(data):
    """What data looks like at first sight: "keyset" (a COSE_Sign1), "map"
    (a bundle or a manifest), "pem" (a key file) or None."""
    if data[:1] == b"\xd2":
        return "keyset"
    if data[:1] and 0xa0 <= data[0] <= 0xbb:
        return "map"
    if data.lstrip()[:11] == b"-----BEGIN ":
        return "pem"
    return None


def _check_manifest(path, data):
    """FirmwareError unless data is a manifest (the output of `tether fw build`)."""
    try:
        mf.parse(data)
        return
    except RemoteError as e:
        reason = e.message
    kind = _kind(data)
    if kind == "keyset":
        raise FirmwareError("%s is a key set, not a manifest (give the output of `tether fw build`)" % path)
    if kind == "map":
        try:
            fields = cbor.loads(data)
        except RemoteError:
            fields = None
        if isinstance(fields, dict) and "sigs" in fields:
            raise FirmwareError("%s is a bundle, not a manifest (give the output of `tether fw build`)"
                                % path)
        if isinstance(fields, dict):
            raise FirmwareError("%s is not a valid manifest: %s" % (path, reason))
    raise FirmwareError("%s is not a manifest (%d bytes that are not the CBOR `tether fw build` "
                        "writes: the payload?)" % (path, len(data)))


def verify(args):
    bundle = firmware.read_file(args.bundle, "bundle")
    root = firmware.load_public_key(args.root)
    now_s = args.now if args.now is not None else int(time.time())
    if not 1 <= args.k <= mf.SIGNERS_MAX:
        raise FirmwareError("--k must be 1..%d" % mf.SIGNERS_MAX)
    try:
        m = firmware.verify_bundle(bundle, args.payload, root, args.k, args.hw_class,
                                   args.security_version, now_s, args.keyset_version_seen)
    except RemoteError as e:
        message = e.message
        if e.code == "keyset_signature" and "unknown kid" in message:
            message += "; the key set is not signed by the root given (--root %s has kid %s)" % (
                args.root, mf.fingerprint(root).hex())
        elif e.code == "expired":
            message = re.sub(r"\b(\d{6,})\b", lambda t: _when(int(t.group(1))), message)
        print("refused: %s: %s" % (e.code, message))
        return EXIT_REFUSED
    print("ok: %s %s (security version %d, rollout %s), %d bytes verified, key set version %d"
          % (m.hw_class, m.version, m.security_version, m.rollout_id, m.size, m.keyset_version))
    return EXIT_OK


def inspect(args):
    data = firmware.read_file(args.bundle, "bundle")
    kind = _kind(data)
    if kind not in ("keyset", "map"):
        what = "a PEM key file" if kind == "pem" else "%d bytes that are not CBOR of any of them" % len(data)
        raise FirmwareError("%s is not a bundle, manifest or key set (%s)" % (args.bundle, what))
    try:
        info = firmware.describe(data)
    except RemoteError as e:
        print("malformed: %s: %s" % (e.code, e.message))
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(_text(info))
    return EXIT_OK


def _text(info):
    lines = []
    if info["kind"] == "bundle":
        lines.append("bundle (%d bytes), signatures NOT verified; signers: %s"
                     % (info["bytes"], ", ".join(info["signers"])))
    if "keyset" in info:
        ks = info["keyset"]
        lines.append("key set version %d, signed by %s" % (ks["version"], ks["signed_by"]))
        lines += ["  release key %s" % kid for kid in ks["keys"]]
        lines += ["  revoked     %s" % kid for kid in ks["revoked"]]
    if "manifest" in info:
        m = info["manifest"]
        lines += ["manifest %s (%d bytes)" % (m["manifest_sha256"][:16], m["manifest_bytes"]),
                  "  hardware class   %s" % m["hw_class"],
                  "  version          %s" % m["version"],
                  "  security version %d" % m["security_version"],
                  "  payload          %d bytes, %d chunks of %d" % (m["size"], m["chunks"], m["chunk_bytes"]),
                  "  form             %s" % _form(m),
                  "  sha256           %s" % m["sha256"],
                  "  expires          %d (%s UTC)" % (m["expires_s"], _utc(m["expires_s"])),
                  "  rollout          %s" % m["rollout_id"]]
    return "\n".join(lines)


def _form(manifest_info):
    """"chunks", or "pages (n)": how the manifest lists the payload's hashes."""
    if manifest_info["form"] == "pages":
        return "pages (%d)" % manifest_info["pages"]
    return "chunks"


def _utc(seconds):
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "?"


COMMANDS = {"keygen": keygen, "keyset": keyset, "build": build, "sign": sign,
            "verify": verify, "inspect": inspect}


def _standalone(argv=None):
    """`tether fw ...` without cloud/cli.py: argv is what follows `fw`."""
    parser = argparse.ArgumentParser(prog="tether")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["fw"] + list(sys.argv[1:] if argv is None else argv))
    return main(args)
