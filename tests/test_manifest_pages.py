"""agent.manifest's paged form: a manifest of an image over 1.75 MiB signs
the SHA-256 of each page (128 chunk hashes end to end) instead of each
chunk's. Round trips around the page boundaries; every parse refusal as an
attack with its own code; the device's download path (one page loaded at a
time, each checked before the chunks it covers) and its read-back path (each
page checked from the chunks' hashes as its last chunk passes); a
differential against the chunks form of the same payload; and fuzzing (any
bytes give ManifestError or CBORError only).
"""

import hashlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cbor, manifest as mf
from agent.errors import CBORError, LocalError
from cloud import firmware

CHUNK = mf.CHUNK_BYTES
EXPIRES_S = 1_800_000_000


def image(size):
    """size bytes, every chunk different (cheap: one C call)."""
    return hashlib.shake_256(b"paged %d" % size).digest(size)


def manifest_bytes(payload, pages=True):
    return firmware.build_manifest(payload, "sim-v1", "2.0.0", 3, EXPIRES_S, "r1", pages=pages)


def split(payload):
    return [payload[i:i + CHUNK] for i in range(0, len(payload), CHUNK)]


PAYLOAD = image(300 * CHUNK - 100)          # 300 chunks, the last short: pages of 128, 128, 44
MANIFEST = mf.parse(manifest_bytes(PAYLOAD))
CHUNKS = split(PAYLOAD)
TABLE = firmware.chunk_table(PAYLOAD)


def page(p, table=TABLE):
    return table[p * mf.PAGE_BYTES:(p + 1) * mf.PAGE_BYTES]


def code_of(error_class, fn, *args):
    with pytest.raises(error_class) as info:
        fn(*args)
    return info.value.code


def download(verifier, start=0, chunks=CHUNKS, table=TABLE):
    """Load each page the verifier asks for, then the chunks from start on;
    [(chunk index, page loaded before it)]."""
    loaded = []
    for index in range(start, len(chunks)):
        p = verifier.page_needed()
        if p is not None:
            verifier.load_page(p, page(p, table))
            loaded.append((index, p))
        verifier.update(index, chunks[index])
    verifier.finish()
    return loaded


def read_back(manifest, chunks):
    """The whole=True check, chunk by chunk: (failing chunk index or None, verifier)."""
    verifier = mf.ChunkVerifier(manifest, whole=True)
    for index, data in enumerate(chunks):
        try:
            verifier.update(index, data)
        except mf.ManifestError:
            return index, verifier
    verifier.finish()
    return None, verifier


# ------------------------------------------------------------ round trips

@pytest.mark.parametrize("size", [100, CHUNK, 128 * CHUNK, 129 * CHUNK - 1, 256 * CHUNK,
                                  300 * CHUNK - 100])
def test_round_trip_around_page_boundaries(size):
    payload = image(size)
    data = manifest_bytes(payload)
    m = mf.parse(data)
    chunks = mf.chunk_count(size)
    table = firmware.chunk_table(payload)
    assert m.paged and m.chunk_hashes is None and m.chunk_count() == chunks
    assert m.page_hashes == b"".join(hashlib.sha256(page(p, table)).digest()
                                     for p in range(mf.page_count(chunks)))
    assert [len(page(p, table)) for p in range(mf.page_count(chunks))] == \
        [mf.page_bytes(chunks, p) for p in range(mf.page_count(chunks))]
    assert m.encode() == data and cbor2.dumps(cbor2.loads(data), canonical=True) == data
    assert "pages" in cbor2.loads(data) and "chunks" not in cbor2.loads(data)
    firmware.check_payload(m, payload)
    loaded = download(mf.ChunkVerifier(m, whole=False), chunks=split(payload), table=table)
    assert loaded == [(128 * p, p) for p in range(mf.page_count(chunks))]


