"""A faster schemaless Avro encoder/decoder for our own schemas, byte-for-byte the same as
fastavro's (``schemas.codec`` falls back to fastavro whenever this one declines).

Why: fastavro handles an ``array<float>`` one item at a time (~90 ns a float to write,
~120 ns to read); a record of a real image carries three vectors (384 + 50 + 1280 floats),
so Avro alone cost ~150 us to encode and ~200 us to decode a VisionResult or
EnrichedRecord, the largest per-event cost of the broker path. Here a float array is one
``struct.pack``/``unpack_from`` per block (~5 ns a float); the rest of a record is plain
Python closures compiled once per schema.

Scope: exactly what our schemas use (record, null, boolean, int, long, float, double,
string, bytes, array, map, enum, unions, the timestamp-millis logical type). It is strict:
a value of an unexpected type (a naive datetime, a numpy array, a missing field, a union
that is not ``["null", X]``...) raises ``Decline`` and the caller uses fastavro, which then
encodes it or raises its own error exactly as before. Decoding is only used where the
writer schema *is* the reader schema (same fingerprint); schema resolution stays fastavro's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_F = struct.Struct("<f")
_D = struct.Struct("<d")


class Decline(Exception):
    """This codec does not handle the value or schema: use fastavro."""


# ---- primitives ---------------------------------------------------------------------------
def zigzag(n: int) -> bytes:
    """Avro's zigzag varint of a long."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [zigzag(i) for i in range(-64, 64)]  # one byte each


def _long_bytes(n: int) -> bytes:
    if -64 <= n < 64:
        return _SMALL[n + 64]
    if not -(1 << 63) <= n < (1 << 63):
        raise Decline("long out of range")
    return zigzag(n)


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


Enc = Callable[[Any, list], None]
Dec = Callable[[bytes, int], tuple[Any, int]]


def _enc_null(v, out):
    if v is not None:
        raise Decline("not null")


def _enc_boolean(v, out):
    if v is True:
        out.append(b"\x01")
    elif v is False:
        out.append(b"\x00")
    else:
        raise Decline("not a bool")


def _enc_int(v, out):
    if type(v) is not int or not -(1 << 31) <= v < (1 << 31):
        raise Decline("not an int")
    out.append(_long_bytes(v))


def _enc_long(v, out):
    if type(v) is not int:
        raise Decline("not an int")
    out.append(_long_bytes(v))


def _enc_timestamp_millis(v, out):
    if type(v) is datetime:
        if v.tzinfo is None:
            raise Decline("naive datetime")
        delta = v - EPOCH  # as fastavro: whole seconds, then the milliseconds truncated
        v = (delta.days * 24 * 3600 + delta.seconds) * 1000 + int(delta.microseconds / 1000)
    _enc_long(v, out)


def _enc_float(v, out):
    if type(v) is not float and type(v) is not int:
        raise Decline("not a float")
    out.append(_F.pack(v))


def _enc_double(v, out):
    if type(v) is not float and type(v) is not int:
        raise Decline("not a float")
    out.append(_D.pack(v))


def _enc_string(v, out):
    if type(v) is not str:
        raise Decline("not a str")
    b = v.encode("utf-8")
    out.append(_long_bytes(len(b)))
    out.append(b)


def _enc_bytes(v, out):
    if type(v) is not bytes:
        raise Decline("not bytes")
    out.append(_long_bytes(len(v)))
    out.append(v)


def _dec_null(data, pos):
    return None, pos


def _dec_boolean(data, pos):
    return data[pos] != 0, pos + 1


def _dec_timestamp_millis(data, pos):
    n, pos = _read_long(data, pos)
    return EPOCH + timedelta(microseconds=n * 1000), pos


def _dec_float(data, pos):
    return _F.unpack_from(data, pos)[0], pos + 4


def _dec_double(data, pos):
    return _D.unpack_from(data, pos)[0], pos + 8


def _dec_string(data, pos):
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise Decline("bad string length")
    return data[pos:end].decode("utf-8"), end


def _dec_bytes(data, pos):
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise Decline("bad bytes length")
    return bytes(data[pos:end]), end


