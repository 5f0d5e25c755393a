"""A left-padded batched KV cache: sequences of different lengths decode in one forward pass.

Row i of every layer holds one sequence's keys and values, right-aligned: its first
`pad(i)` columns are padding (zeros, masked out), the rest are its tokens in order.

    keys, values: [rows, kv_heads, columns, head_dim]    mask: [rows, columns] (1 token, 0 pad)

Each decode step appends one column to every row (transformers' `DynamicLayer.update`), so the
mask grows by a column of ones and each row's next position is its own token count, passed as
explicit `position_ids`. A sequence joins with its own prefilled batch-1 cache: the shorter of the
two sides is left-padded to the other's length and the rows are concatenated (a copy of the batch
only when the newcomer is longer than every row). A sequence leaves by `index_select` of the
other rows, and columns that are padding in every remaining row are trimmed, so the batch is never
longer than its longest sequence. Nothing here copies the whole batch on an ordinary step.

Full-attention `DynamicLayer`s only: a sliding-window layer drops columns from the left, which
would shift rows against their masks (such models decode alone, workers.batch).
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.kv.layout import LayerKV


class PaddedBatch:
    """The batch's cache, its padding mask and each row's token count."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], int64
        self.lengths: list[int] = []  # tokens held by each row (its next position)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def pad(self, row: int) -> int:
        return self.columns - self.lengths[row]

    def _layers(self) -> list[DynamicLayer]:
        assert self.cache is not None
        return self.cache.layers  # type: ignore[return-value]

    def join(self, cache: DynamicCache) -> int:
        """Add a sequence from its own batch-1 cache (taken over); returns its row."""
        for index, layer in enumerate(cache.layers):
            if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[0] != 1:
                raise ValueError(
                    f"layer {index} must be a filled batch-1 DynamicLayer to join a padded batch"
                )
        length = cache.get_seq_length()
        if self.cache is None or self.mask is None:
            self.cache = cache
            self.mask = torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device)
            self.lengths = [length]
            return 0
        columns = self.columns
        if length > columns:  # the batch is left-padded up to the newcomer: one copy of it
            grow = length - columns
            for layer in self._layers():
                layer.keys = _left_pad(layer.keys, grow)
                layer.values = _left_pad(layer.values, grow)
            self.mask = _left_pad(self.mask, grow)
            columns = length
        for mine, theirs in zip(self._layers(), cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, _left_pad(theirs.keys, columns - length)])
            mine.values = torch.cat([mine.values, _left_pad(theirs.values, columns - length)])
        row_mask = torch.zeros(1, columns, dtype=torch.long, device=self.mask.device)
        row_mask[:, columns - length :] = 1
        self.mask = torch.cat([self.mask, row_mask])
        self.lengths.append(length)
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); trim columns that became padding in every row."""
        if not rows:
            self.cache, self.mask, self.lengths = None, None, []
            return
        if rows == list(range(self.rows)):
            return
        assert self.mask is not None
        lengths = [self.lengths[r] for r in rows]
        lead = self.columns - max(lengths)
        index = torch.tensor(rows, device=self.mask.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]
        self.mask = self.mask.index_select(0, index)[:, lead:]
        self.lengths = lengths

    def step_inputs(self, tokens: list[int]) -> dict[str, torch.Tensor]:
        """The forward's inputs for one new token per row, in row order."""
        assert self.mask is not None and len(tokens) == self.rows
        device = self.mask.device
        return {
            "input_ids": torch.tensor(tokens, device=device).unsqueeze(1),  # [rows, 1]
            "attention_mask": torch.cat(  # [rows, columns + 1]
                [self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=device)], dim=1
            ),
            "position_ids": torch.tensor(self.lengths, device=device).unsqueeze(1),  # [rows, 1]
        }

    def stepped(self, attention_mask: torch.Tensor) -> None:
        """Record the step the forward just took (its cache grew by one column)."""
        self.mask = attention_mask
        self.lengths = [length + 1 for length in self.lengths]

    def row(self, row: int) -> list[LayerKV]:
        """Row `row`'s keys and values without padding, views [1, kv_heads, tokens, head_dim]."""
        pad = self.pad(row)
        return [
            (layer.keys[row : row + 1, :, pad:], layer.values[row : row + 1, :, pad:])
            for layer in self._layers()
        ]


def _left_pad(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`tensor` with `count` zero columns in front of its sequence dimension (dim 2, or 1 for a
    mask)."""
    if count == 0:
        return tensor
    dim = 2 if tensor.dim() == 4 else 1
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
