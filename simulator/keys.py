"""A compact set of (epoch, seq) keys: one bit per seq, per epoch. A device
acknowledging an hour of 1 Hz records costs about 450 bytes, not 36,000
tuples, so ten thousand simulated devices stay small."""


class KeySet:
    def __init__(self):
        self._bits = {}   # epoch -> bytearray
        self._count = 0

    def add(self, key):
        epoch, seq = key
        bits = self._bits.get(epoch)
        if bits is None:
            bits = self._bits[epoch] = bytearray()
        byte, bit = divmod(seq, 8)
        if byte >= len(bits):
            bits.extend(bytes(byte - len(bits) + 1 + len(bits) // 2))
        if not bits[byte] >> bit & 1:
            bits[byte] |= 1 << bit
            self._count += 1

    def __contains__(self, key):
        bits = self._bits.get(key[0])
        byte, bit = divmod(key[1], 8)
        return bits is not None and byte < len(bits) and bool(bits[byte] >> bit & 1)

    def __len__(self):
        return self._count

    def __iter__(self):
        for epoch in sorted(self._bits):
            bits = self._bits[epoch]
            for byte, value in enumerate(bits):
                if value:
                    for bit in range(8):
                        if value >> bit & 1:
                            yield (epoch, byte * 8 + bit)

    def to_set(self):
        return set(self)
