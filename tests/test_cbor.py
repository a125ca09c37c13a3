"""agent.cbor: differential against cbor2, round trips, a fuzz invariant, and
one test per rejection class.

cbor2.dumps(x, canonical=True) is the reference encoder, with one known
difference from RFC 8949 section 4.2.1, kept visible in
test_cbor2_sorts_map_keys_length_first rather than hidden: cbor2 sorts map
keys length-first (the old RFC 7049 section 3.9 "canonical" order), 4.2.1
sorts them bytewise. The two orders agree whenever all keys are text, or all
are non-negative ints, so the differential tests use text-keyed maps and the
int-keyed ones are checked against the RFC's rule directly.
"""

import math
import struct

import cbor2
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from agent import cbor
from agent.errors import CBORError

UINT64_MAX = 2**64 - 1

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-UINT64_MAX - 1, UINT64_MAX)
    | st.integers(-(2**33), 2**33)  # the boundaries of the short heads, more often
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=20)
)


def _containers(children, keys):
    return st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6)


values = st.recursive(scalars, lambda kids: _containers(kids, st.text(max_size=8)), max_leaves=24)
keys = st.integers(-UINT64_MAX - 1, UINT64_MAX) | st.integers(-30, 300) | st.text(max_size=6)
int_keyed = st.recursive(scalars, lambda kids: _containers(kids, keys), max_leaves=24)


def depth(x):
    """Containers nested in x, counting x itself."""
    if isinstance(x, list):
        return 1 + max([depth(item) for item in x] + [0])
    if isinstance(x, dict):
        return 1 + max([depth(item) for item in x.values()] + [0])
    return 0


def same(a, b):
    """Equal, and of the same types; floats bit for bit, any NaN equals any NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def h(text):
    return bytes.fromhex(text.replace(" ", ""))


def head(major, n):
    """A CBOR head written independently of agent.cbor (RFC 8949 3)."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 256**size:
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


# ------------------------------------------------------------ differential

@settings(max_examples=400, deadline=None)
@given(values)
def test_matches_cbor2_canonical_and_round_trips(x):
    assume(depth(x) <= cbor.DEPTH_MAX)
    encoded = cbor.dumps(x)
    assert encoded == cbor2.dumps(x, canonical=True)
    assert same(cbor.loads(encoded), x)


@settings(max_examples=500, deadline=None)
@given(st.floats())
@example(0.0)
@example(-0.0)
@example(5.960464477539063e-08)  # smallest float16 subnormal
@example(6.097555160522461e-05)  # largest float16 subnormal
@example(65504.0)  # largest float16
@example(65520.0)  # rounds to inf in float16, so float32
@example(1e-45)  # not a float32 subnormal (1.401298464324817e-45 is)
@example(1.401298464324817e-45)
@example(3.4028234663852886e38)  # largest float32
@example(3.4028235677973366e38)  # just above it
@example(5e-324)
def test_floats_match_cbor2_canonical(x):
    encoded = cbor.dumps(x)
    assert encoded == cbor2.dumps(x, canonical=True)
    assert same(cbor.loads(encoded), x)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_float32_value_takes_at_most_five_bytes(bits):
    x = struct.unpack(">f", struct.pack(">I", bits))[0]
    encoded = cbor.dumps(x)
    assert len(encoded) <= 5
    assert encoded == cbor2.dumps(x, canonical=True)
    assert same(cbor.loads(encoded), x)


def test_float16_by_hand_matches_struct_e_for_all_65536_patterns():
    for bits in range(1 << 16):
        raw = struct.pack(">H", bits)
        reference = struct.unpack(">e", raw)[0]
        assert same(cbor.loads(b"\xf9" + raw), reference), hex(bits)
        if not math.isnan(reference):
            assert cbor.dumps(reference) == b"\xf9" + raw, hex(bits)


@pytest.mark.parametrize("nan_bits", ["7ff8000000000000", "fff8000000000000", "7ff0000000000001",
                                      "7fffffffffffffff"])
def test_every_nan_encodes_as_f97e00_like_cbor2(nan_bits):
    nan = struct.unpack(">d", h(nan_bits))[0]
    assert cbor.dumps(nan) == h("f97e00") == cbor2.dumps(nan, canonical=True)