def test_build_pages_by_default_over_one_page_of_chunk_hashes():
    assert not mf.parse(manifest_bytes(image(128 * CHUNK), pages=None)).paged
    assert mf.parse(manifest_bytes(image(128 * CHUNK + 1), pages=None)).paged
    assert not mf.parse(manifest_bytes(image(mf.INLINE_SIZE_MAX), pages=False)).paged
    big = mf.parse(manifest_bytes(image(mf.INLINE_SIZE_MAX + 1), pages=None))
    assert big.paged and big.chunk_count() == mf.CHUNKS_MAX + 1 and len(big.page_hashes) == 4 * 32
    with pytest.raises(firmware.FirmwareError):
        manifest_bytes(image(mf.INLINE_SIZE_MAX + 1), pages=False)


# ------------------------------------------------------------ parse: strict fields

def mutated(base=None, **changes):
    fields = cbor2.loads(base or manifest_bytes(PAYLOAD))
    for key, value in changes.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    return cbor.dumps(fields)


PAGES = cbor2.loads(manifest_bytes(PAYLOAD))["pages"]
INLINE = manifest_bytes(PAYLOAD, pages=False)


@pytest.mark.parametrize("data, code", [
    (mutated(pages=PAGES[:-1]), "chunk_count"),
    (mutated(pages=PAGES + [PAGES[0]]), "chunk_count"),
    (mutated(size=256 * CHUNK), "chunk_count"),                 # 2 pages' worth, 3 listed
    (mutated(pages=[]), "chunk_count"),
    (mutated(chunks=[hashlib.sha256(c).digest() for c in CHUNKS]), "unknown_field"),  # both
    (mutated(INLINE, pages=PAGES), "unknown_field"),
    (mutated(pages=PAGES[:2] + [PAGES[2][:31]]), "bad_field"),
    (mutated(pages=PAGES[:2] + [PAGES[2] + b"\x00"]), "bad_field"),
    (mutated(pages=PAGES[:2] + ["x" * 32]), "bad_field"),
    (mutated(pages=b"".join(PAGES)), "bad_field"),
    (mutated(pages={0: PAGES[0]}), "bad_field"),
    (mutated(INLINE, size=mf.INLINE_SIZE_MAX + 1), "bad_field"),  # the chunks form stops at 1.75 MiB
    (mutated(size=mf.SIZE_MAX + 1), "bad_field"),
    (mutated(pages=None), "missing_field"),
    (mutated(extra=1), "unknown_field"),
    (cbor2.dumps(dict(reversed(cbor2.loads(manifest_bytes(PAYLOAD)).items()))), "not_canonical"),
])
def test_parse_refusals(data, code):
    assert code_of(mf.ManifestError, mf.parse, data) == code


def test_largest_paged_size_parses_and_one_more_byte_does_not():
    pages = [b"\x07" * 32] * mf.PAGES_MAX
    assert mf.parse(mutated(size=mf.SIZE_MAX, pages=pages)).chunk_count() == mf.PAGED_CHUNKS_MAX
    assert code_of(mf.ManifestError, mf.parse, mutated(size=mf.SIZE_MAX + 1, pages=pages)) == "bad_field"


@settings(max_examples=200, deadline=None)
@given(order=st.permutations(list(cbor2.loads(manifest_bytes(PAYLOAD)))))
def test_only_the_deterministic_key_order_parses(order):
    canonical = manifest_bytes(PAYLOAD)
    fields = cbor2.loads(canonical)
    data = cbor2.dumps({k: fields[k] for k in order})
    if data == canonical:
        assert mf.parse(data).encode() == canonical
    else:
        assert code_of(mf.ManifestError, mf.parse, data) == "not_canonical"


# ------------------------------------------------------------ the download: one page at a time

def test_each_page_is_needed_before_the_chunks_it_covers():
    v = mf.ChunkVerifier(MANIFEST, whole=False)
    assert download(v) == [(0, 0), (128, 1), (256, 2)]
    assert v.finished and v.received_bytes == len(PAYLOAD) and v.page_needed() is None


