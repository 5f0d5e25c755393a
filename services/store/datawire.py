"""The data path's wire format (docs/store.md, "The data path"): the one place that builds it.

The data path is a plain TCP connection beside gRPC for Get and Lookup, so that a value's bytes
cross the store process without being parsed or re-sent by gRPC (with Redis they do not cross
Python at all: `os.splice`). Everything is little-endian.

    hello    client -> store   b"KVDP" u8 version u16 token_len token      (once per connection)
    request  client -> store   u8 op u32 deadline_ms u32 n_keys u32 keys_len,
                               n_keys x (u8 key_len key)         (keys_len: their bytes)
    put      client -> store   u8 op u32 deadline_ms u32 n_keys u32 ttl_s,
                               n_keys x (u8 key_len key u32 value_len value)
    frame    store -> client   u8 kind u64 length, then `length` bytes for ERROR
    run      store -> client   u8 RUN u64 n, n x i64 value_len (-1: missing), then the n values
                               as Redis frames a bulk reply: `$len\r\n` value `\r\n`, `$-1\r\n`

The store answers the hello with one OK or ERROR frame; a Get with RUN frames that cover its keys
in request order (a run is what one Redis transaction read: the store relays its bytes as they
came, without parsing a value); a Lookup with one OK frame whose length is the present prefix; a
Put with one OK frame whose length is how many values the store kept. An ERROR frame (u8 code,
then a UTF-8 message) ends the connection. A connection that ends inside a value is a
failed read, never a shorter value: the reader knows each value's length before its first byte.

This module is pure: no sockets (the server is `dataserver`, the client `dataclient`).
"""

import struct
from dataclasses import dataclass

from kvpool import errors

MAGIC = b"KVDP"
VERSION = 3  # 2: a Get answers in runs; 3: a request says how many bytes its keys take
MAX_TOKEN_BYTES = 4096
MAX_ERROR_BYTES = 64 << 10

OP_GET = 1
OP_LOOKUP = 2
OP_PUT = 3
OPS = (OP_GET, OP_LOOKUP, OP_PUT)
MAX_PUT_VALUE_BYTES = (1 << 32) - 1  # what a put item's u32 length can say

RUN = 0
ERROR = 2
OK = 3

HELLO = struct.Struct("<4sBH")  # magic, version, token length
# op, deadline in ms (0: the store's --max-call-seconds), n_keys, then for a Get or a Lookup the
# bytes of the keys that follow (read in one call), for a Put ttl_s (0: the store's --ttl)
REQUEST = struct.Struct("<BIII")
MAX_KEY_BYTES = 255  # a key's length is one byte
VALUE_LENGTH = struct.Struct("<I")  # after a put item's key
FRAME = struct.Struct("<BQ")  # kind, length
MISSING_LENGTH = -1  # a run's length for a key that has no value

# Error codes in an ERROR frame, each a `kvpool.errors` class (0: any other KvpoolError).
_CODES: tuple[type[errors.KvpoolError], ...] = (
    errors.KvpoolError,
    errors.InvalidArgument,
    errors.ResourceExhausted,
    errors.Unavailable,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.DataLoss,
)


class ProtocolError(errors.DataLoss):
    """The other end broke the format (or the connection ended inside a frame)."""


class Unencodable(errors.KvpoolError):
    """A request the data path cannot carry; the client sends it through gRPC."""


def encode_hello(token: str | None) -> bytes:
    raw = (token or "").encode()
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"a data path token is at most {MAX_TOKEN_BYTES} bytes, got {len(raw)}")
    return HELLO.pack(MAGIC, VERSION, len(raw)) + raw


