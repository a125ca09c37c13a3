# Deterministic CBOR (RFC 8949 section 4.2.1) for the agent core.
#
# Runs unchanged on MicroPython and CPython. dumps() writes the core
# deterministic encoding: shortest heads, definite lengths, map keys sorted
# by the bytewise order of their encoded form, floats in the shortest of
# float16/32/64 that holds the value exactly (NaN as f97e00).
#
# loads() is strict: anything outside this profile raises CBORError. It
# accepts floats wider than needed and unsorted map keys (neither changes
# the decoded value), so it is not a canonical-form checker.

import math
import struct

from agent.errors import CBORError

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

DEPTH_MAX = const(16)  # nested arrays/maps; the top-level container is 1

_MAJOR_UINT = const(0)
_MAJOR_NEGINT = const(1)
_MAJOR_BYTES = const(2)
_MAJOR_TEXT = const(3)
_MAJOR_ARRAY = const(4)
_MAJOR_MAP = const(5)
_MAJOR_TAG = const(6)
_MAJOR_SIMPLE = const(7)

_UINT64_END = 1 << 64
_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]  # from bits: no parsing doubt
_INF = float("inf")
_NAN = float("nan")
# smallest argument that needs additional info 24, 25, 26, 27
_ARG_MIN = (24, 0x100, 0x10000, 0x100000000)
_SIMPLE = {20: False, 21: True, 22: None}


# ---------------------------------------------------------------- encoding

def dumps(obj):
    """Encode obj as deterministic CBOR bytes; CBORError if it cannot."""
    out = bytearray()
    _encode(out, obj, 0)
    return bytes(out)


def _encode(out, obj, depth):
    # bool first: it is an int subclass on CPython (but not on MicroPython)
    if obj is None:
        out.append(0xF6)
    elif obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif isinstance(obj, int):
        _encode_int(out, obj)
    elif isinstance(obj, float):
        _encode_float(out, obj)
    elif isinstance(obj, (bytes, bytearray)):
        _head(out, _MAJOR_BYTES, len(obj))
        out.extend(obj)
    elif isinstance(obj, str):
        _encode_text(out, obj)
    elif isinstance(obj, (list, tuple)):
        _encode_array(out, obj, _deeper(depth))
    elif isinstance(obj, dict):
        _encode_map(out, obj, _deeper(depth))
    else:
        raise CBORError("cannot encode type %s" % type(obj).__name__)


def _deeper(depth):
    depth += 1
    if depth > DEPTH_MAX:
        raise CBORError("nesting deeper than %d" % DEPTH_MAX)
    return depth


def _head(out, major, n):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.extend(struct.pack(">BH", mt | 25, n))
    elif n < 0x100000000:
        out.extend(struct.pack(">BI", mt | 26, n))
    else:
        out.extend(struct.pack(">BQ", mt | 27, n))


def _encode_int(out, n):
    major = _MAJOR_UINT
    if n < 0:
        major, n = _MAJOR_NEGINT, -1 - n
    if n >= _UINT64_END:
        raise CBORError("integer does not fit in 64 bits")
    _head(out, major, n)


def _encode_text(out, text):
    try:
        raw = text.encode("utf-8")
    except UnicodeError:
        raise CBORError("text is not encodable as UTF-8")
    _head(out, _MAJOR_TEXT, len(raw))
    out.extend(raw)


def _encode_array(out, items, depth):
    _head(out, _MAJOR_ARRAY, len(items))
    for item in items:
        _encode(out, item, depth)


def _encode_map(out, mapping, depth):
    pairs = []
    for key in mapping:
        pairs.append((_encode_key(key), mapping[key]))
    pairs.sort(key=_first)
    _head(out, _MAJOR_MAP, len(pairs))
    for key_bytes, value in pairs:
        out.extend(key_bytes)
        _encode(out, value, depth)


def _first(pair):
    return pair[0]


def _encode_key(key):
    if type(key) is not int and type(key) is not str:
        raise CBORError("map key must be int or text, not %s" % type(key).__name__)
    out = bytearray()
    _encode(out, key, 0)
    return bytes(out)


def _encode_float(out, x):
    if x != x:
        out.extend(b"\xf9\x7e\x00")
        return
    half = _half_bits(x)
    if half is not None:
        out.extend(struct.pack(">BH", 0xF9, half))
    elif abs(x) <= _FLOAT32_MAX and struct.unpack(">f", struct.pack(">f", x))[0] == x:
        out.extend(struct.pack(">Bf", 0xFA, x))
    else:
        out.extend(struct.pack(">Bd", 0xFB, x))


def _half_bits(x):
    """IEEE 754 binary16 bits of x if x is exactly a float16, else None."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    x = abs(x)
    if x == 0 or x == _INF:
        return sign | (0x7C00 if x else 0)
    mantissa, exp = math.frexp(x)  # x = mantissa * 2**exp, 0.5 <= mantissa < 1
    if exp > 16:
        return None
    if exp >= -13:  # normal: 11 significant bits, biased exponent exp + 14
        sig = math.ldexp(mantissa, 11)
        if sig != int(sig):
            return None
        return sign | ((exp + 14) << 10) | (int(sig) - 1024)
    steps = math.ldexp(x, 24)  # subnormal: a multiple of 2**-24
    if steps != int(steps):
        return None
    return sign | int(steps)


def _half_value(bits):
    exp = (bits >> 10) & 0x1F
    frac = bits & 0x3FF
    if exp == 0:
        x = math.ldexp(frac, -24)
    elif exp == 31:
        x = _NAN if frac else _INF
    else:
        x = math.ldexp(frac + 1024, exp - 25)
    return -x if bits & 0x8000 else x


# ---------------------------------------------------------------- decoding

def loads(data):
    """Decode one CBOR item that must fill data exactly; CBORError if not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CBORError("cannot decode type %s" % type(data).__name__)
    reader = _Reader(data)
    value = _decode(reader, 0)
    if reader.remaining():
        raise CBORError("%d trailing bytes at offset %d" % (reader.remaining(), reader.pos))
    return value


