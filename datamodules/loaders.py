"""Training data loaders that resume mid-epoch.

Lightning restores the step count from a checkpoint but, with a plain DataLoader, restarts the
epoch's batches from the first one (and re-seeds the shuffle), so a killed run trained on other
batches than an uninterrupted one. torchdata's StatefulDataLoader saves its sampler's generator
and position in the checkpoint (Lightning calls its `state_dict`), so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader


def train_loader(dataset: Dataset, batch_size: int, seed: int, collate_fn: Optional[Callable] = None,
                 shuffle: bool = True) -> StatefulDataLoader:
    """A seeded, shuffled loader whose position survives a checkpoint/resume."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                              collate_fn=collate_fn)