def test_inline_and_read_back_verifiers_need_no_page():
    inline = mf.ChunkVerifier(mf.parse(INLINE), whole=False)
    whole = mf.ChunkVerifier(MANIFEST, whole=True)
    for v in (inline, whole):
        assert v.page_needed() is None
        assert code_of(LocalError, v.load_page, 0, page(0)) == "bad_page_use"


def failed_load(p, data, next_index=0):
    """The code load_page raises, and that the verifier is closed after it."""
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=next_index)
    code = code_of(mf.ManifestError, v.load_page, p, data)
    assert v.repair_from == p * 128
    assert v.page_needed() is None
    for call, args in ((v.load_page, (p, page(p))), (v.update, (next_index, CHUNKS[next_index])),
                       (v.finish, ())):
        assert code_of(mf.ManifestError, call, *args) == "failed"
    return code


def flipped(data, at, bit=1):
    out = bytearray(data)
    out[at] ^= bit
    return bytes(out)


@pytest.mark.parametrize("p, data, code", [
    (0, page(0)[:-1], "bad_page"),
    (0, page(0) + b"\x00", "bad_page"),
    (0, b"", "bad_page"),
    (2, page(2) + page(0)[:32], "bad_page"),                  # the short last page, made long
    (2, page(1), "bad_page"),                                 # a whole page where the short one goes
    (0, flipped(page(0), 0), "tampered_page"),
    (0, flipped(page(0), 4095, 0x80), "tampered_page"),
    (2, flipped(page(2), 100), "tampered_page"),
    (0, page(1), "tampered_page"),                            # the right length, another page
])
def test_attack_bad_pages(p, data, code):
    start = p * 128
    assert failed_load(p, data, next_index=start) == code


def test_a_page_other_than_the_needed_one_is_a_local_error():
    v = mf.ChunkVerifier(MANIFEST, whole=False)
    for p in (1, 2, -1, None, 3):
        assert code_of(LocalError, v.load_page, p, page(0)) == "bad_page_use"
    v.load_page(0, page(0))                                   # still usable
    assert code_of(LocalError, v.load_page, 0, page(0)) == "bad_page_use"   # loaded already
    assert download(v) == [(128, 1), (256, 2)]


def test_a_chunk_without_its_page_is_a_local_error():
    v = mf.ChunkVerifier(MANIFEST, whole=False)
    assert code_of(LocalError, v.update, 0, CHUNKS[0]) == "page_needed"
    v.load_page(0, page(0))
    for index in range(128):
        v.update(index, CHUNKS[index])
    assert code_of(LocalError, v.update, 128, CHUNKS[128]) == "page_needed"
    assert v.page_needed() == 1 and v.error is None
    assert download(v, start=128) == [(128, 1), (256, 2)]


@pytest.mark.parametrize("index", [0, 127, 128, 140, 255, 256, 299])
def test_attack_tampered_chunk_with_its_page_loaded(index):
    v = mf.ChunkVerifier(MANIFEST, whole=False)
    chunks = list(CHUNKS)
    chunks[index] = flipped(chunks[index], len(chunks[index]) - 1)
    with pytest.raises(mf.ManifestError) as info:
        download(v, chunks=chunks)
    assert info.value.code == "tampered_chunk" and v.repair_from == index
    assert v.next_index == index
    assert code_of(mf.ManifestError, v.update, index, CHUNKS[index]) == "failed"


def test_chunk_length_refusals_keep_their_codes_when_paged():
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=299)
    v.load_page(2, page(2))
    assert code_of(mf.ManifestError, v.update, 299, CHUNKS[299] + b"x") == "oversized"
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=299)
    v.load_page(2, page(2))
    assert code_of(mf.ManifestError, v.update, 300, b"x") == "oversized"
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=256)
    v.load_page(2, page(2))
    assert code_of(mf.ManifestError, v.update, 257, CHUNKS[257]) == "out_of_order"
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=256)
    v.load_page(2, page(2))
    assert code_of(mf.ManifestError, v.update, 256, CHUNKS[256][:-1]) == "truncated"
    assert v.repair_from == 256


