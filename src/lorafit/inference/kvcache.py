"""A key/value cache with one slot per running sequence, each at its own length (for continuous batching).

Per layer, keys and values live in (slots, kv_heads, max_len, head_dim) tensors allocated once. The engine keeps
its decoding sequences in slots 0..n-1 and the one being prefilled in slot n, so a decode step attends over the
view [0:n] and a prefill chunk over [n:m]: no gather, no copy. A sequence that leaves is replaced by the last
one (`swap`), which keeps the slots packed.

The model sees this object as its cache (transformers calls `update(keys, values, layer_idx)` in every attention
layer); `prepare` says, before each forward, which slots run, where each writes, and builds the attention mask
and position ids for those rows.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len
        self._rows = slice(0, 0)
        self._write: torch.Tensor | None = None  # (n, q) positions each row's new tokens go to
        self._kv_len = 0

    def prepare(self, first: int, starts: list[int], q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run slots first..first+len(starts)-1, row i writing q_len tokens from position starts[i].

        Returns (position_ids (n, q_len), attention mask (n, 1, q_len, kv_len), True where a query may look):
        each row sees its own earlier tokens and, causally, the new ones; never another row's.
        """
        n = len(starts)
        device = self.keys[0].device
        start = torch.tensor(starts, device=device).unsqueeze(1)  # (n, 1)
        positions = start + torch.arange(q_len, device=device)  # (n, q)
        self._rows, self._write = slice(first, first + n), positions.clamp(max=self.max_len - 1)
        self._kv_len = min(max(starts) + q_len, self.max_len)
        key_pos = torch.arange(self._kv_len, device=device)  # (kv,)
        mask = key_pos.view(1, 1, -1) <= positions.unsqueeze(-1)  # (n, q, kv)
        return positions, mask.unsqueeze(1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new keys/values (n, heads, q, dim) of the prepared rows; return those rows' whole cache."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(self._rows.start, self._rows.stop, device=key.device).unsqueeze(1)  # (n, 1)
        keys[rows, :, self._write] = key.transpose(1, 2).to(keys.dtype)  # indexed: (n, q, heads, dim)
        values[rows, :, self._write] = value.transpose(1, 2).to(values.dtype)
        return keys[self._rows, :, :self._kv_len], values[self._rows, :, :self._kv_len]

    def swap(self, i: int, j: int, length: int) -> None:
        """Exchange the first `length` positions of slots i and j."""
        pair = torch.tensor([i, j])
        for keys, values in zip(self.keys, self.values):
            keys[[j, i], :, :length] = keys[pair, :, :length]
            values[[j, i], :, :length] = values[pair, :, :length]

    # What transformers may ask of a cache besides `update` (the engine always passes position ids and a mask).
    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return len(self.keys)