_PRIMITIVES: dict[str, tuple[Enc, Dec]] = {
    "null": (_enc_null, _dec_null),
    "boolean": (_enc_boolean, _dec_boolean),
    "int": (_enc_int, _read_long),
    "long": (_enc_long, _read_long),
    "float": (_enc_float, _dec_float),
    "double": (_enc_double, _dec_double),
    "string": (_enc_string, _dec_string),
    "bytes": (_enc_bytes, _dec_bytes),
}


# ---- arrays of float: the point of this module ---------------------------------------------
def _enc_float_array(v, out):
    if type(v) is not list and type(v) is not tuple:
        raise Decline("not a list")
    n = len(v)
    if n:
        out.append(_long_bytes(n))
        try:
            # struct takes what fastavro's C float cast takes (PyFloat_AsDouble: floats, ints,
            # __float__ objects) and packs it the same; it refuses a value too large for a
            # float32 (fastavro writes inf): declined, so fastavro's behaviour stays.
            out.append(struct.pack(f"<{n}f", *v))
        except (struct.error, OverflowError) as exc:
            raise Decline(str(exc)) from None
    out.append(b"\x00")


def _dec_float_array(data, pos):
    items: list = []
    while True:
        n, pos = _read_long(data, pos)
        if n == 0:
            return items, pos
        if n < 0:  # a block with its byte size
            n = -n
            _, pos = _read_long(data, pos)
        end = pos + 4 * n
        if end > len(data):
            raise Decline("array past the end")
        items.extend(struct.unpack_from(f"<{n}f", data, pos))
        pos = end


# ---- compiling a parsed (fastavro.parse_schema) schema --------------------------------------
class Compiled:
    def __init__(self, enc: Enc, dec: Dec) -> None:
        self._enc, self._dec = enc, dec

    def encode(self, record: Any) -> bytes:
        out: list[bytes] = []
        try:
            self._enc(record, out)
        except Decline:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, UnicodeError) as exc:
            raise Decline(f"{type(exc).__name__}: {exc}") from None
        return b"".join(out)

    def decode(self, data: bytes, pos: int = 0) -> Any:
        try:
            value, end = self._dec(data, pos)
        except Decline:
            raise
        except (IndexError, ValueError, struct.error, UnicodeError, OverflowError, TypeError, KeyError) as exc:
            raise Decline(f"{type(exc).__name__}: {exc}") from None
        if end != len(data):
            raise Decline("trailing bytes")
        return value


def compile_schema(parsed: Any, named_schemas: dict[str, Any] | None = None) -> Compiled:
    """``parsed``: a schema from ``fastavro.parse_schema``; named types are referenced by
    full name, defined in it or in ``named_schemas`` (fastavro's dict of them). Raises
    Decline for what is not covered."""
    named: dict[str, Any] = {"": dict(named_schemas or {})}
    enc, dec = _compile(parsed, named)
    return Compiled(enc, dec)


def _compile(s: Any, named: dict[str, Any]) -> tuple[Enc, Dec]:
    if isinstance(s, str):
        if s in _PRIMITIVES:
            return _PRIMITIVES[s]
        if s not in named and s in named[""]:  # defined elsewhere: compile it once
            _compile(named[""][s], named)
        if s in named:  # a reference: late-bound, the definition may still be compiling
            cell = named[s]
            return (lambda v, out: cell[0](v, out)), (lambda data, pos: cell[1](data, pos))
        raise Decline(f"unknown type {s}")
    if isinstance(s, list):
        return _compile_union(s, named)
    if not isinstance(s, dict):
        raise Decline(f"unexpected schema {s!r}")
    t = s.get("type")
    logical = s.get("logicalType")
    if logical is not None:
        if logical == "timestamp-millis" and t == "long":
            return _enc_timestamp_millis, _dec_timestamp_millis
        raise Decline(f"logical type {logical}")
    if t in _PRIMITIVES:
        return _PRIMITIVES[t]
    if t == "record":
        return _compile_record(s, named)
    if t == "array":
        if s["items"] == "float":
            return _enc_float_array, _dec_float_array
        return _compile_array(s, named)
    if t == "map":
        return _compile_map(s, named)
    if t == "enum":
        return _compile_enum(s, named)
    raise Decline(f"type {t}")