def test_cbor2_sorts_map_keys_length_first():
    # RFC 8949 4.2.1: bytewise order of the encoded keys. 24 is 18 18, -1 is 20:
    # 0x18 < 0x20, so 24 comes first. cbor2 (canonical=True) puts the shorter
    # encoding first instead (RFC 7049 3.9). Likewise 1000 (19 03 e8) and "a" (61 61).
    assert cbor.dumps({-1: 0, 24: 0}) == h("a2 1818 00 20 00")
    assert cbor2.dumps({-1: 0, 24: 0}, canonical=True) == h("a2 20 00 1818 00")
    assert cbor.dumps({"a": 0, 1000: 0}) == h("a2 1903e8 00 6161 00")
    assert cbor2.dumps({"a": 0, 1000: 0}, canonical=True) == h("a2 6161 00 1903e8 00")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, st.integers(0, 30), max_size=10))
def test_map_keys_sorted_bytewise_by_encoded_form(mapping):
    pairs = sorted((cbor.dumps(k), cbor.dumps(v)) for k, v in mapping.items())
    assert cbor.dumps(mapping) == head(5, len(mapping)) + b"".join(k + v for k, v in pairs)


@settings(max_examples=300, deadline=None)
@given(int_keyed)
def test_int_keyed_values_round_trip_and_cbor2_reads_them(x):
    assume(depth(x) <= cbor.DEPTH_MAX)
    encoded = cbor.dumps(x)
    assert same(cbor.loads(encoded), x)
    assert same(cbor2.loads(encoded), x)


def test_tuples_and_bytearrays_encode_like_lists_and_bytes():
    assert cbor.dumps((1, (2,))) == cbor.dumps([1, [2]]) == h("82 01 81 02")
    assert cbor.dumps(bytearray(b"ab")) == cbor.dumps(b"ab") == h("42 6162")


@pytest.mark.parametrize("n, encoded", [
    (0, "00"), (23, "17"), (24, "1818"), (255, "18ff"), (256, "190100"),
    (65535, "19ffff"), (65536, "1a00010000"), (2**32 - 1, "1affffffff"),
    (2**32, "1b0000000100000000"), (UINT64_MAX, "1bffffffffffffffff"),
    (-1, "20"), (-24, "37"), (-25, "3818"), (-(2**64), "3bffffffffffffffff"),
])
def test_integer_heads(n, encoded):
    assert cbor.dumps(n) == h(encoded)
    assert cbor.loads(h(encoded)) == n


def test_nesting_of_exactly_depth_max_is_accepted():
    deep = []
    for _ in range(cbor.DEPTH_MAX - 1):
        deep = [deep]
    assert cbor.dumps(deep) == h("81" * (cbor.DEPTH_MAX - 1) + "80")
    assert cbor.loads(cbor.dumps(deep)) == deep


# ------------------------------------------------------------ fuzz invariant

def loads_or_cbor_error(data):
    """The invariant: a value, or CBORError; nothing else ever escapes."""
    try:
        return True, cbor.loads(data)
    except CBORError:
        return False, None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_cbor_error(data):
    ok, value = loads_or_cbor_error(data)
    if ok:  # anything we accept, cbor2 reads the same way
        assert same(cbor2.loads(data), value)


@settings(max_examples=400, deadline=None)
@given(values, st.data())
def test_mutated_encodings_decode_or_raise_cbor_error(x, data):
    assume(depth(x) <= cbor.DEPTH_MAX)
    encoded = bytearray(cbor.dumps(x))
    at = data.draw(st.integers(0, len(encoded) - 1))
    encoded[at] = data.draw(st.integers(0, 255))
    ok, value = loads_or_cbor_error(bytes(encoded))
    if ok:
        assert same(cbor2.loads(bytes(encoded)), value)


@settings(max_examples=200, deadline=None)
@given(values)
def test_every_strict_prefix_of_a_valid_encoding_is_rejected(x):
    assume(depth(x) <= cbor.DEPTH_MAX)
    encoded = cbor.dumps(x)
    for end in range(len(encoded)):
        with pytest.raises(CBORError):
            cbor.loads(encoded[:end])


