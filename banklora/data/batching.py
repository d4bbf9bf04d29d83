"""Batches for training and evaluation: padding, and the order of each epoch.

The order of an epoch is a function of (seed, epoch) alone, so a resumed run sees exactly the
batches the interrupted one would have seen, and the step number says where to continue.
"""

from __future__ import annotations

import random

import torch

from banklora.data.format import IGNORE_INDEX, Encoded

LENGTH_WINDOW = 64  # batches sorted by length together, before the batches are shuffled


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T); and
    negatives (B, T) when any example carries them (a looping answer of the model's own)."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    negatives = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if any(e.negatives for e in batch) else None
    for row, e in enumerate(batch):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
        if negatives is not None and e.negatives:
            negatives[row, : len(e)] = torch.tensor(e.negatives)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out if negatives is None else out | {"negatives": negatives}


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """The global batches of one epoch, as indices into the examples; every example once.

    by_length: 1) shuffle, 2) sort each window of LENGTH_WINDOW batches by length, 3) cut into
    batches, 4) shuffle the batches. Each batch then holds examples of similar length, so little
    compute goes to padding, while every epoch still sees the examples in a new random mix.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not by_length:
        return [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    window = LENGTH_WINDOW * global_batch  # a multiple of the batch: only the epoch's last batch can be short
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    rng.shuffle(batches)
    return batches
