"""The canonical byte encoding secure-aggregation messages and signed payloads use.

Big-endian, length-prefixed, no optional fields: a value has exactly one encoding, so
signatures and digests over encodings are well defined. Strings are UTF-8 with a 2-byte
length, byte strings and lists have a 4-byte length or count, integers are 8 bytes
unsigned, floats IEEE-754 binary64. A :class:`Reader` refuses truncated input and
trailing bytes with ``SecAggError(reason="malformed")``.
"""

from __future__ import annotations

import struct

from fedcore.errors import SecAggError

MAGIC = b"FGSA"
VERSION = 1
MAX_STR = 0xFFFF
MAX_BYTES = 0xFFFFFFFF


class Writer:
    """Appends canonical fields to a buffer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def header(self, kind: int) -> Writer:
        """The magic, format version and message ``kind``."""
        self._parts.append(MAGIC + bytes([VERSION, kind]))
        return self

    def u8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">B", value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def f64(self, value: float) -> Writer:
        self._parts.append(struct.pack(">d", value))
        return self

    def text(self, value: str) -> Writer:
        raw = value.encode("utf-8")
        if len(raw) > MAX_STR:
            raise SecAggError("malformed", f"string of {len(raw)} bytes is too long")
        self._parts.append(struct.pack(">H", len(raw)) + raw)
        return self

    def blob(self, value: bytes) -> Writer:
        if len(value) > MAX_BYTES:
            raise SecAggError("malformed", f"byte string of {len(value)} bytes is too long")
        self._parts.append(struct.pack(">I", len(value)))
        self._parts.append(bytes(value))
        return self

    def count(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def texts(self, values: tuple[str, ...]) -> Writer:
        self.count(len(values))
        for v in values:
            self.text(v)
        return self

    def finish(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads canonical fields back, refusing truncated or trailing data."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._data):
            raise SecAggError("malformed", f"{self._what}: truncated at byte {self._pos}")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def header(self, kind: int) -> Reader:
        head = bytes(self._take(len(MAGIC) + 2))
        if head[: len(MAGIC)] != MAGIC or head[len(MAGIC)] != VERSION:
            raise SecAggError("malformed", f"{self._what}: not a secagg v{VERSION} message")
        if head[-1] != kind:
            raise SecAggError("malformed", f"{self._what}: message kind {head[-1]}, not {kind}")
        return self

    def u8(self) -> int:
        return int(self._take(1)[0])

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise SecAggError("malformed", f"{self._what}: flag byte {value} is not 0 or 1")
        return value == 1

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value

    def f64(self) -> float:
        value: float = struct.unpack(">d", self._take(8))[0]
        return value

    def text(self) -> str:
        (n,) = struct.unpack(">H", self._take(2))
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise SecAggError("malformed", f"{self._what}: string is not UTF-8") from None

    def blob(self) -> bytes:
        (n,) = struct.unpack(">I", self._take(4))
        return bytes(self._take(n))

    def count(self) -> int:
        (n,) = struct.unpack(">I", self._take(4))
        # every element takes at least 2 bytes: refuse counts the data cannot hold
        if n * 2 > len(self._data) - self._pos:
            raise SecAggError("malformed", f"{self._what}: count {n} exceeds the data")
        return int(n)

    def texts(self) -> tuple[str, ...]:
        return tuple(self.text() for _ in range(self.count()))

    def end(self) -> None:
        if self._pos != len(self._data):
            extra = len(self._data) - self._pos
            raise SecAggError("malformed", f"{self._what}: {extra} trailing bytes")