def test_resume_mid_page_loads_that_page_first():
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=130)
    assert v.page_needed() == 1 and v.received_bytes == 130 * CHUNK
    assert code_of(LocalError, v.load_page, 0, page(0)) == "bad_page_use"
    assert download(v, start=130) == [(130, 1), (256, 2)]
    done = mf.ChunkVerifier(MANIFEST, whole=False, next_index=300)
    assert done.page_needed() is None
    done.finish()
    for bad in (301, -1):
        assert code_of(LocalError, mf.ChunkVerifier, MANIFEST, False, bad) == "bad_resume"


def test_a_download_that_stops_early_is_truncated():
    v = mf.ChunkVerifier(MANIFEST, whole=False)
    with pytest.raises(mf.ManifestError) as info:
        download(v, chunks=CHUNKS[:200])
    assert info.value.code == "truncated"


STEPS = st.lists(st.tuples(st.sampled_from(["next"] * 6 + ["page", "chunk", "finish"]),
                           st.sampled_from([0, 0, 1, -1, 2]), st.sampled_from([True, True, False])),
                 max_size=60)


def step(v, kind, delta, good):
    """One call on v: "next" is what an honest peer sends next; "page" and
    "chunk" are near the one needed, good or with a bit flipped."""
    if kind == "next" and v.page_needed() is not None:
        kind, delta, good = "page", 0, True
    elif kind == "next":
        kind, delta, good = ("chunk", 0, True) if v.next_index < 300 else ("finish", 0, True)
    if kind == "page":
        p = v.next_index // 128 + delta
        data = page(p) if 0 <= p < 3 else page(0)
        v.load_page(p, data if good else flipped(data, 31))
    elif kind == "chunk":
        index = v.next_index + delta
        data = CHUNKS[index] if 0 <= index < 300 else b"x" * CHUNK
        v.update(index, data if good else flipped(data, 0))
        return index, good
    else:
        v.finish()
    return None, None


@settings(max_examples=300, deadline=None)
@given(steps=STEPS, start=st.sampled_from([0, 126, 128, 130, 254, 256, 280, 290, 299]))
def test_any_sequence_of_pages_and_chunks(steps, start):
    """Pages and chunks, good or bad, near the ones needed and in any order:
    a chunk is accepted only if it is the true next one; a LocalError
    changes nothing; a ManifestError closes the verifier."""
    v = mf.ChunkVerifier(MANIFEST, whole=False, next_index=start)
    for kind, delta, good in steps:
        before = v.next_index
        try:
            index, good = step(v, kind, delta, good)
        except LocalError:
            assert v.next_index == before and v.error is None and not v.finished
        except mf.ManifestError as error:
            assert v.next_index == before
            assert error.code == "failed" or v.error is error
        else:
            if index is not None:
                assert good and index == before and v.next_index == before + 1
            if v.finished:
                assert kind in ("next", "finish")
                assert v.finished and before == 300 and v.received_bytes == len(PAYLOAD)


# ------------------------------------------------------------ the read-back: pages from the chunks

def test_read_back_passes_a_good_payload():
    index, v = read_back(MANIFEST, CHUNKS)
    assert index is None and v.finished and v.page_needed() is None


@pytest.mark.parametrize("bad, fails_at, repair_from", [
    (0, 127, 0), (127, 127, 0), (128, 255, 128), (200, 255, 128), (256, 299, 256), (299, 299, 256)])
def test_read_back_finds_a_bad_page_at_its_last_chunk(bad, fails_at, repair_from):
    chunks = list(CHUNKS)
    chunks[bad] = flipped(chunks[bad], 5)
    index, v = read_back(MANIFEST, chunks)
    assert (index, v.error.code, v.repair_from) == (fails_at, "tampered_chunk", repair_from)
    assert code_of(mf.ManifestError, v.update, index, chunks[index]) == "failed"


