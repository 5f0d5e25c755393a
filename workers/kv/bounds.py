"""The arithmetic of a bounded KV cache: which tokens a window keeps, evicts and re-keys.

Pure integers, no torch: the gateway checks a request's bound with it and the worker's window
code (`workers.window`, which moves the tensors) runs on it. The schedule itself is described
in `workers.window`.
"""

from dataclasses import dataclass

from kvpool.errors import InvalidArgument

DEFAULT_SINK_TOKENS = 4


@dataclass(frozen=True, slots=True)
class CacheWindow:
    """Keep the first `sink_tokens` and the most recent tokens, at most `max_cache_tokens`."""

    max_cache_tokens: int
    sink_tokens: int = DEFAULT_SINK_TOKENS
    block_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("max_cache_tokens", "sink_tokens", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"{name} must be an integer, got {value!r}")
        if self.block_tokens < 1:
            raise InvalidArgument(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.sink_tokens < 0:
            raise InvalidArgument(
                f"sink_tokens must be 0 (no sinks) or positive, got {self.sink_tokens}"
            )
        if self.max_cache_tokens < 1:  # unbounded is no CacheWindow at all, not max_cache_tokens=0
            raise InvalidArgument(f"max_cache_tokens must be positive, got {self.max_cache_tokens}")
        least = self.sink_tokens + 2 * self.block_tokens
        if self.max_cache_tokens < least:
            raise InvalidArgument(
                f"max_cache_tokens={self.max_cache_tokens} is too small for "
                f"sink_tokens={self.sink_tokens}: it must be at least sink_tokens + "
                f"2 x block_tokens = {least}, so that the window keeps the sinks, at least one "
                f"block of recent tokens, and room for the block being filled"
            )

    @property
    def kept_tokens(self) -> int:
        """The cache's size right after an eviction: sinks plus the recent window."""
        return self.max_cache_tokens - self.block_tokens

    def evicted(self, fed: int) -> int:
        """Tokens evicted once `fed` tokens are fed (evictions happen at block boundaries)."""
        boundary = fed - fed % self.block_tokens
        return max(0, boundary - self.kept_tokens)

    @property
    def plain_blocks(self) -> int:
        """Blocks computed before the first eviction, which happens at the boundary after them."""
        return self.kept_tokens // self.block_tokens + 1

    def windowed_block(self, index: int) -> bool:
        """Whether block `index` was computed after an eviction (so it depends on the window)."""
        return index >= self.plain_blocks

    def first_recent_block(self, boundary_block: int) -> int:
        """The first block holding recent tokens the cache keeps after `boundary_block` blocks."""
        evicted = self.evicted(boundary_block * self.block_tokens)
        return (self.sink_tokens + evicted) // self.block_tokens

    def blocks_for_state(self, boundary_block: int) -> list[int]:
        """The block indices whose tokens make up the cache after `boundary_block` blocks."""
        if boundary_block < self.plain_blocks:
            return list(range(boundary_block))
        sink_blocks = -(-self.sink_tokens // self.block_tokens)
        first_recent = self.first_recent_block(boundary_block)
        return sorted(set(range(sink_blocks)) | set(range(first_recent, boundary_block)))


def check_window_fits(window: CacheWindow, max_context: int) -> None:
    """Raise unless the bounded cache fits the model's context (whatever the sequence's length)."""
    if window.max_cache_tokens > max_context:
        raise InvalidArgument(
            f"max_cache_tokens={window.max_cache_tokens} exceeds the model's context of "
            f"{max_context} tokens"
        )


def check_context(
    prompt_tokens: int, max_new_tokens: int, max_context: int, window: CacheWindow | None
) -> None:
    """Raise unless a request fits the model's context: the gateway checks it before any worker
    is asked, and the engine for callers that reach it directly. A bounded cache never holds more
    than `window.max_cache_tokens` positions, so then only the window has to fit."""
    if window is not None:
        check_window_fits(window, max_context)
        return
    if prompt_tokens + max_new_tokens > max_context:
        raise InvalidArgument(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's context of {max_context} tokens"
        )


def requested_window(
    max_cache_tokens: int, sink_tokens: int, block_tokens: int
) -> CacheWindow | None:
    """The bound a request asks for: None for `max_cache_tokens == 0` (unbounded)."""
    if not isinstance(max_cache_tokens, int) or max_cache_tokens < 0:
        raise InvalidArgument(
            f"max_cache_tokens must be 0 (unbounded) or positive, got {max_cache_tokens!r}"
        )
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise InvalidArgument(f"sink_tokens must be 0 (no sinks) or positive, got {sink_tokens!r}")
    if max_cache_tokens == 0:
        return None
    return CacheWindow(max_cache_tokens, sink_tokens, block_tokens)


def feed_chunks(start: int, stop: int, block_tokens: int) -> list[tuple[int, int]]:
    """Split tokens [start, stop) into chunks that end on block boundaries (the last may not)."""
    chunks = []
    position = start
    while position < stop:
        end = min(stop, (position // block_tokens + 1) * block_tokens)
        chunks.append((position, end))
        position = end
    return chunks
