"""What the KVStore lets one request carry and all calls hold: the source of the store's limit
defaults (the CLI reads them from here without importing gRPC)."""

from dataclasses import dataclass

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What one request may carry, how values are cut on the wire, and what the server holds."""

    max_block_bytes: int = 64 << 20
    max_keys: int = 4096
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Writes reach the backend in batches of about this many bytes: big enough to amortize a
    # round trip, small enough that one call never holds a whole huge request.
    batch_bytes: int = 8 << 20
    # Reads go in windows of about this many bytes; the next window is read while this one is
    # sent, so smaller windows overlap more and larger ones pay fewer round trips.
    window_bytes: int = 2 << 20
    # Value bytes all calls together may hold at once (Get windows read, Put blocks received but
    # not yet written); a call waits for room until its deadline (docs/store.md, "Memory bound").
    max_inflight_bytes: int = 256 << 20
    # The longest any call may run, whatever deadline its client set (or none).
    max_call_s: float = 60.0
    # A stream that waits this long on its client (the next Put message, room for the next Get
    # message) is cancelled, so a hung client cannot hold a handler thread (0: never).
    idle_s: float = 10.0
    # Calls waiting for a handler thread; more get RESOURCE_EXHAUSTED at once.
    max_queued_rpcs: int = 64
    # What gRPC buffers per stream before the handler reads it: outside the byte budget, so
    # fixed instead of grown by gRPC's bandwidth probing (services/watchdog.py).
    stream_window_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in (
            "max_block_bytes",
            "max_keys",
            "chunk_bytes",
            "batch_bytes",
            "window_bytes",
            "max_inflight_bytes",
            "max_call_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.idle_s < 0 or self.max_queued_rpcs < 0 or self.stream_window_bytes < 0:
            raise ValueError("idle_s, max_queued_rpcs and stream_window_bytes must be >= 0")
        if self.max_block_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_block_bytes ({self.max_block_bytes}) must not exceed max_inflight_bytes "
                f"({self.max_inflight_bytes}): one block must fit in the bytes in flight"
            )
