"""Torch datasets and loaders over catalog splits, through the one mapper."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset


class MappedDataset(Dataset):
    """Dataset dicts mapped lazily, in the loader's workers, by ``mapper``."""

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable[[dict], dict]):
        self.dataset_dicts = list(dataset_dicts)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.dataset_dicts[index])


def keep_as_list(batch: list[dict]) -> list[dict]:
    """Detection batches stay lists: images differ in size and instance count."""
    return batch


def make_loader(dataset_dicts: Sequence[dict], mapper: Callable[[dict], dict], batch_size: int,
                shuffle: bool, num_workers: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(MappedDataset(dataset_dicts, mapper), batch_size=batch_size, shuffle=shuffle,
                      num_workers=num_workers, collate_fn=keep_as_list, generator=generator,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      drop_last=False)
