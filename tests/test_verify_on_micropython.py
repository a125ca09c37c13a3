"""Firmware verification on real MicroPython (WebAssembly port) in a 64 KiB
heap: a COSE_Sign1 manifest (ES256) that carries the SHA-256 of a 1 MiB
image, and the image itself hashed in 4 KiB chunks from a generator that
reuses one buffer (the image never exists whole). A manifest with a changed
payload and an image with one changed byte must both be refused.

This port collects garbage only between top-level runs (see tests/mpy.py),
so the signature check runs as agent.p256.Verifier steps of BITS_PER_STEP
bits; each step's allocations must fit the heap beside what is live. The
test prints elapsed time and the heap peak: gc.mem_alloc() at the end of
each step, that is live data plus the step's uncollected garbage.
"""

import hashlib

import cbor2

from agent import cbor
from mpy import require_micropython, run_micropython_report
from test_cose import KEY_A, public_bytes, sign1

HEAP_KB = 64
BITS_PER_STEP = 4
IMAGE_BYTES = 1 << 20
CHUNK_BYTES = 4096

# Portable: the same image generator runs on CPython (to sign) and MicroPython.
IMAGE = r'''
import struct
CHUNK_BYTES = 4096

def image_chunks(count, tamper_at=-1):
    """The test image, chunk by chunk, in one reused 4 KiB buffer."""
    buf = bytearray(CHUNK_BYTES)
    for j in range(CHUNK_BYTES):
        buf[j] = (j * 167 + 13) & 0xFF
    for i in range(count):
        struct.pack_into(">I", buf, 0, i)
        if i == tamper_at:
            buf[100] ^= 1
        yield buf
        if i == tamper_at:
            buf[100] ^= 1
'''

SETUP = IMAGE + r'''
import gc, hashlib, time, binascii
from agent import cbor, cose
peak = [0]
last = [time.ticks_ms()]
def mark():
    peak[0] = max(peak[0], gc.mem_alloc())
def lap():
    """ms since the previous lap()."""
    now = time.ticks_ms()
    elapsed, last[0] = time.ticks_diff(now, last[0]), now
    return elapsed
KEYS = {b"release-a": binascii.unhexlify(%r)}
GOOD = binascii.unhexlify(%r)
BAD = binascii.unhexlify(%r)
'''

VERIFY_STEPS = [
    "lap()\npayload, verifier = cose.start1(MESSAGE, KEYS)",
] + ["verifier.step(%d)" % BITS_PER_STEP] * (256 // BITS_PER_STEP) + [
    "assert verifier.step(1)\nprint('signature', verifier.result(), lap())",
]

HASH_STEPS = [
    "manifest = cbor.loads(payload)\nh = hashlib.sha256()\n"
    "for chunk in image_chunks(manifest['size'] // CHUNK_BYTES, TAMPER_AT): h.update(chunk)\n"
    "chunk = None",
    "print('image', h.digest() == manifest['sha256'], lap())\nmanifest = None",
]


def image_sha256():
    namespace = {}
    exec(IMAGE, namespace)
    digest = hashlib.sha256()
    for chunk in namespace["image_chunks"](IMAGE_BYTES // CHUNK_BYTES):
        digest.update(chunk)
    return digest.digest()


def messages():
    manifest = {"v": 1, "size": IMAGE_BYTES, "chunk": CHUNK_BYTES, "sha256": image_sha256()}
    good = sign1(cbor.dumps(manifest), KEY_A, b"release-a")
    # the same signature over a manifest pointing at another image
    items = cbor2.loads(good).value
    forged = dict(manifest, sha256=hashlib.sha256(b"other image").digest())
    bad = cbor2.dumps(cbor2.CBORTag(18, [items[0], items[1], cbor.dumps(forged), items[3]]))
    return good, bad


def with_mark(steps):
    return [step + "\nmark()" for step in steps]


def test_verify_1_mib_image_in_64_kib_heap():
    require_micropython()
    good, bad = messages()
    setup = SETUP % (public_bytes(KEY_A).hex(), good.hex(), bad.hex())
    steps = (
        ["MESSAGE = GOOD\nTAMPER_AT = -1"] + VERIFY_STEPS + HASH_STEPS
        + ["MESSAGE = GOOD\nTAMPER_AT = 100\nverifier = payload = h = None"] + VERIFY_STEPS + HASH_STEPS
        + ["MESSAGE = BAD\nTAMPER_AT = -1\nverifier = payload = h = None"] + VERIFY_STEPS
        + ["print('peak', peak[0])"]
    )
    report = run_micropython_report(setup + "\nmark()", heap_kb=HEAP_KB, modules=("agent",),
                                    timeout_s=120, steps=with_mark(steps))
    lines = report["stdout"].split()
    results = [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 2, 3)]
    assert results == [
        ("signature", "True"), ("image", "True"),     # good manifest, good image
        ("signature", "True"), ("image", "False"),    # good manifest, one byte changed
        ("signature", "False"),                       # payload changed under the signature
    ], report["stdout"]
    peak_bytes = int(lines[-1])
    print("\nMicroPython: %d steps, %.0f ms in all; signature check %s ms, 1 MiB hashed "
          "in %s ms; heap total %d bytes (budget %d), peak allocated %d bytes"
          % (len(steps) + 1, report["elapsed_ms"], lines[2], lines[5],
             report["heap_peak_bytes"], HEAP_KB * 1024, peak_bytes))
    assert peak_bytes <= HEAP_KB * 1024


