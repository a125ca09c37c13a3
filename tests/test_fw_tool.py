"""`tether fw` (cloud/fw_cli.py, cloud/firmware.py), driven through its own
argparse parser from add_parser() and once as a subprocess. Exit codes:
0 ok, 1 refused (reason printed), 2 usage. Same inputs give the same bytes,
and firmware-images/ rebuilds byte for byte from its committed keys.
"""

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import cbor2
import pytest

from agent import manifest as mf
from cloud import fw_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(REPO, "firmware-images")
NOW = 1_700_000_000


def fw(*argv):
    parser = argparse.ArgumentParser(prog="tether")
    fw_cli.add_parser(parser.add_subparsers(dest="command"))
    return fw_cli.main(parser.parse_args(["fw"] + [str(a) for a in argv]))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """keys (root, release-1..3), key set v1, a payload, manifest and 2-signature bundle."""
    d = tmp_path_factory.mktemp("fw")
    for name in ("root", "release-1", "release-2", "release-3"):
        assert fw("keygen", "--out", d / "keys", "--name", name) == 0
    pubs = [d / "keys" / ("release-%d.pub" % i) for i in (1, 2, 3)]
    assert fw("keyset", "--root", d / "keys/root.key", "--release", *pubs, "--version", 1,
              "--out", d / "ks1.cose") == 0
    (d / "app.bin").write_bytes(bytes(range(256)) * 50)
    assert build(d, d / "m.cbor") == 0
    assert fw("sign", "--manifest", d / "m.cbor", "--key", d / "keys/release-1.key",
              "--key", d / "keys/release-2.key", "--keyset", d / "ks1.cose", "--out", d / "b") == 0
    return d


def build(d, out, version="1.0.0", days=30):
    return fw("build", "--payload", d / "app.bin", "--hw-class", "sim-v1", "--version", version,
              "--security-version", 4, "--expires-in-days", days, "--now", NOW,
              "--rollout-id", "r1", "--out", out)


def verify(d, *extra, bundle="b", payload="app.bin"):
    args = {"--k": 2, "--hw-class": "sim-v1", "--security-version": 4, "--now": NOW + 10}
    extra = list(extra)
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    flat = [x for pair in args.items() for x in pair]
    return fw("verify", "--bundle", d / bundle, "--payload", d / payload, "--root", d / "keys/root.pub", *flat)


def test_keygen_private_key_is_0600_and_never_overwritten(release, capsys):
    mode = stat.S_IMODE(os.stat(release / "keys/release-1.key").st_mode)
    assert mode == 0o600
    assert fw("keygen", "--out", release / "keys", "--name", "release-1") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert fw("keygen", "--out", release / "keys", "--name", "../evil") == 2


def test_build_is_deterministic(release):
    assert build(release, release / "again.cbor") == 0
    assert (release / "again.cbor").read_bytes() == (release / "m.cbor").read_bytes()
    assert build(release, release / "other.cbor", version="1.0.1") == 0
    assert (release / "other.cbor").read_bytes() != (release / "m.cbor").read_bytes()


def test_sign_is_deterministic_too(release):
    assert fw("sign", "--manifest", release / "m.cbor", "--key", release / "keys/release-2.key",
              "--key", release / "keys/release-1.key", "--keyset", release / "ks1.cose",
              "--out", release / "b2") == 0
    assert (release / "b2").read_bytes() == (release / "b").read_bytes()


def test_verify_accepts(release, capsys):
    assert verify(release) == 0
    assert "ok: sim-v1 1.0.0" in capsys.readouterr().out


@pytest.mark.parametrize("extra, code", [
    (("--k", 3), "too_few_signers"),
    (("--hw-class", "esp32-v1"), "wrong_hw_class"),
    (("--security-version", 5), "downgrade"),
    (("--now", NOW + 31 * 86400), "expired"),
    (("--keyset-version-seen", 2), "keyset_rollback"),
])
def test_verify_refuses_with_exit_1_and_reason(release, capsys, extra, code):
    assert verify(release, *extra) == 1
    assert capsys.readouterr().out.startswith("refused: %s:" % code)


