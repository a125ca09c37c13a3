"""agent.manifest.ChunkVerifier additions for the updater: resuming a
stream at a chunk (next_index, chunk hashes only), refusing a resume it
cannot honour, memoryview input, and the fast path giving the same refusal
codes as before for every kind of bad chunk."""

import hashlib

import pytest

from agent import manifest as mf
from agent.errors import LocalError

PAYLOAD = bytes((i * 13 + i // 4096) & 0xFF for i in range(3 * 4096 + 17))


def manifest(payload=PAYLOAD):
    parts = [payload[i:i + 4096] for i in range(0, len(payload), 4096)]
    return mf.Manifest("hw", "1", 1, len(payload), hashlib.sha256(payload).digest(),
                       b"".join(hashlib.sha256(p).digest() for p in parts), 1 << 39, "r"), parts


def test_resume_at_a_chunk_checks_the_rest():
    m, parts = manifest()
    v = mf.ChunkVerifier(m, whole=False, next_index=2)
    assert v.received_bytes == 2 * 4096
    v.update(2, memoryview(parts[2]))
    v.update(3, bytearray(parts[3]))
    v.finish()
    assert v.received_bytes == len(PAYLOAD)


def test_resume_that_cannot_be_honoured_is_refused():
    m, _ = manifest()
    with pytest.raises(LocalError):
        mf.ChunkVerifier(m, whole=True, next_index=1)       # a hash state cannot resume
    with pytest.raises(LocalError):
        mf.ChunkVerifier(m, whole=False, next_index=5)
    v = mf.ChunkVerifier(m, whole=False, next_index=4)       # at the end: only finish
    v.finish()


@pytest.mark.parametrize("index, change, code", [
    (0, lambda d: d[:-1] + bytes([d[-1] ^ 1]), "tampered_chunk"),
    (0, lambda d: d[:-1], "truncated"),
    (0, lambda d: d + b"x", "oversized"),
    (1, lambda d: d, "out_of_order"),
    (4, lambda d: d, "oversized"),
    (9, lambda d: b"", "oversized"),
])
def test_fast_path_refusals_keep_their_codes(index, change, code):
    m, parts = manifest()
    v = mf.ChunkVerifier(m)
    data = change(parts[min(index, 3)])
    with pytest.raises(mf.ManifestError) as info:
        v.update(index, data)
    assert info.value.code == code
    with pytest.raises(mf.ManifestError) as info:
        v.update(0, parts[0])
    assert info.value.code == "failed"


def test_last_chunk_short_and_whole_hash_at_finish():
    m, parts = manifest()
    bad = mf.Manifest(m.hw_class, m.version, 1, m.size, b"\0" * 32, m.chunk_hashes, 1 << 39, "r")
    v = mf.ChunkVerifier(bad)
    for i, p in enumerate(parts):
        v.update(i, p)
    with pytest.raises(mf.ManifestError) as info:
        v.finish()
    assert info.value.code == "payload_hash"
    v = mf.ChunkVerifier(bad, whole=False)
    for i, p in enumerate(parts):
        v.update(i, p)
    v.finish()
    with pytest.raises(mf.ManifestError):
        v.update(0, parts[0])                                  # finished: refuses