# bytes at the edges of the RFC 3629 ranges, so short random runs hit them
UTF8_EDGES = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF,
              0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
utf8_candidates = (
    st.binary(max_size=12)
    | st.text(max_size=6).map(lambda s: s.encode("utf-8"))
    | st.lists(st.sampled_from(UTF8_EDGES), min_size=1, max_size=4).map(bytes)
)


@settings(max_examples=500, deadline=None)
@given(utf8_candidates)
@example(b"\xed\xa0\x80")  # surrogate U+D800
@example(b"\xed\x9f\xbf")  # U+D7FF, just below
@example(b"\xc0\x80")  # overlong NUL
@example(b"\xc1\xbf")  # overlong U+007F
@example(b"\xe0\x9f\xbf")  # overlong U+07FF
@example(b"\xf0\x8f\xbf\xbf")  # overlong U+FFFF
@example(b"\xf4\x8f\xbf\xbf")  # U+10FFFF
@example(b"\xf4\x90\x80\x80")  # just above
def test_utf8_check_agrees_with_cpython_strict_decoder(raw):
    # The hand-written check is what protects MicroPython, whose decoder
    # lets overlong forms and surrogates through; test it on its own too.
    item = head(3, len(raw)) + raw
    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(CBORError, match="UTF-8"):
            cbor._check_utf8(raw)
        with pytest.raises(CBORError, match="UTF-8"):
            cbor.loads(item)
    else:
        cbor._check_utf8(raw)
        assert cbor.loads(item) == expected


# ------------------------------------------------------------ rejections

REJECTED = {
    "empty": ("", "truncated"),
    "trailing byte": ("00 00", "trailing"),
    "trailing after map": ("a0 f6", "trailing"),
    "truncated uint8 argument": ("18", "truncated"),
    "truncated uint16 argument": ("19 00", "truncated"),
    "truncated uint64 argument": ("1b 00 00 00 00 00 00 01", "truncated"),
    "truncated text": ("62 61", "truncated"),
    "truncated array": ("82 01", "truncated"),
    "truncated map value": ("a1 61 61", "truncated"),
    "truncated float32": ("fa 00 00", "truncated"),
    "truncated float64": ("fb 3f f0 00 00", "truncated"),
    "indefinite bytes": ("5f 41 00 ff", "indefinite"),
    "indefinite text": ("7f 61 61 ff", "indefinite"),
    "indefinite array": ("9f ff", "indefinite"),
    "indefinite map": ("bf ff", "indefinite"),
    "indefinite uint": ("1f", "indefinite"),
    "lone break": ("ff", "break"),
    "tag 0 (date)": ("c0 60", "tag"),
    "tag 2 (bignum)": ("c2 41 01", "tag"),
    "tag 55799 (self-describe)": ("d9 d9 f7 00", "tag"),
    "simple 0": ("e0", "simple value 0"),
    "simple 19": ("f3", "simple value 19"),
    "undefined": ("f7", "simple value 23"),
    "simple 32 (one-byte form)": ("f8 20", "simple value 32"),
    "simple 255 (one-byte form)": ("f8 ff", "simple value 255"),
    "reserved ai 28 (uint)": ("1c", "reserved"),
    "reserved ai 29 (bytes)": ("5d", "reserved"),
    "reserved ai 30 (map)": ("be", "reserved"),
    "reserved ai 28 (simple)": ("fc", "reserved"),
    "non-shortest 23 in uint8": ("18 17", "non-shortest"),
    "non-shortest 255 in uint16": ("19 00 ff", "non-shortest"),
    "non-shortest 65535 in uint32": ("1a 00 00 ff ff", "non-shortest"),
    "non-shortest 2^32-1 in uint64": ("1b 00 00 00 00 ff ff ff ff", "non-shortest"),
    "non-shortest negative": ("38 00", "non-shortest"),
    "non-shortest bytes length": ("58 00", "non-shortest"),
    "non-shortest text length": ("79 00 01 61", "non-shortest"),
    "non-shortest array length": ("98 00", "non-shortest"),
    "non-shortest map length": ("b8 00", "non-shortest"),
    "duplicate text key": ("a2 61 61 00 61 61 01", "duplicate"),
    "duplicate int key": ("a2 01 00 01 01", "duplicate"),
    "null key": ("a1 f6 00", "map key"),
    "bool key": ("a1 f5 00", "map key"),
    "float key": ("a1 f9 3c 00 00", "map key"),
    "bytes key": ("a1 41 61 00", "map key"),
    "array key": ("a1 80 00", "map key"),
    "map key": ("a1 a0 00", "map key"),
    "17 nested arrays": ("81" * 16 + "80", "nesting"),
    "17 nested maps": ("a1 61 61" * 16 + "a0", "nesting"),
    "bytes longer than input": ("5a ff ff ff ff 00", "truncated"),
    "text longer than input": ("7b 00 00 00 01 00 00 00 00 61", "truncated"),
    "array longer than input": ("9b 00 00 00 01 00 00 00 00 00", "truncated: array"),
    "map longer than input": ("bb 7f ff ff ff ff ff ff ff 01 02", "truncated: map"),
    "map needing 2 bytes per pair": ("a2 01 02 03", "truncated: map"),
    "UTF-8 bad lead byte": ("61 ff", "UTF-8"),
    "UTF-8 lone continuation": ("61 80", "UTF-8"),
    "UTF-8 overlong NUL": ("62 c0 80", "UTF-8"),
    "UTF-8 overlong 3-byte": ("63 e0 80 af", "UTF-8"),
    "UTF-8 surrogate": ("63 ed a0 80", "UTF-8"),
    "UTF-8 above U+10FFFF": ("64 f4 90 80 80", "UTF-8"),
    "UTF-8 truncated sequence": ("62 e2 82", "UTF-8"),
}