def test_verify_refuses_a_tampered_payload_and_bundle(release, capsys):
    data = bytearray((release / "app.bin").read_bytes())
    data[5000] ^= 1
    (release / "bad.bin").write_bytes(bytes(data))
    assert verify(release, payload="bad.bin") == 1
    assert "tampered_chunk" in capsys.readouterr().out
    (release / "short.bin").write_bytes(bytes(data[:-1]))
    assert verify(release, payload="short.bin") == 1
    fields = cbor2.loads((release / "b").read_bytes())
    for part, code in (("keyset", "keyset_signature"), ("sigs", "bad_signature")):
        tampered = dict(fields)
        message = bytearray(fields["keyset"] if part == "keyset" else fields["sigs"][1])
        message[-3] ^= 1                                # inside the signature
        tampered[part] = bytes(message) if part == "keyset" else [fields["sigs"][0], bytes(message)]
        (release / "bad-b").write_bytes(cbor2.dumps(tampered, canonical=True))
        capsys.readouterr()
        assert verify(release, bundle="bad-b") == 1
        assert capsys.readouterr().out.startswith("refused: %s:" % code)


def test_revocation_through_the_tool(release, capsys):
    keys = release / "keys"
    assert fw("keyset", "--root", keys / "root.key", "--release", keys / "release-1.pub",
              keys / "release-3.pub", "--revoke", keys / "release-2.pub", "--version", 2,
              "--out", release / "ks2.cose") == 0
    # the tool refuses to sign with a revoked key ...
    assert fw("sign", "--manifest", release / "m.cbor", "--key", keys / "release-1.key", "--key",
              keys / "release-2.key", "--keyset", release / "ks2.cose", "--out", release / "x") == 2
    assert "not in key set 2" in capsys.readouterr().err
    assert fw("sign", "--manifest", release / "m.cbor", "--key", keys / "release-1.key", "--key",
              keys / "release-3.key", "--keyset", release / "ks2.cose", "--out", release / "b3") == 0
    assert verify(release, "--keyset-version-seen", 2, bundle="b3") == 0