def test_edge_vectors_agree_with_cpython():
    """The edge cases of tests/test_p256.py give the same verdicts on
    MicroPython's integers as on CPython's (and cryptography's)."""
    require_micropython()
    vectors = edge_vectors()
    setup = r'''
import binascii
from agent import p256
VECTORS = %r
def start(i):
    key, digest, signature = [binascii.unhexlify(x) for x in VECTORS[i]]
    try:
        return p256.Verifier(key, digest, signature)
    except p256.SignatureError as error:
        print(i, error.code)
''' % ([tuple(part.hex() for part in vector) for vector, _ in vectors],)
    steps = []
    for i in range(len(vectors)):
        steps.append("v = start(%d)" % i)
        steps += ["v and v.step(%d)" % BITS_PER_STEP] * (256 // BITS_PER_STEP)
        steps.append("v and print(%d, v.result())" % i)
    out = run_micropython_report(setup, heap_kb=HEAP_KB, timeout_s=120, steps=steps)["stdout"]
    assert out.split("\n")[:-1] == ["%d %s" % (i, expected) for i, (_, expected) in enumerate(vectors)]


def edge_vectors():
    """[((key, digest, signature), expected verdict or error code)]."""
    import test_p256 as t
    from agent.p256 import N

    point = t._x_at_or_above_n()
    q, r = t.ref_add(point, (t.GX, t.P - t.GY)), point[0] - N
    high1, high2 = 0x1234567890ABCDEF1234567890ABCDEF, 0xFEDCBA0987654321FEDCBA0987654321
    d = -high1 * pow(high2, -1, N) % N
    sample_s = int.from_bytes(t.RFC6979_SAMPLE[32:], "big")
    cases = [
        ((t.RFC6979_Q, t.SAMPLE, t.RFC6979_SAMPLE), True),
        ((t.RFC6979_Q, t.TEST, t.RFC6979_TEST), True),
        ((t.RFC6979_Q, t.TEST, t.RFC6979_SAMPLE), False),
        ((t.RFC6979_Q, t.SAMPLE, t.RFC6979_SAMPLE[:32] + (N - sample_s).to_bytes(32, "big")), True),
        ((t.point_bytes(*q), r.to_bytes(32, "big"), t.raw(r, r)), True),
        (t.crafted((high1 << 128) | 0xBEEF, (high2 << 128) | 0xCAFE, d), True),
        (t.crafted(N - 10, 10, 1), False),
        (t.crafted(N - 8, 10, 1), True),
        (t.crafted(5, 7, N - 1), True),
        ((t.RFC6979_Q[:-1] + b"\x00", t.SAMPLE, t.RFC6979_SAMPLE), "bad_key"),
        ((t.RFC6979_Q, t.SAMPLE, t.raw(0, 1)), "bad_signature_value"),
        ((t.RFC6979_Q, t.SAMPLE[:31], t.RFC6979_SAMPLE), "bad_length"),
    ]
    for vector, expected in cases:  # the expectations hold on CPython first
        assert t.check_agrees(*vector) == (expected if isinstance(expected, bool) else None)
    return cases
