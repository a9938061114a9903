"""Run-time data plumbing for pre-training: a deterministic epoch sampler, corruption inside the
loader workers, and bad studies counted instead of crashing the run.

Corruption randomness is seeded from ``(seed, epoch, study index)`` like the crops, so a crop is
corrupted identically whatever the number of processes or workers, and after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from t3d_data import CropDataset, StudyLoadError, collate_crops
from t3d_objectives import CropCorruption
from torch.utils.data import Dataset, Sampler

log = logging.getLogger("t3d.pretrain")


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``; call :meth:`use_epoch`.

    The method is deliberately not called ``set_epoch``: accelerate's prepared DataLoader calls
    ``set_epoch`` with its own count of *completed* iterations, which is wrong after a loop that
    stops mid-epoch or after ``skip_first_batches``; the training loop owns the epoch.

    Only the first ``n - n % global_batch`` indices of each permutation are used, so every
    global batch is whole and the same studies form the same global batches whatever the
    number of processes (accelerate shards each global batch across them).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, global_batch: int = 1) -> None:
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.n_all = n
        self.n = n - n % global_batch

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n_all, generator=g)[: self.n].tolist())

    def __len__(self) -> int:
        return self.n


class PretrainDataset(Dataset):
    """:class:`t3d_data.CropDataset` items plus their corruption; failures become markers.

    Each item is the crop dataset's dict with ``corrupted`` and ``corruption_mask`` added, or
    ``{"error": message, "study_id": id}`` when the study cannot be read.
    """

    def __init__(self, crops: CropDataset, corruption: CropCorruption | None, seed: int) -> None:
        self.crops, self.corruption, self.seed = crops, corruption, seed

    def use_epoch(self, epoch: int) -> None:
        """Select the epoch of the crops (not ``set_epoch``: see :class:`EpochShuffleSampler`)."""
        self.crops.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        try:
            item = self.crops[idx]
        except StudyLoadError as err:
            return {"error": str(err), "study_id": getattr(err, "study_id", str(idx))}
        if self.corruption is not None:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.crops.epoch) * 1_000_003 + idx)
            corrupted, mask = self.corruption(item["crops"], generator=g)
            item["corrupted"], item["corruption_mask"] = corrupted, mask
        return item


def collate_pretrain(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`t3d_data.collate_crops` over the readable samples; ``failed`` lists the others."""
    good = [s for s in samples if "error" not in s]
    failed = [(s["study_id"], s["error"]) for s in samples if "error" in s]
    batch: dict[str, Any] = collate_crops(good) if good else {}
    if good and "corrupted" in good[0]:
        batch["corrupted"] = torch.cat([s["corrupted"] for s in good])
        batch["corruption_mask"] = torch.cat([s["corruption_mask"] for s in good])
    batch["failed"] = failed
    batch["num_samples"] = len(samples)
    return batch
