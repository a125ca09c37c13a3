# The base of small value classes (events, actions, packets): the fields are
# the class's __slots__; two values are equal when type and fields are.


class Value:
    __slots__ = ()

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (n, getattr(self, n)) for n in self.__slots__))

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __ne__(self, other):  # MicroPython does not derive it from __eq__
        return not self.__eq__(other)
