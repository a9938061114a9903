"""t3d_eval: retrieval, zero-shot, classification and segmentation evaluation for T3D.

Metrics take plain tensors and callables; models are used by duck typing through
:class:`EncoderModel` (``encode_volume_crops``, ``encode_text``). See the package README.
"""

from __future__ import annotations

from t3d_eval.bootstrap import (
    Interval,
    binary_auc,
    bootstrap_ci,
    check_same_units,
    class_mean_statistic,
    cluster_resamples,
    macro_auc_statistic,
)
from t3d_eval.classification import (
    CropClassifier,
    finetune_classifier,
    linear_probe,
    linear_probe_scores,
    multilabel_auc,
    operating_thresholds,
    predict_classifier,
    threshold_metrics,
)
from t3d_eval.distributed import gather_embeddings
from t3d_eval.embedding import (
    AIR_VALUE,
    FEATURE_KINDS,
    CropFeatures,
    EncoderModel,
    crop_encoder,
    embed_studies,
    embed_volumes,
    sliding_window_starts,
    text_encoder,
    volume_embedding_from_crops,
    volume_embedding_sliding,
)
from t3d_eval.pretext import chance_losses, pretext_losses
from t3d_eval.results import MeanStd, aggregate_seeds, flatten_results, read_results, write_results
from t3d_eval.retrieval import (
    chance_retrieval,
    cosine_similarity_matrix,
    group_ids,
    retrieval_metrics,
    retrieval_ranks,
    twin_accuracy,
)
from t3d_eval.segmentation import (
    evaluate_segmentation,
    finetune_segmentation,
    label_fraction_subset,
    predict_segmentation,
    save_overlays,
)
from t3d_eval.zeroshot import prompt_embeddings, zero_shot_auc, zero_shot_scores

__version__ = "0.1.0"
__all__ = [
    "AIR_VALUE",
    "FEATURE_KINDS",
    "CropClassifier",
    "CropFeatures",
    "EncoderModel",
    "Interval",
    "MeanStd",
    "aggregate_seeds",
    "binary_auc",
    "bootstrap_ci",
    "chance_losses",
    "chance_retrieval",
    "check_same_units",
    "class_mean_statistic",
    "cluster_resamples",
    "cosine_similarity_matrix",
    "crop_encoder",
    "embed_studies",
    "embed_volumes",
    "evaluate_segmentation",
    "finetune_classifier",
    "finetune_segmentation",
    "flatten_results",
    "gather_embeddings",
    "group_ids",
    "label_fraction_subset",
    "linear_probe",
    "linear_probe_scores",
    "macro_auc_statistic",
    "multilabel_auc",
    "operating_thresholds",
    "predict_classifier",
    "predict_segmentation",
    "pretext_losses",
    "prompt_embeddings",
    "read_results",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_overlays",
    "sliding_window_starts",
    "text_encoder",
    "threshold_metrics",
    "twin_accuracy",
    "volume_embedding_from_crops",
    "volume_embedding_sliding",
    "write_results",
    "zero_shot_auc",
    "zero_shot_scores",
]
