"""One cache for a prefix, built block by block as the blocks arrive from their tiers.

`Assembly` allocates the prefix's keys and values once, as one tensor on the model's device, and
each block is decoded straight into its slice as soon as its bytes are in hand, so decoding
overlaps the rest of the fetch and no block is copied again to be concatenated. The cache that
comes out holds views of that tensor (`layout.cache_from_layers`): the first forward pass after
it appends to them as usual.

Without a staging ring (the workers' CPU case) each block is verified and decoded when it is
added. With one (a worker on a GPU) the host's share of the work (verifying the checksums,
copying the payload into pinned memory) runs on the ring's threads, several blocks at once,
while the caller goes on fetching; the transfers and the decoding are queued on the device in
block order. Either way a block is verified before it is
written (framing, checksums, hash, geometry: `check_block`), and the values' finiteness is
checked for the whole run in `finish`, with one wait for the device instead of one per block.
The first block refused, early or late, ends the prefix there.
"""

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from workers.kv.block import BlockFormatError, CheckedBlock, check_block
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import BlockHash
from workers.kv.layout import cache_from_layers
from workers.kv.staging import Lease, PinnedRing

# Blocks a GPU fetch prepares ahead on the staging ring's threads (slots it leases).
AHEAD = 8


@dataclass(frozen=True, slots=True)
class Refused:
    """The first block of the run that was refused, counted from the assembly's first."""

    index: int
    error: BlockFormatError


class Assembly:
    """Room for `blocks` blocks of a prefix; fill it in order with `add` and `add_encoded`,
    then call `finish` (always: with a staging ring it also gives back the slots it leased)."""

    def __init__(
        self,
        geometry: KVGeometry,
        block_tokens: int,
        blocks: int,
        device: torch.device,
        staging: PinnedRing | None = None,
    ) -> None:
        self.geometry = geometry
        self.block_tokens = block_tokens
        self.capacity = blocks
        self._staging = staging
        layers, _, heads, _, head_dim = geometry.block_shape(block_tokens)
        self._kv = torch.empty(
            (layers, 2, 1, heads, blocks * block_tokens, head_dim),
            dtype=getattr(torch, geometry.dtype),
            device=device,
        )  # [L, 2, 1, H, S, D]: layer l's keys are _kv[l, 0], contiguous
        self._sums: list[tuple[int, torch.Tensor]] = []  # (block, its float32 sum on the device)
        self._ahead: deque[tuple[int, Future[CheckedBlock]]] = deque()  # GPU: being staged
        self._lease: Lease | None = None
        self._refused: Refused | None = None
        self.added = 0  # blocks handed in so far
        self.blocks = 0  # blocks known good and in place, in order (final after `finish`)

    def block(self, index: int) -> torch.Tensor:
        """Block `index` as a view, [L, 2, H, T, D]."""
        start = index * self.block_tokens
        return self._kv[:, :, 0, :, start : start + self.block_tokens, :]

    def add(self, block: torch.Tensor) -> None:
        """Copy in a decoded block (from L1), [L, 2, H, T, D]; before any encoded one."""
        if self._ahead or self._sums:
            raise RuntimeError("decoded blocks go before the encoded ones")
        self._claim().copy_(block)
        self.blocks = self.added

    def add_encoded(self, data: Any, block_hash: BlockHash) -> None:
        """Verify and decode a stored value into the next slice.

        Without a staging ring, a damaged value raises BlockFormatError here and takes no slice.
        With one, the value is verified on the ring's threads and a refusal shows in `finish`.
        """
        if self._refused is not None:
            return  # the run already ends before this block
        if self._staging is None:
            checked = check_block(data, block_hash, self.geometry, self.block_tokens)
            index = self.added
            out = self._claim()
            self._sums.append((index, checked.decode_into(checked.host_copy(), out)))
            return
        if self._lease is None:
            self._lease = self._staging.lease(AHEAD)
        lease = self._lease
        if len(self._ahead) == lease.size:
            self._send_oldest()
        index = self._claim_index()
        slot = index % lease.size

        def prepare() -> CheckedBlock:
            checked = check_block(data, block_hash, self.geometry, self.block_tokens)
            lease.stage(slot, checked.payload)
            return checked

        self._ahead.append((index, self._staging.submit(prepare)))

    def finish(self) -> Refused | None:
        """Wait for the run; the first block refused (its index and why), or None.

        Blocks from the refused one on are dropped (`blocks` is cut back to it).
        """
        try:
            while self._ahead:
                self._send_oldest()
        finally:
            if self._lease is not None:
                self._lease.__exit__(None, None, None)
                self._lease = None
        end = self._refused.index if self._refused is not None else self.added
        sums = [(index, total) for index, total in self._sums if index < end]
        self._sums.clear()
        if sums:
            finite = torch.isfinite(torch.stack([t for _, t in sums])).tolist()  # one wait
            for (index, _), ok in zip(sums, finite, strict=True):
                if not ok:
                    error = BlockFormatError("values", "decoded block holds NaN or inf")
                    self._refused = Refused(index, error)
                    end = index
                    break
        self.blocks = end
        return self._refused

    def used_on(self, stream: "torch.cuda.Stream") -> None:
        """Tell the CUDA allocator that `stream` reads the tensor too (it was made on another),
        so its memory is not handed out again before that stream is done with it."""
        self._kv.record_stream(stream)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) over the good blocks, [1, H, tokens, D] views."""
        kv = self._kv[..., : self.blocks * self.block_tokens, :]  # [L, 2, 1, H, tokens, D]
        return [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]

    def cache(self, config: Any = None) -> DynamicCache:
        """A cache holding the good blocks (views, not copies)."""
        return cache_from_layers(self.layers(), config)

    # --- internals ---------------------------------------------------------------------------

    def _send_oldest(self) -> None:
        """Transfer and decode the oldest staged block, in order, on the current stream."""
        assert self._lease is not None
        index, future = self._ahead.popleft()
        try:
            checked = future.result()
        except BlockFormatError as exc:
            if self._refused is None or index < self._refused.index:
                self._refused = Refused(index, exc)
            return
        if self._refused is not None and index > self._refused.index:
            return
        payload = self._lease.send(index % self._lease.size, self._kv.device)  # [P] uint8
        self._sums.append((index, checked.decode_into(payload, self.block(index))))

    def _claim_index(self) -> int:
        if self.added >= self.capacity:
            raise IndexError(f"the assembly has room for {self.capacity} blocks")
        self.added += 1
        return self.added - 1

    def _claim(self) -> torch.Tensor:
        return self.block(self._claim_index())
