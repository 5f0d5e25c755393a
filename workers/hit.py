"""What a request's cached prefix came to: the plan, and which tier gave how many blocks.

One record from the hit path (workers.start) to the usage the worker reports (workers.worker),
in blocks, with the token counts derived in one place. Pure: no torch, no I/O.
"""

from dataclasses import dataclass

from workers.api import PLAN_KINDS


@dataclass(frozen=True, slots=True)
class TierTokens:
    """Tokens of a prompt that came from each tier instead of a prefill."""

    local: int = 0  # L1, this worker's memory
    node: int = 0  # the node tier
    store: int = 0  # the KVStore

    @property
    def total(self) -> int:
        return self.local + self.node + self.store


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A request's start: the plan that ran and the blocks each tier gave.

    A plain start's cache holds blocks [0, tokens / block_tokens): L1's leading run, then (a
    split) the blocks recomputed beside the fetch, then the node tier's, then the store's. A
    windowed start loads only its sink and recent blocks, which stand for `window_tokens`.
    """

    block_tokens: int
    plan: str = "none"  # workers.plan's kind: none, fetch, recompute or split
    local_blocks: int = 0
    node_blocks: int = 0
    store_blocks: int = 0
    split_blocks: int = 0  # a split's recomputed blocks, in the cache before the fetched ones
    recomputed_tokens: int = 0  # cached tokens the plan chose to compute (split or recompute)
    # The prefix's leading blocks that the node tier or the store already holds, fetched or
    # not: once computed again (a recompute), they go to L1 only.
    stored_blocks: int = 0
    window_tokens: int = 0  # a windowed start: the tokens its blocks stand for; 0 when plain

    def __post_init__(self) -> None:
        if self.plan not in PLAN_KINDS:
            raise ValueError(f"plan must be one of {PLAN_KINDS}, got {self.plan!r}")
        counts = (self.block_tokens, self.local_blocks, self.node_blocks, self.store_blocks,
                  self.split_blocks, self.recomputed_tokens, self.stored_blocks,
                  self.window_tokens)  # fmt: skip
        if self.block_tokens <= 0 or min(counts) < 0:
            raise ValueError("a prefix hit's block_tokens is > 0 and its counts >= 0")

    @property
    def loaded_blocks(self) -> int:
        """Blocks whose K and V came from a tier."""
        return self.local_blocks + self.node_blocks + self.store_blocks

    @property
    def tokens(self) -> int:
        """The tokens the start's cache stands for: the engine prefills from there."""
        if self.window_tokens:
            return self.window_tokens
        return (self.loaded_blocks + self.split_blocks) * self.block_tokens

    def by_tier(self, reused: int) -> TierTokens:
        """Of the `reused` tokens the engine took from the cache instead of prefilling them,
        those each tier gave.

        The engine may feed a fully cached prompt's last token again, so `reused` can fall short
        of `tokens`: the tokens it did not take are the cache's last (the store's, then the node
        tier's, a split's recomputed ones, then L1's). A split's recomputed blocks came from no
        tier. A windowed start's tokens are shared out by the blocks each tier gave.
        """
        size = self.block_tokens
        parts = [self.local_blocks * size, self.split_blocks * size,
                 self.node_blocks * size, self.store_blocks * size]  # fmt: skip
        if self.window_tokens and self.loaded_blocks:
            local = self.local_blocks * self.window_tokens // self.loaded_blocks
            node = self.node_blocks * self.window_tokens // self.loaded_blocks
            parts = [local, 0, node, self.window_tokens - local - node]
        short = self.tokens - min(max(reused, 0), self.tokens)
        for index in reversed(range(len(parts))):
            taken = min(short, parts[index])
            parts[index] -= taken
            short -= taken
        local, _, node, store = parts
        return TierTokens(local, node, store)