class _Reader:
    """A position in the input; every read is bounds-checked first."""

    def __init__(self, data):
        self.buf = memoryview(data)
        self.pos = 0

    def remaining(self):
        return len(self.buf) - self.pos

    def take(self, n):
        if n > self.remaining():
            raise CBORError("truncated: need %d bytes at offset %d, have %d"
                            % (n, self.pos, self.remaining()))
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def byte(self):
        value = self.peek()
        self.pos += 1
        return value

    def peek(self):
        if not self.remaining():
            raise CBORError("truncated: need 1 byte at offset %d" % self.pos)
        return self.buf[self.pos]


def _decode(reader, depth):
    initial = reader.byte()
    major = initial >> 5
    info = initial & 0x1F
    if major == _MAJOR_SIMPLE:
        return _decode_simple(reader, info)
    if major == _MAJOR_TAG:
        raise CBORError("tags are not accepted (offset %d)" % (reader.pos - 1))
    n = _read_argument(reader, info)
    if major == _MAJOR_UINT:
        return n
    if major == _MAJOR_NEGINT:
        return -1 - n
    if major == _MAJOR_BYTES:
        return bytes(reader.take(n))
    if major == _MAJOR_TEXT:
        return _decode_text(reader.take(n))
    if major == _MAJOR_ARRAY:
        return _decode_array(reader, n, _deeper(depth))
    return _decode_map(reader, n, _deeper(depth))


def _read_argument(reader, info):
    if info < 24:
        return info
    if info == 31:
        raise CBORError("indefinite length is not accepted (offset %d)" % (reader.pos - 1))
    if info > 27:
        raise CBORError("reserved additional information %d" % info)
    start = reader.pos - 1
    n = int.from_bytes(reader.take(1 << (info - 24)), "big")
    if n < _ARG_MIN[info - 24]:
        raise CBORError("non-shortest encoding of %d (offset %d)" % (n, start))
    return n


def _decode_simple(reader, info):
    if info in _SIMPLE:
        return _SIMPLE[info]
    if info == 25:
        return _half_value(int.from_bytes(reader.take(2), "big"))
    if info == 26:
        return struct.unpack(">f", reader.take(4))[0]
    if info == 27:
        return struct.unpack(">d", reader.take(8))[0]
    if info == 31:
        raise CBORError("unexpected break (offset %d)" % (reader.pos - 1))
    if info > 27:
        raise CBORError("reserved additional information %d" % info)
    if info == 24:
        info = reader.byte()  # a simple value in the following byte
    raise CBORError("simple value %d is not accepted" % info)


def _decode_array(reader, n, depth):
    if n > reader.remaining():  # each item takes at least one byte
        raise CBORError("truncated: array of %d items cannot fit in %d bytes"
                        % (n, reader.remaining()))
    items = []
    for _ in range(n):
        items.append(_decode(reader, depth))
    return items


def _decode_map(reader, n, depth):
    if 2 * n > reader.remaining():  # each pair takes at least two bytes
        raise CBORError("truncated: map of %d pairs cannot fit in %d bytes"
                        % (n, reader.remaining()))
    result = {}
    for _ in range(n):
        if (reader.peek() >> 5) not in (_MAJOR_UINT, _MAJOR_NEGINT, _MAJOR_TEXT):
            raise CBORError("map key must be int or text (offset %d)" % reader.pos)
        key = _decode(reader, depth)
        if key in result:
            raise CBORError("duplicate map key %r" % (key,))
        result[key] = _decode(reader, depth)
    return result


def _decode_text(raw):
    _check_utf8(raw)
    try:
        return str(raw, "utf-8")
    except UnicodeError:
        raise CBORError("invalid UTF-8 in text")


def _check_utf8(raw):
    """Reject what RFC 3629 forbids; MicroPython's decoder lets some through
    (overlong forms, surrogates)."""
    i = 0
    end = len(raw)
    while i < end:
        lead = raw[i]
        if lead < 0x80:
            i += 1
            continue
        count, low, high = _utf8_lead(lead)
        if i + count >= end:
            raise CBORError("invalid UTF-8: truncated sequence")
        for j in range(1, count + 1):
            if not low <= raw[i + j] <= high:
                raise CBORError("invalid UTF-8: bad continuation byte")
            low, high = 0x80, 0xBF
        i += count + 1


def _utf8_lead(lead):
    """(continuation bytes, range of the first continuation byte)."""
    if 0xC2 <= lead <= 0xDF:
        return 1, 0x80, 0xBF
    if lead == 0xE0:
        return 2, 0xA0, 0xBF  # no overlong forms
    if lead == 0xED:
        return 2, 0x80, 0x9F  # no surrogates
    if 0xE1 <= lead <= 0xEF:
        return 2, 0x80, 0xBF
    if lead == 0xF0:
        return 3, 0x90, 0xBF  # no overlong forms
    if 0xF1 <= lead <= 0xF3:
        return 3, 0x80, 0xBF
    if lead == 0xF4:
        return 3, 0x80, 0x8F  # nothing above U+10FFFF
    raise CBORError("invalid UTF-8: bad lead byte 0x%02x" % lead)