def test_inspect_text_and_json(release, capsys):
    assert fw("inspect", "--bundle", release / "b") == 0
    text = capsys.readouterr().out
    assert "NOT verified" in text and "security version 4" in text and "sim-v1" in text
    assert "form             chunks\n" in text
    assert fw("inspect", "--bundle", release / "b", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bundle" and len(info["signers"]) == 2
    assert info["manifest"]["size"] == 12800 and info["manifest"]["chunks"] == 4
    assert info["manifest"]["form"] == "chunks" and info["manifest"]["pages"] == 0
    assert info["keyset"]["version"] == 1 and len(info["keyset"]["keys"]) == 3
    assert fw("inspect", "--bundle", release / "ks1.cose", "--json") == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "keyset"
    (release / "junk").write_bytes(b"\xff\x00junk")
    assert fw("inspect", "--bundle", release / "junk") == 2                  # not a bundle, manifest or key set


def build_big(d, size, out, *extra):
    """A payload of size bytes (every chunk different) as big.bin, and its manifest."""
    (d / "big.bin").write_bytes(hashlib.shake_256(b"big %d" % size).digest(size))
    return fw("build", "--payload", d / "big.bin", "--hw-class", "sim-v1", "--version", "2.0.0",
              "--security-version", 4, "--expires-in-days", 30, "--now", NOW,
              "--rollout-id", "r1", "--out", d / out, *extra)


def test_paged_build_sign_verify_inspect(release, capsys):
    """--pages on 300 chunks (pages of 128, 128 and 44 chunk hashes), the
    last chunk short: the device's checks accept it, and refuse it with one
    byte flipped."""
    assert build_big(release, 300 * 4096 - 100, "pm.cbor", "--pages") == 0
    assert "300 chunks (pages (3))" in capsys.readouterr().out
    assert fw("sign", "--manifest", release / "pm.cbor", "--key", release / "keys/release-1.key",
              "--key", release / "keys/release-2.key", "--keyset", release / "ks1.cose",
              "--out", release / "pb") == 0
    capsys.readouterr()
    assert verify(release, bundle="pb", payload="big.bin") == 0
    assert "ok: sim-v1 2.0.0" in capsys.readouterr().out
    assert fw("inspect", "--bundle", release / "pb") == 0
    assert "form             pages (3)\n" in capsys.readouterr().out
    assert fw("inspect", "--bundle", release / "pb", "--json") == 0
    m = json.loads(capsys.readouterr().out)["manifest"]
    assert (m["form"], m["pages"], m["chunks"], m["size"]) == ("pages", 3, 300, 300 * 4096 - 100)
    data = bytearray((release / "big.bin").read_bytes())
    data[200 * 4096 + 7] ^= 1                           # chunk 200: found at page 1's last chunk
    (release / "big.bin").write_bytes(bytes(data))
    assert verify(release, bundle="pb", payload="big.bin") == 1
    assert capsys.readouterr().out.startswith("refused: tampered_chunk:")


def test_build_pages_automatically_over_one_page_of_chunk_hashes(release, capsys):
    one_page = mf.PAGE_CHUNKS * mf.CHUNK_BYTES              # 512 KiB: one page of chunk hashes
    assert build_big(release, one_page, "inline.cbor") == 0
    assert "128 chunks (chunks)" in capsys.readouterr().out
    assert build_big(release, one_page + 1, "auto.cbor") == 0
    assert "129 chunks (pages (2))" in capsys.readouterr().out
    assert fw("inspect", "--bundle", release / "auto.cbor", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "manifest" and info["manifest"]["form"] == "pages"
    assert info["manifest"]["pages"] == 2


def test_usage_errors_exit_2(release, capsys):
    assert fw("verify", "--bundle", release / "missing", "--payload", release / "app.bin",
              "--root", release / "keys/root.pub", "--hw-class", "x") == 2
    assert "cannot read bundle" in capsys.readouterr().err
    assert fw("build", "--payload", release / "app.bin", "--hw-class", "bad class", "--version", "1",
              "--security-version", 1, "--expires-at", NOW, "--rollout-id", "r", "--out",
              release / "x.cbor") == 2
    assert fw("keyset", "--root", release / "keys/root.pub", "--release", release / "keys/release-1.pub",
              "--version", 1, "--out", release / "x") == 2      # a public key is no root key
    with pytest.raises(SystemExit) as info:
        fw("build", "--payload", release / "app.bin")           # argparse: required options
    assert info.value.code == 2
    assert fw() == 2                                             # no subcommand: help, exit 2


def test_standalone_subprocess_on_the_sample_images():
    code = "import sys; from cloud.fw_cli import _standalone; sys.exit(_standalone())"
    base = [sys.executable, "-c", code, "verify", "--bundle", os.path.join(IMAGES, "sim-v1-1.1.0.bundle"),
            "--payload", os.path.join(IMAGES, "sim-v1-1.1.0.bin"), "--root",
            os.path.join(IMAGES, "keys", "root.pub"), "--hw-class", "sim-v1", "--security-version", "2"]
    ok = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    old = subprocess.run(base[:5] + [os.path.join(IMAGES, "sim-v1-1.0.0.bundle"), "--payload",
                                     os.path.join(IMAGES, "sim-v1-1.0.0.bin")] + base[8:],
                         cwd=REPO, capture_output=True, text=True)
    assert old.returncode == 1 and "refused: downgrade" in old.stdout
    usage = subprocess.run(base[:3] + ["verify"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2


def test_sample_images_rebuild_byte_for_byte(tmp_path):
    shutil.copytree(os.path.join(IMAGES, "keys"), tmp_path / "keys")
    subprocess.run([sys.executable, os.path.join(IMAGES, "build.py"), "--out", str(tmp_path / "out"),
                    "--keys", str(tmp_path / "keys")], check=True, capture_output=True)
    built = sorted(os.listdir(tmp_path / "out"))
    assert built == sorted(f for f in os.listdir(IMAGES) if f.endswith((".bin", ".cose", ".manifest", ".bundle")))
    for name in built:
        with open(os.path.join(IMAGES, name), "rb") as f:
            assert (tmp_path / "out" / name).read_bytes() == f.read(), name
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(IMAGES) for f in files)
    assert total < 100 * 1024


# ------------------------------------------------ a new user's walkthrough (M4, M9, L3, L6, L13)

def build_to(d, out, *when, payload="app.bin", version="1.0.0"):
    return fw("build", "--payload", d / payload, "--hw-class", "sim-v1", "--version", version,
              "--security-version", 4, *when, "--rollout-id", "r1", "--out", out)


def test_build_refuses_an_expiry_in_the_past_with_readable_times(release, tmp_path, capsys):
    assert build_to(release, tmp_path / "m", "--expires-in-days", -5, "--now", NOW) == 2
    err = capsys.readouterr().err
    assert "not after now" in err and "2023-11-14T22:13:20Z (1700000000)" in err
    assert build_to(release, tmp_path / "m", "--expires-at", 1000) == 2      # against the clock
    assert "1970-01-01T00:16:40Z (1000)" in capsys.readouterr().err
    assert build_to(release, tmp_path / "m", "--expires-in-days", 0, "--now", NOW) == 2
    assert not (tmp_path / "m").exists()


def test_build_warns_when_the_cloud_would_refuse_the_expiry_as_too_soon(release, tmp_path, capsys):
    from cloud.rollout_release import MIN_VALIDITY_S_DEFAULT
    days = MIN_VALIDITY_S_DEFAULT // 86400
    assert build_to(release, tmp_path / "m", "--expires-in-days", days - 1, "--now", NOW) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "m").exists()
    assert "warning" in err and "%d days (%d s)" % (days, MIN_VALIDITY_S_DEFAULT) in err
    assert "expires_soon" in err and "2023-12-13T22:13:20Z (1702505600)" in err
    assert "expires 2023-12-13T22:13:20Z (1702505600)" in out                # readable on stdout too
    assert build_to(release, tmp_path / "m2", "--expires-in-days", days + 0.5, "--now", NOW) == 0
    assert "must be added by 2023-11-15T10:13:20Z" in capsys.readouterr().err
    assert build_to(release, tmp_path / "m3", "--expires-in-days", 180, "--now", NOW) == 0
    assert capsys.readouterr().err == ""


def test_the_documented_examples_give_an_expiry_the_cloud_accepts():
    from cloud.rollout_release import MIN_VALIDITY_S_DEFAULT
    import re
    with open(os.path.join(REPO, "README.md")) as f:
        texts = [f.read(), fw_cli.DESCRIPTION]
    days = [float(d) for text in texts for d in re.findall(r"fw build .*?--expires-in-days (\S+)", text, re.S)]
    assert len(days) == 2
    assert all(d * 86400 >= MIN_VALIDITY_S_DEFAULT + 7 * 86400 for d in days), days


def test_out_in_a_missing_directory_is_created_like_keygen(release, tmp_path, capsys):
    keys = release / "keys"
    assert fw("keyset", "--root", keys / "root.key", "--release", keys / "release-1.pub",
              keys / "release-2.pub", "--version", 1, "--out", tmp_path / "a/b/ks.cose") == 0
    assert build_to(release, tmp_path / "c/d/m", "--expires-in-days", 90, "--now", NOW) == 0
    assert fw("sign", "--manifest", tmp_path / "c/d/m", "--key", keys / "release-1.key", "--key",
              keys / "release-2.key", "--keyset", tmp_path / "a/b/ks.cose", "--out", tmp_path / "e/b") == 0
    assert (tmp_path / "e/b").stat().st_size > 0
    assert verify(release, "--now", NOW, bundle=tmp_path / "e/b") == 0


def test_unwritable_outputs_are_one_line_and_exit_2(release, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    assert build_to(release, tmp_path / "file/m", "--expires-in-days", 90, "--now", NOW) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "not a directory" in err
    (tmp_path / "dir").mkdir()
    assert build_to(release, tmp_path / "dir", "--expires-in-days", 90, "--now", NOW) == 2
    assert "is a directory" in capsys.readouterr().err
    assert fw("keygen", "--out", tmp_path / "file", "--name", "root") == 2
    assert "is a file" in capsys.readouterr().err
    assert fw("keygen", "--out", tmp_path / "file/sub", "--name", "root") == 2
    assert capsys.readouterr().err.count("\n") == 1
    if os.geteuid() != 0:                                       # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert build_to(release, tmp_path / "ro/m", "--expires-in-days", 90, "--now", NOW) == 2
        assert "Permission denied" in capsys.readouterr().err
        assert not os.listdir(tmp_path / "ro")


def test_key_ids_are_hex_in_refusals(release, tmp_path, capsys):
    assert fw("keygen", "--out", tmp_path, "--name", "rogue") == 0
    capsys.readouterr()
    assert fw("verify", "--bundle", release / "b", "--payload", release / "app.bin", "--root",
              tmp_path / "rogue.pub", "--hw-class", "sim-v1", "--security-version", 4, "--now", NOW) == 1
    out = capsys.readouterr().out
    root_kid = fw_cli.firmware.kid_of(fw_cli.firmware.load_private_key(release / "keys/root.key")).hex()
    rogue_kid = fw_cli.firmware.kid_of(fw_cli.firmware.load_private_key(tmp_path / "rogue.key")).hex()
    assert out.startswith("refused: keyset_signature: unknown kid %s" % root_kid)
    assert rogue_kid in out and "b'" not in out and 'b"' not in out


def test_key_ids_in_the_verifiers_messages_are_hex():
    """agent/cose.py names key ids in hex (a hostile non-bytes kid by its repr, cut short)."""
    from agent import cose
    assert cose.kid_text(b"x\xdd") == "78dd"
    assert cose.kid_text(["x" * 100]).startswith("['xxx") and len(cose.kid_text(["x" * 100])) == 40


def test_expired_refusal_shows_readable_times(release, capsys):
    assert verify(release, "--now", NOW + 31 * 86400) == 1
    assert "2023-12-14T22:13:20Z (1702592000)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["verify", "keyset", "revoke"])
def test_a_private_key_where_a_public_key_belongs_is_refused(release, tmp_path, capsys, command):
    keys = release / "keys"
    if command == "verify":
        status = fw("verify", "--bundle", release / "b", "--payload", release / "app.bin", "--root",
                    keys / "root.key", "--hw-class", "sim-v1", "--security-version", 4, "--now", NOW)
        key = keys / "root.key"
    else:
        release_keys = [keys / "release-1.key"] if command == "keyset" else [keys / "release-1.pub"]
        revoke = ["--revoke", keys / "release-2.key"] if command == "revoke" else []
        key = (release_keys + revoke)[-1]
        status = fw("keyset", "--root", keys / "root.key", "--release", *release_keys, *revoke,
                    "--version", 1, "--out", tmp_path / "ks")
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "%s is a private key" % key in captured.err
    assert str(key)[:-len(".key")] + ".pub" in captured.err
    assert not (tmp_path / "ks").exists()


def test_an_empty_payload_is_named_as_empty(release, tmp_path, capsys):
    (tmp_path / "empty.bin").write_bytes(b"")
    assert fw("build", "--payload", tmp_path / "empty.bin", "--hw-class", "sim-v1", "--version", "1",
              "--security-version", 1, "--expires-in-days", 90, "--rollout-id", "r",
              "--out", tmp_path / "m") == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err
    with pytest.raises(fw_cli.FirmwareError, match="empty"):
        fw_cli.firmware.build_manifest(b"", "sim-v1", "1", 1, NOW, "r")


def test_sign_names_what_was_given_instead_of_a_manifest(release, tmp_path, capsys):
    keys = release / "keys"
    for given, says in (("app.bin", "is not a manifest"), ("b", "is a bundle, not a manifest"),
                        ("ks1.cose", "is a key set, not a manifest")):
        assert fw("sign", "--manifest", release / given, "--key", keys / "release-1.key",
                  "--keyset", release / "ks1.cose", "--out", tmp_path / "x") == 2
        err = capsys.readouterr().err
        assert says in err and "16384" not in err, err
    assert not (tmp_path / "x").exists()


def test_inspect_of_something_else_is_a_usage_error(release, capsys):
    for other in ("keys/root.pub", "keys/root.key", "app.bin", "junk"):
        if other == "junk":
            (release / "junk").write_bytes(b"\xff\x00junk")
        assert fw("inspect", "--bundle", release / other) == 2
        assert "not a bundle, manifest or key set" in capsys.readouterr().err
    truncated = (release / "b").read_bytes()[:-10]               # a bundle, damaged: refused
    (release / "cut-b").write_bytes(truncated)
    assert fw("inspect", "--bundle", release / "cut-b") == 1
    assert capsys.readouterr().out.startswith("malformed: ")


def test_bad_version_lists_the_characters_the_manifest_allows(release, tmp_path, capsys):
    assert build_to(release, tmp_path / "m", "--expires-in-days", 90, "--now", NOW, version="1 0") == 2
    err = capsys.readouterr().err
    assert "' '" in err and "+" in err
    assert build_to(release, tmp_path / "m", "--expires-in-days", 90, "--now", NOW, version="1.0+b1") == 0
    fw_cli.firmware.build_manifest(b"x", "sim-v1", "1.0+b1", 1, NOW, "r")
    with pytest.raises(fw_cli.FirmwareError) as info:
        fw_cli.firmware.build_manifest(b"x", "sim+v1", "1", 1, NOW, "r")
    assert "'+'" in info.value.message and "allowed: A-Z a-z 0-9 . _ -" in info.value.message
