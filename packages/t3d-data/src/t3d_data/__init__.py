"""t3d_data: CT/report ingestion, chunked zarr v3 volume store and sub-volume crops for T3D.

Names are imported lazily (PEP 562), so ``import t3d_data`` and the CLI's ``--help`` do not
load torch or zarr. See the package README for the manifest format and a usage example.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "T3DDataError": "errors", "ManifestError": "errors", "ReportError": "errors",
    "VolumeReadError": "errors", "StoreError": "errors", "PrepareAborted": "errors",
    "StudyLoadError": "errors", "PrepareWorkerError": "errors",
    # manifest
    "StudyRecord": "manifest", "load_manifest": "manifest", "patient_split": "manifest",
    # readers
    "Volume": "readers", "read_volume": "readers", "read_image": "readers", "read_mask": "readers",
    "to_canonical": "readers",
    # text
    "ReportText": "text", "load_report": "text", "normalise_report": "text",
    "report_group_ids": "text",
    # store
    "prepare": "store", "PrepareSummary": "store", "VolumeStore": "store",
    "StoreRecord": "store", "source_hash": "store",
    # sharded prepare
    "Shard": "shards", "shard_of": "shards", "merge_shards": "shards", "IndexSummary": "shards",
    # crops
    "CropConfig": "crops", "RandCropSampler": "crops", "scale_hu_window": "crops",
    "zscore_foreground": "crops", "apply_intensity": "crops",
    # datasets (torch)
    "CropDataset": "dataset", "VolumeDataset": "dataset", "collate_crops": "dataset",
    "DataConfig": "dataset", "build_crop_loader": "dataset",
    # pre-training data (torch)
    "EpochShuffleSampler": "pretrain", "PretrainDataset": "pretrain",
    "collate_pretrain": "pretrain", "Corruption": "pretrain",
    # dataset-provided evaluation tasks (the phantom is one provider)
    "DatasetTasks": "tasks", "ReportTwins": "tasks", "TasksError": "tasks",
    "available_tasks": "tasks", "get_tasks": "tasks", "register_tasks": "tasks",
    "require_tasks": "tasks", "tasks_for_store": "tasks", "twin_reports": "tasks",
    "safe_filename": "names", "safe_join": "names",  # file names from user data
}

__all__ = [
    "__version__",
    "T3DDataError",
    "ManifestError",
    "ReportError",
    "VolumeReadError",
    "StoreError",
    "PrepareAborted",
    "StudyLoadError",
    "PrepareWorkerError",
    "StudyRecord",
    "load_manifest",
    "patient_split",
    "Volume",
    "read_volume",
    "read_image",
    "read_mask",
    "to_canonical",
    "ReportText",
    "load_report",
    "normalise_report",
    "report_group_ids",
    "prepare",
    "PrepareSummary",
    "VolumeStore",
    "StoreRecord",
    "source_hash",
    "Shard",
    "shard_of",
    "merge_shards",
    "IndexSummary",
    "CropConfig",
    "RandCropSampler",
    "scale_hu_window",
    "zscore_foreground",
    "apply_intensity",
    "CropDataset",
    "VolumeDataset",
    "collate_crops",
    "DataConfig",
    "build_crop_loader",
    "EpochShuffleSampler",
    "PretrainDataset",
    "collate_pretrain",
    "Corruption",
    "DatasetTasks",
    "ReportTwins",
    "TasksError",
    "available_tasks",
    "get_tasks",
    "register_tasks",
    "require_tasks",
    "tasks_for_store",
    "twin_reports",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't3d_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"t3d_data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from t3d_data.crops import (
        CropConfig,
        RandCropSampler,
        apply_intensity,
        scale_hu_window,
        zscore_foreground,
    )
    from t3d_data.dataset import (
        CropDataset,
        DataConfig,
        VolumeDataset,
        build_crop_loader,
        collate_crops,
    )
    from t3d_data.errors import (
        ManifestError,
        PrepareAborted,
        PrepareWorkerError,
        ReportError,
        StoreError,
        StudyLoadError,
        T3DDataError,
        VolumeReadError,
    )
    from t3d_data.manifest import StudyRecord, load_manifest, patient_split
    from t3d_data.pretrain import (
        Corruption,
        EpochShuffleSampler,
        PretrainDataset,
        collate_pretrain,
    )
    from t3d_data.readers import Volume, read_image, read_mask, read_volume, to_canonical
    from t3d_data.shards import IndexSummary, Shard, merge_shards, shard_of
    from t3d_data.store import PrepareSummary, StoreRecord, VolumeStore, prepare, source_hash
    from t3d_data.tasks import (
        DatasetTasks,
        ReportTwins,
        TasksError,
        available_tasks,
        get_tasks,
        register_tasks,
        require_tasks,
        tasks_for_store,
        twin_reports,
    )
    from t3d_data.text import ReportText, load_report, normalise_report, report_group_ids
