"""CBOR for CPython boards: the C library cbor2 in its deterministic mode.
The portable agent.cbor gives the same bytes (tests/test_cbor.py proves it);
this one is faster where cbor2 exists."""

import cbor2


class Cbor2Codec:
    @staticmethod
    def dumps(obj):
        return cbor2.dumps(obj, canonical=True)

    @staticmethod
    def loads(data):
        return cbor2.loads(data)


CODEC = Cbor2Codec()
