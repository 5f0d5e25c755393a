"""A left-padded batched KV cache: sequences of different lengths decode in one forward pass.

Row i of every layer holds one sequence's keys and values, right-aligned: its first
`pad(i)` columns are padding (zeros, masked out), the rest are its tokens in order.

    keys, values: [rows, kv_heads, columns, head_dim]    mask: [rows, columns] (1 token, 0 pad)

Each decode step appends one column to every row, so the mask grows by a column of ones and each
row's next position is its own token count, passed as explicit `position_ids`. The batch's layers
are `GrowingLayer`s: a `DynamicLayer` whose `update` writes the new column into spare capacity
instead of concatenating (transformers' `DynamicLayer.update` copies the whole layer every step);
capacity grows by half when it runs out. A sequence joins with its own prefilled batch-1 cache:
the shorter side is left-padded to the other's length and the rows are concatenated. A sequence
leaves by `index_select` of the other rows, and columns that are padding in every remaining row
are trimmed, so the batch is never longer than its longest sequence. Joins and leaves copy the
batch once; an ordinary step copies nothing but its new column.

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

    def _layers(self) -> list["GrowingLayer"]:
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
            cache.layers[:] = [GrowingLayer.holding(lay.keys, lay.values) for lay in cache.layers]
            self.cache = cache
            self.mask = torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device)
            self.lengths = [length]
            return 0
        columns = self.columns
        grow = max(0, length - columns)  # the batch is left-padded up to a longer newcomer
        columns += grow
        for mine, theirs in zip(self._layers(), cache.layers, strict=True):
            mine.hold(
                torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, columns - length)]),
                torch.cat(
                    [_left_pad(mine.values, grow), _left_pad(theirs.values, columns - length)]
                ),
            )
        self.mask = _left_pad(self.mask, grow)
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
            layer.hold(
                layer.keys.index_select(0, index)[:, :, lead:],
                layer.values.index_select(0, index)[:, :, lead:],
            )
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


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place: `keys`/`values` are views of larger buffers."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "GrowingLayer":
        layer = cls()
        layer.hold(keys, values)
        return layer

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take `keys` and `values` [batch, kv_heads, tokens, head_dim], copied into fresh
        buffers with room to grow."""
        self.is_initialized, self.device = True, keys.device
        self._keys = _with_room(keys, keys.shape[2])
        self._values = _with_room(values, values.shape[2])
        self._length = keys.shape[2]
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[2]
        end = self._length + new
        if end > self._keys.shape[2]:  # out of room: one copy into buffers half as big again
            self._keys = _with_room(self.keys, end)
            self._values = _with_room(self.values, end)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self.keys = self._keys[:, :, :end]
        self.values = self._values[:, :, :end]
        return self.keys, self.values


def _with_room(tensor: torch.Tensor, needed: int) -> torch.Tensor:
    """A buffer holding `tensor` [b, h, t, d] in its first t columns, with room for `needed`
    columns and half as many again (at least 64 more)."""
    b, h, t, d = tensor.shape
    buffer = tensor.new_empty(b, h, needed + max(64, needed // 2), d)
    buffer[:, :, :t] = tensor
    return buffer


def _left_pad(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`tensor` with `count` zero columns in front of its sequence dimension (dim 2, or 1 for a
    mask)."""
    if count == 0:
        return tensor
    dim = 2 if tensor.dim() == 4 else 1
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
