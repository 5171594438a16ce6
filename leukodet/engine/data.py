"""Torch datasets and loaders over catalog splits, through the one mapper."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies. A loader worker otherwise outlives a
    ``kill -9`` of its run: torch's own check runs only between items, and a worker blocked writing
    a finished item to its pipe never gets there (seen: 650 MB held until killed by hand)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("loader worker %d: prctl(PR_SET_PDEATHSIG) failed (errno %d); it may outlive a killed run",
                       os.getpid(), ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        # Lightning seeds workers only when a loader has no worker_init_fn: do what it would have done
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def class_balanced_weights(dataset_dicts: Sequence[dict]) -> torch.Tensor:
    """A sampling weight per image: 1 / (images holding its rarest class), so each class is drawn
    about equally often, whatever the images' class mix (images without an instance weigh as the
    commonest class's)."""
    holding = [{a["category_id"] for a in record["annotations"]} for record in dataset_dicts]
    images_per_class: dict[int, int] = {}
    for classes in holding:
        for c in classes:
            images_per_class[c] = images_per_class.get(c, 0) + 1
    most = max(images_per_class.values(), default=1)
    return torch.tensor([1.0 / min((images_per_class[c] for c in classes), default=most) for classes in holding],
                        dtype=torch.double)


def make_loader(dataset_dicts: Sequence[dict], mapper: Callable[[dict], dict], batch_size: int,
                shuffle: bool, num_workers: int, seed: int = 0, class_balanced: bool = False) -> DataLoader:
    """A loader over ``dataset_dicts`` mapped by ``mapper``; ``class_balanced`` draws images with
    replacement by ``class_balanced_weights`` instead of shuffling them (an epoch is as long)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if class_balanced:
        weights = class_balanced_weights(dataset_dicts)
        sampler, shuffle = WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator), False
    return DataLoader(MappedDataset(dataset_dicts, mapper), batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                      num_workers=num_workers, collate_fn=keep_as_list, generator=generator,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      drop_last=False, worker_init_fn=partial(worker_init, os.getpid()) if num_workers else None)