@pytest.mark.parametrize("encoded, message", list(REJECTED.values()), ids=list(REJECTED))
def test_loads_rejects(encoded, message):
    with pytest.raises(CBORError, match=message) as info:
        cbor.loads(h(encoded))
    assert info.value.code == "cbor"


def test_huge_declared_lengths_fail_fast_without_allocating():
    for encoded in ("5b ff ff ff ff ff ff ff ff", "9b ff ff ff ff ff ff ff ff",
                    "bb ff ff ff ff ff ff ff ff"):
        with pytest.raises(CBORError):
            cbor.loads(h(encoded))


def test_loads_rejects_non_bytes():
    with pytest.raises(CBORError, match="cannot decode"):
        cbor.loads("a0")


def test_loads_accepts_memoryview_and_bytearray():
    assert cbor.loads(memoryview(h("82 01 02"))) == [1, 2]
    assert cbor.loads(bytearray(h("a1 61 61 01"))) == {"a": 1}


def _nested(n):
    x = []
    for _ in range(n - 1):
        x = [x]
    return x


NOT_ENCODABLE = {
    "int 2^64": (2**64, "64 bits"),
    "int -2^64-1": (-(2**64) - 1, "64 bits"),
    "set": ({1}, "cannot encode type set"),
    "object": (object(), "cannot encode type object"),
    "complex": (1j, "cannot encode type complex"),
    "tuple key": ({(1,): 0}, "map key"),
    "bool key": ({True: 0}, "map key"),
    "float key": ({1.5: 0}, "map key"),
    "None key": ({None: 0}, "map key"),
    "bytes key": ({b"a": 0}, "map key"),
    "17 nested lists": (_nested(17), "nesting"),
    "lone surrogate": ("\ud800", "UTF-8"),
}


@pytest.mark.parametrize("value, message", list(NOT_ENCODABLE.values()), ids=list(NOT_ENCODABLE))
def test_dumps_rejects(value, message):
    with pytest.raises(CBORError, match=message):
        cbor.dumps(value)


def test_self_referencing_list_hits_the_depth_limit():
    loop = []
    loop.append(loop)
    with pytest.raises(CBORError, match="nesting"):
        cbor.dumps(loop)


def test_accepts_but_does_not_require_preferred_floats_or_sorted_keys():
    # Not rejection classes: the value is unchanged, and cbor2 without
    # canonical=True writes float64 and insertion-ordered keys.
    assert cbor.loads(h("fb 3f f8 00 00 00 00 00 00")) == 1.5
    assert cbor.loads(h("a2 61 62 01 61 61 02")) == {"a": 2, "b": 1}