def decode_hello(head: bytes) -> int:
    """The token length that follows a hello head; ProtocolError unless it is a hello."""
    magic, version, token_len = HELLO.unpack(head)
    if magic != MAGIC:
        raise ProtocolError("not a kvpool data path connection (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"data path version {version} is not supported (this store: {VERSION})")
    if token_len > MAX_TOKEN_BYTES:
        raise ProtocolError(f"a token is at most {MAX_TOKEN_BYTES} bytes, got {token_len}")
    return token_len


def encode_request(op: int, keys: list[str], deadline_ms: int) -> bytes:
    """A Get or Lookup; Unencodable for a key whose length does not fit its byte (the store's
    key check, keys.py, then answers it through gRPC)."""
    if op not in (OP_GET, OP_LOOKUP):
        raise ValueError(f"op must be {OP_GET} or {OP_LOOKUP}, got {op}")
    body = b"".join([_key(key) for key in keys])
    return REQUEST.pack(op, _ms(deadline_ms), len(keys), len(body)) + body


def encode_put(
    items: "list[tuple[str, bytes | memoryview]]", deadline_ms: int, ttl_s: int
) -> "list[bytes | memoryview]":
    """A Put as parts to send back to back (the values themselves, never copied); Unencodable
    for a key or a value the format cannot carry (gRPC then carries the Put)."""
    head = REQUEST.pack(OP_PUT, _ms(deadline_ms), len(items), ttl_s)
    parts: list[bytes | memoryview] = [head]
    for key, value in items:
        if len(value) > MAX_PUT_VALUE_BYTES:
            raise Unencodable(f"a value of {len(value)} bytes does not fit a data path put")
        parts.append(_key(key) + VALUE_LENGTH.pack(len(value)))
        parts.append(value)
    return parts


def _ms(deadline_ms: int) -> int:
    return max(0, min(deadline_ms, 2**32 - 1))


def _key(key: str) -> bytes:
    raw = key.encode()
    if not 0 < len(raw) <= MAX_KEY_BYTES:  # the store checks keys (keys.py); gRPC carries these
        raise Unencodable(f"a key of {len(raw)} bytes does not fit a data path request")
    return bytes((len(raw),)) + raw


@dataclass(frozen=True, slots=True)
class RequestHead:
    op: int
    deadline_ms: int
    n_keys: int
    word: int  # a Get's or a Lookup's keys_len, a Put's ttl_s

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ProtocolError(f"unknown data path op {self.op} (known: {OPS})")


def decode_request_head(head: bytes) -> RequestHead:
    return RequestHead(*REQUEST.unpack(head))


def check_keys_len(request: RequestHead) -> int:
    """The byte length of a Get's or a Lookup's keys, once it fits its key count."""
    least, most = request.n_keys, (1 + MAX_KEY_BYTES) * request.n_keys
    if not least <= request.word <= most:
        raise ProtocolError(
            f"{request.n_keys} keys take {least} to {most} bytes; the request says {request.word}"
        )
    return request.word


def decode_keys(body: bytes, n_keys: int) -> list[str]:
    """The `n_keys` keys (u8 key_len key each) that are all of `body`; ProtocolError otherwise.
    Keys that are not ASCII are kept, replaced, for the key checks to refuse (keys.py)."""
    keys, pos = [], 0
    for _ in range(n_keys):
        if pos >= len(body) or (end := pos + 1 + body[pos]) > len(body):
            raise ProtocolError(f"a request's keys end before its {n_keys} keys do")
        keys.append(body[pos + 1 : end].decode(errors="replace"))
        pos = end
    if pos != len(body):
        raise ProtocolError(f"a request has {len(body) - pos} bytes after its {n_keys} keys")
    return keys


def frame(kind: int, length: int = 0) -> bytes:
    return FRAME.pack(kind, length)


def decode_frame(head: bytes) -> tuple[int, int]:
    kind, length = FRAME.unpack(head)
    if kind not in (RUN, ERROR, OK):
        raise ProtocolError(f"unknown data path frame kind {kind}")
    if kind == ERROR and length > MAX_ERROR_BYTES:
        raise ProtocolError(f"an error frame of {length} bytes (at most {MAX_ERROR_BYTES})")
    return kind, length


def run_head(lengths: list[int]) -> bytes:
    """A RUN frame and its lengths; the values' bulk replies follow (`bulk_head`)."""
    return FRAME.pack(RUN, len(lengths)) + struct.pack(f"<{len(lengths)}q", *lengths)


def decode_run_lengths(body: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(body) // 8}q", body)


def bulk_head(length: int) -> bytes:
    """How Redis heads a bulk reply of `length` bytes (MISSING_LENGTH: a missing key's, which has
    no value and no CRLF after it)."""
    return b"$%d\r\n" % length


def run_bytes(lengths: list[int]) -> int:
    """The bytes of a run's bulk replies after its lengths."""
    total = 0
    for n in lengths:
        total += len(bulk_head(n)) + (n + 2 if n >= 0 else 0)
    return total


def error_frame(exc: errors.KvpoolError) -> bytes:
    code = 0
    for n, cls in enumerate(_CODES):
        if isinstance(exc, cls):
            code = n  # the most derived class wins: later entries are subclasses or peers
    body = bytes((code,)) + str(exc).encode()[: MAX_ERROR_BYTES - 1]
    return frame(ERROR, len(body)) + body


def decode_error(body: bytes) -> errors.KvpoolError:
    code = body[0] if body else 0
    cls = _CODES[code] if code < len(_CODES) else errors.KvpoolError
    return cls(body[1:].decode(errors="replace"))