def _compile_record(s: dict, named: dict[str, Any]) -> tuple[Enc, Dec]:
    cell: list = [None, None]
    named[s["name"]] = cell
    fields = [(f["name"], *_compile(f["type"], named)) for f in s["fields"]]
    encs = [(name, enc) for name, enc, _ in fields]
    decs = [(name, dec) for name, _, dec in fields]

    def enc(v, out):
        if type(v) is not dict:
            raise Decline("not a dict")
        for name, e in encs:
            e(v[name], out)  # a missing field (fastavro may use its default): KeyError -> Decline

    def dec(data, pos):
        rec = {}
        for name, d in decs:
            rec[name], pos = d(data, pos)
        return rec, pos

    cell[0], cell[1] = enc, dec
    return enc, dec


def _compile_union(branches: list, named: dict[str, Any]) -> tuple[Enc, Dec]:
    if len(branches) != 2 or branches[0] != "null":
        raise Decline("only [null, X] unions")
    enc_x, dec_x = _compile(branches[1], named)

    def enc(v, out):
        if v is None:
            out.append(b"\x00")
        else:
            out.append(b"\x02")
            enc_x(v, out)

    def dec(data, pos):
        b = data[pos]
        if b == 0:
            return None, pos + 1
        if b == 2:
            return dec_x(data, pos + 1)
        raise Decline("bad union index")

    return enc, dec


def _compile_array(s: dict, named: dict[str, Any]) -> tuple[Enc, Dec]:
    enc_i, dec_i = _compile(s["items"], named)

    def enc(v, out):
        if type(v) is not list and type(v) is not tuple:
            raise Decline("not a list")
        if v:
            out.append(_long_bytes(len(v)))
            for x in v:
                enc_i(x, out)
        out.append(b"\x00")

    def dec(data, pos):
        items = []

        def one(data, pos):
            x, pos = dec_i(data, pos)
            items.append(x)
            return pos

        return items, _read_blocks(data, pos, one)

    return enc, dec


def _read_blocks(data: bytes, pos: int, read_one) -> int:
    """Avro's blocked items (arrays, maps): ``read_one(data, pos) -> pos`` for each item;
    returns the position after the closing zero count. A negative count is followed by the
    block's size in bytes (skipped: the items are read anyway)."""
    while True:
        n, pos = _read_long(data, pos)
        if n == 0:
            return pos
        if n < 0:
            n = -n
            _, pos = _read_long(data, pos)
        for _ in range(n):
            pos = read_one(data, pos)


def _compile_map(s: dict, named: dict[str, Any]) -> tuple[Enc, Dec]:
    enc_v, dec_v = _compile(s["values"], named)

    def enc(v, out):
        if type(v) is not dict:
            raise Decline("not a dict")
        if v:
            out.append(_long_bytes(len(v)))
            for k, x in v.items():
                _enc_string(k, out)
                enc_v(x, out)
        out.append(b"\x00")

    def dec(data, pos):
        m = {}

        def one(data, pos):
            k, pos = _dec_string(data, pos)
            m[k], pos = dec_v(data, pos)
            return pos

        return m, _read_blocks(data, pos, one)

    return enc, dec


def _compile_enum(s: dict, named: dict[str, Any]) -> tuple[Enc, Dec]:
    symbols = list(s["symbols"])
    index = {sym: i for i, sym in enumerate(symbols)}
    cell: list = [None, None]
    named[s["name"]] = cell

    def enc(v, out):
        i = index.get(v) if type(v) is str else None
        if i is None:
            raise Decline("not a symbol")
        out.append(_long_bytes(i))

    def dec(data, pos):
        i, pos = _read_long(data, pos)
        if not 0 <= i < len(symbols):
            raise Decline("bad enum index")
        return symbols[i], pos

    cell[0], cell[1] = enc, dec
    return enc, dec
