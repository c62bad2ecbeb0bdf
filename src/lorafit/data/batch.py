"""Examples to batches: right-padded tensors, in an order fixed by (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .encode import IGNORE, Example

# Batches are padded to a multiple of this many tokens. On CPU, every new sequence length makes oneDNN build (and
# keep) new matmul primitives, so free lengths grow the process step after step; buckets of 16 keep it flat for a
# few padding tokens (docs/performance.md has the figures). The padding is masked out and labelled IGNORE: results
# are the same.
PAD_MULTIPLE = 16


def collate(examples: list[Example], pad_id: int, multiple: int = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: input_ids (B, T), attention_mask (B, T), labels (B, T) padded with
    IGNORE for LM examples or (B,) class indices for classification. T is the longest example rounded up to a
    multiple of `multiple` (see PAD_MULTIPLE)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = math.ceil(max(len(e.input_ids) for e in examples) / multiple) * multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T) 1 on real tokens
    classify = isinstance(examples[0].labels, int)
    labels = torch.tensor([e.labels for e in examples], dtype=torch.long) if classify \
        else torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B,) or (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        if not classify:
            labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, pad_id: int, shuffle: bool, seed: int, epoch: int = 0,
            start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `examples`; with `shuffle`, in an order fixed by (seed, epoch) alone.

    `start` skips the first `start` batches without collating them, so a run resumed mid-epoch sees exactly the
    batches it had not seen. The last batch may be smaller than `batch_size`.
    """
    if batch_size < 1 or start < 0:
        raise ValueError(f"batch_size must be >= 1 and start >= 0, got batch_size={batch_size}, start={start}")
    order = np.random.default_rng([seed, epoch]).permutation(len(examples)) if shuffle else np.arange(len(examples))
    for b in range(start, math.ceil(len(examples) / batch_size)):
        yield collate([examples[i] for i in order[b * batch_size:(b + 1) * batch_size]], pad_id)


def to_device(batch: dict, device: torch.device) -> dict:
    """`batch` with its tensors on `device` (batches are built on the CPU; no copy when they are there already)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
