"""Pre-training data next to :func:`t3d_data.build_crop_loader`: a deterministic epoch sampler,
crop corruption inside the loader workers, and unreadable studies counted instead of crashing.

Corruption randomness is seeded from ``(seed, epoch, study index)`` like the crops, so a crop is
corrupted identically whatever the number of processes or workers, and after a resume.

The corruption is any callable ``corruption(crops (K, 1, D, H, W), generator=torch.Generator)
-> (corrupted, mask)`` (duck typing: ``t3d_objectives.CropCorruption`` is one); this package
does not import ``t3d_objectives``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, Sampler

from t3d_data.dataset import CropDataset, collate_crops
from t3d_data.errors import StoreError, StudyLoadError

__all__ = ["Corruption", "EpochShuffleSampler", "PretrainDataset", "collate_pretrain"]

_MIX = 1_000_003


class Corruption(Protocol):
    """What :class:`PretrainDataset` needs from a corruption (``t3d_objectives.CropCorruption``).

    ``corruption(crops (K, 1, D, H, W), generator=torch.Generator) -> (corrupted, mask)``, both
    ``(K, 1, D, H, W)``, all randomness drawn from ``generator``.
    """

    def __call__(self, crops: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``; call :meth:`use_epoch`.

    The method is deliberately not called ``set_epoch``: accelerate's prepared DataLoader calls
    ``set_epoch`` with its own count of *completed* iterations, which is wrong after a loop that
    stops mid-epoch or after ``skip_first_batches``; the training loop owns the epoch.

    Only the first ``n - n % global_batch`` indices of each permutation are used, so every
    global batch is whole and the same studies form the same global batches whatever the
    number of processes (accelerate shards each global batch across them).

    Args:
        n: dataset length.
        seed: the permutation seed (with the epoch: ``seed * 1_000_003 + epoch``).
        shuffle: ``False`` yields ``0 .. n' - 1`` in order.
        global_batch: studies per optimizer step over all processes.

    Raises:
        ValueError: ``n < 0`` or ``global_batch < 1``.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, global_batch: int = 1) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1; got {global_batch}")
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.n_all = n
        self.n = n - n % global_batch

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * _MIX + self.epoch)
        return iter(torch.randperm(self.n_all, generator=g)[: self.n].tolist())

    def __len__(self) -> int:
        return self.n


def _require_reports(crops: Any) -> None:
    """Refuses a crop dataset whose store has a study without a report (pre-training pairs
    every volume with its report); a duck-typed dataset without ``store`` is not checked."""
    store, indices = getattr(crops, "store", None), getattr(crops, "indices", None)
    if store is None or indices is None:
        return
    missing = [store.records[i].study_id for i in indices if store.records[i].report is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise StoreError(f"store {store.path}: study '{missing[0]}'{more} has no report; "
                         "pre-training needs a report per study: prepare a manifest whose "
                         "studies all have a 'report' (or choose a split that has them)")


class PretrainDataset(Dataset):
    """:class:`t3d_data.CropDataset` items plus their corruption; failures become markers.

    Args:
        crops: a :class:`CropDataset` (or anything with ``__getitem__``, ``__len__``,
            ``set_epoch`` and ``epoch``).
        corruption: a :class:`Corruption` callable, or ``None`` for clean crops only.
        seed: corruption seed; item ``idx`` of epoch ``e`` uses a generator seeded with
            ``(seed * 1_000_003 + e) * 1_000_003 + idx``.

    Raises:
        StoreError: a study of the selection has no report (a label-only store).

    Each item is the crop dataset's dict with ``corrupted`` and ``corruption_mask`` added, or
    ``{"error": message, "study_id": id}`` when the study cannot be read
    (:class:`t3d_data.StudyLoadError`).
    """

    def __init__(self, crops: CropDataset, corruption: Corruption | None, seed: int) -> None:
        _require_reports(crops)
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
            g = torch.Generator().manual_seed((self.seed * _MIX + self.crops.epoch) * _MIX + idx)
            corrupted, mask = self.corruption(item["crops"], generator=g)
            item["corrupted"], item["corruption_mask"] = corrupted, mask
        return item


def collate_pretrain(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`t3d_data.collate_crops` over the readable samples; ``failed`` lists the others.

    Returns:
        The :func:`collate_crops` batch of the readable samples (empty when none is), with
        ``corrupted`` and ``corruption_mask`` concatenated like ``crops`` when present,
        ``failed``: ``[(study_id, error), ...]`` and ``num_samples``: the batch size asked for.
    """
    good = [s for s in samples if "error" not in s]
    failed = [(s["study_id"], s["error"]) for s in samples if "error" in s]
    batch: dict[str, Any] = collate_crops(good) if good else {}
    if good and "corrupted" in good[0]:
        batch["corrupted"] = torch.cat([s["corrupted"] for s in good])
        batch["corruption_mask"] = torch.cat([s["corruption_mask"] for s in good])
    batch["failed"] = failed
    batch["num_samples"] = len(samples)
    return batch
