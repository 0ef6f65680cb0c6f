"""Just enough of the protobuf wire format to read Caffe and ONNX model files, without the protobuf library.

A message is a sequence of ``tag value`` fields, ``tag = field_number << 3 | wire_type``.
Repeated numbers may arrive packed or not, and a parser must accept both.
Nothing here knows a schema: caffe.py and onnx.py name the field numbers they ask for.
A ``Message`` records where each field lies in the file's one buffer, so large blobs are never copied
until asked for. docs/model-internals.md lists the wire types.
"""

from __future__ import annotations

import struct
import sys
from array import array

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types (3 and 4, groups, are deprecated and unused here)
_FIXED_SIZE = {I64: 8, I32: 4}


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or not protobuf at all)."""


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; return (value as unsigned, position after it)."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes ending at byte {pos}")


def signed64(value: int) -> int:
    """An int32/int64 field's varint as a signed number (negative values are 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


class Message:
    """The fields of one message, parsed shallowly: nested messages are parsed when asked for.

    ``fields[number]`` lists (wire_type, a, b) in file order: for a varint, a is its value; otherwise
    [a, b) is where the field's payload lies in ``buf`` (the whole file), so errors can say where the
    damage is and nothing is copied until asked for.
    """

    def __init__(self, buf: memoryview | bytes | bytearray, start: int = 0, end: int | None = None):
        buf = buf if isinstance(buf, memoryview) else memoryview(buf)
        end = len(buf) if end is None else end
        self.buf, self.start, self.end = buf, start, end
        self.fields: dict[int, list[tuple[int, int, int]]] = {}
        pos = start
        while pos < end:
            field_start = pos
            key, pos = read_varint(buf, pos, end)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise WireError(f"field number 0 at byte {field_start}: not a protobuf message")
            if wire_type == VARINT:
                value, pos = read_varint(buf, pos, end)
                entry = (VARINT, value, 0)
            elif wire_type in (LEN, I32, I64):
                if wire_type == LEN:
                    size, pos = read_varint(buf, pos, end)
                else:
                    size = _FIXED_SIZE[wire_type]
                if pos + size > end:
                    raise WireError(
                        f"field {number} at byte {field_start} needs {size:,} bytes, but only {end - pos:,} "
                        "remain: truncated, or not a protobuf message"
                    )
                entry, pos = (wire_type, pos, pos + size), pos + size
            else:  # groups (3, 4) are long deprecated and used by neither format; 6 and 7 do not exist
                raise WireError(f"unsupported wire type {wire_type} at byte {field_start}: not a protobuf message")
            self.fields.setdefault(number, []).append(entry)

    def __contains__(self, number: int) -> bool:
        return number in self.fields

    def _last(self, number: int, wire_type: int, what: str) -> tuple[int, int, int] | None:
        entries = self.fields.get(number)
        if not entries:
            return None
        entry = entries[-1]  # proto semantics: the last occurrence of a singular field wins
        if entry[0] != wire_type:
            raise WireError(f"field {number} (at bytes {self.start}-{self.end}) is not {what}")
        return entry

    # Singular fields; ``default`` when absent.

    def varint(self, number: int, default: int | None = None) -> int | None:
        entry = self._last(number, VARINT, "a varint")
        return default if entry is None else signed64(entry[1])

    def float32(self, number: int, default: float | None = None) -> float | None:
        entry = self._last(number, I32, "a 32-bit float")
        return default if entry is None else struct.unpack("<f", self.buf[entry[1] : entry[2]])[0]

    def bytes(self, number: int) -> memoryview | None:
        entry = self._last(number, LEN, "length-delimited")
        return None if entry is None else self.buf[entry[1] : entry[2]]

    def string(self, number: int, default: str | None = None) -> str | None:
        value = self.bytes(number)
        return default if value is None else _text(value, number)

    def message(self, number: int) -> Message | None:
        entry = self._last(number, LEN, "a nested message")
        return None if entry is None else Message(self.buf, entry[1], entry[2])

    # Repeated fields.

    def messages(self, number: int) -> list[Message]:
        return [Message(self.buf, a, b) for a, b in self._payloads(number, "a nested message")]

    def strings(self, number: int) -> list[str]:
        return [_text(self.buf[a:b], number) for a, b in self._payloads(number, "a string")]

    def varints(self, number: int) -> list[int]:
        """A repeated integer field, packed or not, as signed numbers (int32/int64)."""
        out = []
        for wire_type, a, b in self.fields.get(number, ()):
            if wire_type == VARINT:
                out.append(signed64(a))
            elif wire_type == LEN:  # packed: varints back to back
                while a < b:
                    item, a = read_varint(self.buf, a, b)
                    out.append(signed64(item))
            else:
                raise WireError(f"field {number} (at bytes {a}-{b}) is not a list of varints")
        return out

    def floats(self, number: int) -> array:
        """A repeated float field, packed or not, as array('f'): one copy, native byte order."""
        return self._fixed_array(number, "f", I32)

    def doubles(self, number: int) -> array:
        """A repeated double field, packed or not, as array('d')."""
        return self._fixed_array(number, "d", I64)

    def count(self, number: int, item_wire_type: int = I32) -> int:
        """How many elements a repeated fixed-size field holds, without copying them."""
        size = _FIXED_SIZE[item_wire_type]
        return sum((b - a) // size if w == LEN else 1 for w, a, b in self.fields.get(number, ()))

    def _payloads(self, number: int, what: str) -> list[tuple[int, int]]:
        out = []
        for wire_type, a, b in self.fields.get(number, ()):
            if wire_type != LEN:
                raise WireError(f"field {number} (in bytes {self.start}-{self.end}) is not {what}")
            out.append((a, b))
        return out

    def _fixed_array(self, number: int, typecode: str, item_wire_type: int) -> array:
        size = _FIXED_SIZE[item_wire_type]
        out = array(typecode)
        for wire_type, a, b in self.fields.get(number, ()):
            if wire_type == LEN:
                if (b - a) % size:
                    raise WireError(f"packed field {number} at bytes {a}-{b} is not a whole number of {size}-byte items")
            elif wire_type != item_wire_type:
                raise WireError(f"field {number} (at bytes {a}-{b}) is not a list of {size}-byte numbers")
            out.frombytes(self.buf[a:b])  # one element (unpacked) or a run of them (packed)
        if sys.byteorder == "big":  # the wire is little-endian
            out.byteswap()
        return out


def _text(value: memoryview, number: int) -> str:
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError:
        raise WireError(f"field {number} is not UTF-8 text") from None
