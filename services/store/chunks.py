"""How values travel in the Get and Put streams: the one place that cuts and joins them.

A value no larger than `chunk_bytes` travels whole, and several such values share a message up to
about `chunk_bytes`. A larger value is cut into `chunk_bytes` pieces, one per message. So no
message is much bigger than `chunk_bytes` (1 MiB by default), whatever the value sizes, and small
values do not pay a message each. The first piece of a value carries its total size, so the
receiver checks limits before buffering and detects a truncated value. Messages are encoded by
`framing` (protobuf-compatible, fewer copies).
"""

from collections.abc import Callable, Iterable, Iterator, Sequence

from kvpool.errors import DataLoss, InvalidArgument, ResourceExhausted
from kvpool.v1 import store_pb2
from services.store.framing import (
    Piece,
    decode_get_chunk,
    decode_put_chunk,
    encode_get_chunk,
    encode_put_chunk,
)
from services.store.keys import check_key
from services.store.limits import DEFAULT_CHUNK_BYTES  # noqa: F401 (its old home; clients use it)

SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "kvpool.v1.KVStore"
# gRPC message limits are chunk_bytes plus this: room for the framing of many small values and
# for a Lookup of the maximum number of maximum-length keys.
MESSAGE_MARGIN_BYTES = 4 << 20

Buffer = bytes | memoryview
# The longest TTL a Put may ask for (about 68 years); Redis refuses larger ones ("invalid expire
# time"), which used to come back as UNAVAILABLE and be retried.
MAX_TTL_S = 2**31 - 1


def _cut(
    values: Iterable[tuple[int, str, Buffer | None]], chunk_bytes: int
) -> Iterator[list[Piece]]:
    """The pieces of each message, for (index, key, value or None when missing) in order."""
    pending: list[Piece] = []
    pending_bytes = 0
    for index, key, value in values:
        if value is None:
            pending.append(Piece(index=index, key=key, missing=True, last=True))
            continue
        size = len(value)
        if size <= chunk_bytes:
            if pending and pending_bytes + size > chunk_bytes:
                yield pending
                pending, pending_bytes = [], 0
            pending.append(Piece(index=index, key=key, data=value, last=True, size=size))
            pending_bytes += size
            continue
        if pending:
            yield pending
            pending, pending_bytes = [], 0
        view = memoryview(value)
        for offset in range(0, size, chunk_bytes):
            end = min(offset + chunk_bytes, size)
            head = offset == 0
            yield [
                Piece(
                    index=index,
                    key=key if head else "",
                    data=view[offset:end],
                    last=end == size,
                    size=size if head else 0,
                )
            ]
    if pending:
        yield pending


def get_chunks(values: Iterable[tuple[int, Buffer | None]], chunk_bytes: int) -> Iterator[bytes]:
    """Server side of Get: (request index, value or None when missing) -> encoded messages."""
    flat = ((index, "", value) for index, value in values)
    for pieces in _cut(flat, chunk_bytes):
        yield encode_get_chunk(pieces)


def put_chunks(
    items: Sequence[tuple[str, Buffer]], ttl_s: int | None, chunk_bytes: int
) -> Iterator[bytes]:
    """Client side of Put: blocks -> encoded messages; the first carries the TTL."""
    ttl = ttl_s or 0
    for pieces in _cut(((0, key, value) for key, value in items), chunk_bytes):
        yield encode_put_chunk(ttl, pieces)
        ttl = 0


class ValueAssembler:
    """Client side of Get: joins pieces back into values; the stream must follow the contract."""

    def __init__(self, n_keys: int) -> None:
        self._n_keys = n_keys
        self._index = -1
        self._size = 0
        self._parts: list[memoryview | bytes] = []
        self._received = 0

    def add(self, message: bytes) -> Iterator[tuple[int, bytes | None]]:
        """Feed one message; yields (request index, value or None) for each completed value."""
        for p in decode_get_chunk(message):
            if p.index >= self._n_keys:
                raise DataLoss(f"Get stream names key #{p.index} of a {self._n_keys}-key request")
            if self._index == -1:
                self._index, self._size = p.index, p.size
            elif p.index != self._index:
                raise DataLoss(f"Get stream switched to key #{p.index} inside key #{self._index}")
            if p.missing:
                self._index = -1
                yield p.index, None
                continue
            self._parts.append(p.data)
            self._received += len(p.data)
            if self._received > self._size or (p.last and self._received != self._size):
                raise DataLoss(
                    f"Get stream sent {self._received} bytes for key #{p.index}, "
                    f"announced {self._size}"
                )
            if p.last:
                # The one copy on the client: out of the received message, into the value.
                value = b"".join(self._parts)
                self._index, self._parts, self._received = -1, [], 0
                yield p.index, value

    @property
    def in_value(self) -> bool:
        """True while a value is half received (the stream must not end here)."""
        return self._index != -1


class BlockAssembler:
    """Server side of Put: joins pieces into blocks, enforcing the key rule and the size limit.

    A block that came in one piece is returned as a view into its message, which the Redis
    backend writes without copying. A block in several pieces is copied into one buffer of its
    announced size as the pieces arrive, so each message is freed once copied and the block never
    costs more than its size plus one message (joining the pieces at the end cost twice its
    size). `reserve(size)`, when given, is called with each block's announced size before any of
    it is buffered (the server's byte budget).
    """

    def __init__(self, max_block_bytes: int, reserve: Callable[[int], None] | None = None) -> None:
        self._max = max_block_bytes
        self._reserve = reserve
        self._key = ""
        self._size = 0
        self._buffer: bytearray | None = None
        self._received = 0
        self.ttl_s = 0  # from the first message

    def add(self, message: bytes, first: bool) -> Iterator[tuple[str, Buffer]]:
        """Feed one message; yields (key, value) for each block it completes."""
        ttl_s, pieces = decode_put_chunk(message)
        if first:
            if ttl_s > MAX_TTL_S:
                raise InvalidArgument(
                    f"ttl_s {ttl_s} is too long: at most {MAX_TTL_S} seconds (0: the store's "
                    "default)"
                )
            self.ttl_s = ttl_s
        for p in pieces:
            block = self._add(p)
            if block is not None:
                yield block

    def _add(self, p: Piece) -> tuple[str, Buffer] | None:
        if p.key:
            if self._key:
                raise InvalidArgument(f"block {self._key!r} ended without its last piece")
            check_key(p.key)
            if p.size > self._max:
                raise ResourceExhausted(
                    f"block {p.key!r} is {p.size} bytes; the limit is {self._max} bytes "
                    "(--max-block-bytes)"
                )
            if self._reserve is not None:
                self._reserve(p.size)
            self._key, self._size = p.key, p.size
        elif not self._key:
            # No block is open, so this piece starts one, with an empty (invalid) key.
            check_key(p.key)
        start = self._received
        self._received += len(p.data)
        if self._received > self._size or (p.last and self._received != self._size):
            raise InvalidArgument(
                f"block {self._key!r} announced {self._size} bytes and sent "
                f"{self._received}{'' if p.last else ' so far'}"
            )
        if p.last and self._buffer is None:
            value: Buffer = p.data  # the whole block in one piece: no copy
        else:
            if self._buffer is None:
                self._buffer = bytearray(self._size)
            self._buffer[start : self._received] = p.data
            if not p.last:
                return None
            value = memoryview(self._buffer)
        block = (self._key, value)
        self._key, self._buffer, self._received = "", None, 0
        return block

    def finish(self) -> None:
        """The stream ended: it must not end inside a block."""
        if self._key:
            raise InvalidArgument(f"the Put stream ended inside block {self._key!r}")