def test_read_back_checks_the_whole_hash_last():
    lying = mf.Manifest("sim-v1", "2.0.0", 3, MANIFEST.size, hashlib.sha256(b"other").digest(), None,
                        EXPIRES_S, "r1", MANIFEST.page_hashes)
    m = mf.parse(lying.encode())
    assert code_of(mf.ManifestError, firmware.check_payload, m, PAYLOAD) == "payload_hash"
    # every page passes first (the pages are right, only the whole hash lies)
    with pytest.raises(mf.ManifestError) as info:
        read_back(m, CHUNKS)
    assert info.value.code == "payload_hash"


def test_read_back_cannot_resume():
    assert code_of(LocalError, mf.ChunkVerifier, MANIFEST, True, 128) == "bad_resume"


@pytest.mark.parametrize("payload, code", [
    (PAYLOAD, None),
    (PAYLOAD[:-1], "truncated"),
    (PAYLOAD[:-100], "truncated"),                           # the last chunk missing
    (PAYLOAD + b"x", "oversized"),
    (PAYLOAD + b"x" * CHUNK, "oversized"),
    (flipped(PAYLOAD, 150 * CHUNK + 9), "tampered_chunk"),
    (flipped(PAYLOAD, len(PAYLOAD) - 1), "tampered_chunk"),
    (b"", "truncated"),
])
def test_check_payload_accepts_and_refuses(payload, code):
    if code is None:
        firmware.check_payload(MANIFEST, payload)
    else:
        assert code_of(mf.ManifestError, firmware.check_payload, MANIFEST, payload) == code


# ------------------------------------------------------------ the two forms agree

CHUNKS_DIFF_MAX = 3 * 128 + 3                   # past three pages, inside the chunks form
BOUNDARIES = [n * CHUNK + d for n in (1, 127, 128, 129, 256, 384) for d in (-1, 0, 1)]
SIZES = st.builds(lambda chunks, short: chunks * CHUNK - short,
                  st.integers(1, CHUNKS_DIFF_MAX), st.integers(0, CHUNK - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.one_of(SIZES, st.sampled_from(BOUNDARIES)),
       flip=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)), bit=st.integers(0, 7))
def test_inline_and_paged_forms_agree(size, flip, bit):
    payload = image(size)
    forms = [mf.parse(manifest_bytes(payload, pages)) for pages in (False, True)]
    if flip is not None:
        payload = flipped(payload, int(flip * size), 1 << bit)
    outcomes = []
    for m in forms:
        try:
            firmware.check_payload(m, payload)
            outcomes.append(None)
        except mf.ManifestError as error:
            outcomes.append(error.code)
    assert outcomes[0] == outcomes[1] == (None if flip is None else "tampered_chunk")


# ------------------------------------------------------------ fuzzing

SMALL_PAGED = manifest_bytes(image(300 * CHUNK - 100))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parse_random_bytes(data):
    try:
        mf.parse(data)
    except (mf.ManifestError, CBORError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_parse_mutated_paged_manifest(data):
    raw = bytearray(SMALL_PAGED)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    try:
        m = mf.parse(bytes(raw[:cut]))
    except (mf.ManifestError, CBORError):
        return
    assert m.encode() == bytes(raw[:cut])       # what parses is canonical


# ------------------------------------------------------------ faults found in review (fixed)

def test_read_back_repair_from_covers_the_unchecked_part_of_a_page():
    """A short read in a paged read-back: nothing of its page is checked
    yet, so the repair starts at the page's first chunk, not at the short one."""
    chunks = list(CHUNKS)
    chunks[260] = flipped(chunks[260], 0)        # not found until page 2's hash ...
    chunks[299] = chunks[299][:-1]               # ... but a short read comes first
    index, v = read_back(MANIFEST, chunks)
    assert (index, v.error.code) == (299, "truncated")
    assert v.repair_from == 256


def test_load_page_none_is_a_local_error():
    v = mf.ChunkVerifier(MANIFEST, whole=True)
    assert code_of(LocalError, v.load_page, None, b"") == "bad_page_use"
