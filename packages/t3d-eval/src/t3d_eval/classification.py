"""Multi-label classification evaluation: AUC, linear probe and full fine-tuning.

AUC follows torchmetrics ``MultilabelAUROC`` (the reference implementation); the linear probe is
scikit-learn's standardised ``LogisticRegression`` per finding (docs/method.md, "Evaluation").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC, MultilabelAUROC
from tqdm.auto import tqdm

__all__ = [
    "CropClassifier",
    "finetune_classifier",
    "linear_probe",
    "linear_probe_scores",
    "multilabel_auc",
    "operating_thresholds",
    "predict_classifier",
    "threshold_metrics",
]


def _names(finding_names: Sequence[str] | None, num: int) -> list[str]:
    if finding_names is None:
        return [f"finding_{i}" for i in range(num)]
    names = list(finding_names)
    if len(names) != num:
        raise ValueError(f"{len(names)} finding names for {num} label columns")
    return names


def _as_2d(name: str, x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (M, F); got {tuple(t.shape)}")
    return t


def _two_classes(column: Tensor, ignore_index: int | None) -> bool:
    values = column if ignore_index is None else column[column != ignore_index]
    return bool((values == 0).any() and (values == 1).any())


def multilabel_auc(
    probs: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    finding_names: Sequence[str] | None = None,
    ignore_index: int | None = None,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """Per-finding ROC AUC and their macro mean, via torchmetrics ``MultilabelAUROC``.

    A finding whose labels hold a single class has no AUC: it is reported as NaN, listed under
    ``"skipped"`` and left out of the macro mean (torchmetrics would silently return 0).

    Args:
        probs: ``(M, F)`` scores (probabilities, logits or any monotonic score).
        labels: ``(M, F)`` binary labels (0/1); NaN means unknown and is ignored.
        finding_names: ``F`` names (default ``finding_0..``).
        ignore_index: label value meaning "unknown", excluded from the AUC.
        skip: finding names to report as NaN regardless (e.g. untrainable in a probe).

    Returns:
        ``{name: auc, ..., "macro": mean over valid findings (NaN if none),
        "skipped": [names]}``.

    Raises:
        ValueError: on mismatched shapes or names.

    Example:
        >>> multilabel_auc(torch.tensor([[0.1], [0.9]]), torch.tensor([[0], [1]]))["macro"]
        1.0
    """
    p = _as_2d("probs", probs).float()
    y = _as_2d("labels", labels)
    if y.is_floating_point() and torch.isnan(y).any():
        # Missing labels (t3d_data.VolumeDataset uses NaN) are ignored.
        ignore_index = -1 if ignore_index is None else ignore_index
        y = torch.nan_to_num(y, nan=float(ignore_index))
    y = y.long()
    if p.shape != y.shape:
        raise ValueError(f"probs {tuple(p.shape)} and labels {tuple(y.shape)} differ")
    names = _names(finding_names, p.shape[1])
    skip_set = set(skip)
    valid = [
        j for j, n in enumerate(names) if n not in skip_set and _two_classes(y[:, j], ignore_index)
    ]
    out: dict[str, Any] = {n: math.nan for n in names}
    if valid:
        if len(valid) == 1:  # MultilabelAUROC needs >= 2 labels
            metric = BinaryAUROC(ignore_index=ignore_index)
            per = metric(p[:, valid[0]], y[:, valid[0]]).reshape(-1)
        else:
            metric = MultilabelAUROC(num_labels=len(valid), average=None, ignore_index=ignore_index)
            per = metric(p[:, valid], y[:, valid]).reshape(-1)
        for j, v in zip(valid, per.tolist(), strict=True):
            out[names[j]] = float(v)
    out["macro"] = float(np.mean([out[names[j]] for j in valid])) if valid else math.nan
    out["skipped"] = [n for j, n in enumerate(names) if j not in valid]
    return out


def linear_probe_scores(
    train_feats: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_feats: Tensor | np.ndarray,
    finding_names: Sequence[str] | None = None,
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """The test probabilities of :func:`linear_probe` (one logistic regression per finding).

    Args:
        train_feats, train_labels, test_feats, finding_names, C, max_iter, seed: see
            :func:`linear_probe`.

    Returns:
        ``(probs (M_test, F), untrainable)``: probabilities (0.5 for a finding with a single
        class in the training labels) and the names of those untrainable findings.

    Raises:
        ValueError: on mismatched shapes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = _as_2d("train_feats", train_feats).double().numpy()
    xte = _as_2d("test_feats", test_feats).double().numpy()
    ytr = _as_2d("train_labels", train_labels).double().numpy()
    if xtr.shape[0] != ytr.shape[0]:
        raise ValueError(f"features/labels rows differ: train {xtr.shape[0]}/{ytr.shape[0]}")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train has {xtr.shape[1]} features but test has {xte.shape[1]}")
    names = _names(finding_names, ytr.shape[1])
    probs = np.full((xte.shape[0], ytr.shape[1]), 0.5)
    untrainable = []
    for j, name in enumerate(names):
        known = ~np.isnan(ytr[:, j])
        if len(np.unique(ytr[known, j])) < 2:
            untrainable.append(name)
            continue
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        )
        clf.fit(xtr[known], ytr[known, j].astype(int))
        probs[:, j] = clf.predict_proba(xte)[:, 1]
    return probs, untrainable


def linear_probe(
    train_feats: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_feats: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    finding_names: Sequence[str] | None = None,
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Frozen-feature linear probe: one standardised logistic regression per finding.

    Args:
        train_feats: ``(M_train, C)`` features.
        train_labels: ``(M_train, F)`` binary labels; NaN (unknown) rows are left out per finding.
        test_feats: ``(M_test, C)`` features.
        test_labels: ``(M_test, F)`` binary labels; NaN is ignored in the AUC.
        finding_names: ``F`` names.
        C: inverse L2 regularisation strength.
        max_iter: solver iterations.
        seed: ``random_state`` of the solver.

    Returns:
        :func:`multilabel_auc` of the test probabilities; findings with a single class in the
        training labels are skipped (NaN). The probabilities themselves:
        :func:`linear_probe_scores`.

    Raises:
        ValueError: on mismatched shapes.
    """
    xtr = _as_2d("train_feats", train_feats)
    xte = _as_2d("test_feats", test_feats)
    ytr = _as_2d("train_labels", train_labels)
    yte = _as_2d("test_labels", test_labels)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError(
            f"features/labels rows differ: train {xtr.shape[0]}/{ytr.shape[0]}, "
            f"test {xte.shape[0]}/{yte.shape[0]}"
        )
    if ytr.shape[1] != yte.shape[1]:
        raise ValueError(f"train has {ytr.shape[1]} findings but test has {yte.shape[1]}")
    names = _names(finding_names, ytr.shape[1])
    probs, untrainable = linear_probe_scores(xtr, ytr, xte, finding_names=names, C=C,
                                             max_iter=max_iter, seed=seed)
    return multilabel_auc(torch.from_numpy(probs), yte, names, skip=untrainable)


THRESHOLD_RULES = ("youden", "f1")


def operating_thresholds(
    scores: Tensor | np.ndarray, labels: Tensor | np.ndarray, rule: str = "youden"
) -> np.ndarray:
    """One decision threshold per finding, chosen on a tuning set (never on the test set).

    A study is called positive when its score is ``>=`` the threshold (scikit-learn's
    ``roc_curve`` convention). ``rule="youden"``: the ROC point maximising Youden's
    ``J = sensitivity + specificity - 1`` (the operating point CT-CLIP reports);
    ``rule="f1"``: the point of the precision-recall curve with the highest F1. Ties go to the
    higher threshold.

    Args:
        scores: ``(M, F)`` tuning-set scores.
        labels: ``(M, F)`` binary labels; NaN = unknown, ignored.
        rule: ``"youden"`` or ``"f1"``.

    Returns:
        ``(F,)`` thresholds; NaN for a finding with a single class in the tuning labels.

    Raises:
        ValueError: on a bad rule or mismatched shapes.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}; got {rule!r}")
    s = _as_2d("scores", scores).double().numpy()
    y = _as_2d("labels", labels).double().numpy()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ")
    out = np.full(s.shape[1], math.nan)
    for j in range(s.shape[1]):
        known = ~np.isnan(y[:, j])
        yj, sj = y[known, j].astype(int), s[known, j]
        if len(np.unique(yj)) < 2:
            continue
        if rule == "youden":
            fpr, tpr, thr = roc_curve(yj, sj)
            out[j] = thr[int(np.argmax(tpr - fpr))]
        else:
            prec, rec, thr = precision_recall_curve(yj, sj)
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.nan_to_num(2 * prec[:-1] * rec[:-1] / (prec[:-1] + rec[:-1]))
            best = np.flatnonzero(f1 == f1.max())
            out[j] = thr[best[-1]]  # thresholds ascend: the last tie is the highest
    return out


def threshold_metrics(
    scores: Tensor | np.ndarray, labels: Tensor | np.ndarray, thresholds: Any
) -> dict[str, np.ndarray]:
    """F1, balanced accuracy, sensitivity and specificity per finding at fixed thresholds.

    Equal to scikit-learn's ``f1_score``, ``balanced_accuracy_score``, ``recall_score`` of the
    predictions ``score >= threshold`` on the known labels (tested), vectorised over findings.

    Args:
        scores: ``(M, F)`` test scores.
        labels: ``(M, F)`` binary labels; NaN = unknown, ignored.
        thresholds: ``(F,)``, e.g. :func:`operating_thresholds` of a tuning split.

    Returns:
        ``{"f1", "balanced_accuracy", "sensitivity", "specificity"}``, each ``(F,)``; NaN for a
        finding with a single class in ``labels`` or a NaN threshold.
    """
    s = _as_2d("scores", scores).double().numpy()
    y = _as_2d("labels", labels).double().numpy()
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if s.shape != y.shape or t.shape[0] != s.shape[1]:
        raise ValueError(f"scores {s.shape}, labels {y.shape} and thresholds {t.shape} must be "
                         "(M, F), (M, F) and (F,)")
    known = ~np.isnan(y)
    pos, neg = known & (y == 1), known & (y == 0)
    pred = s >= t[None, :]
    tp, fn = (pred & pos).sum(0), (~pred & pos).sum(0)
    fp, tn = (pred & neg).sum(0), (~pred & neg).sum(0)
    bad = (pos.sum(0) == 0) | (neg.sum(0) == 0) | np.isnan(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    out = {"f1": f1, "balanced_accuracy": (sens + spec) / 2, "sensitivity": sens,
           "specificity": spec}
    return {k: np.where(bad, math.nan, v).astype(float) for k, v in out.items()}


class CropClassifier(nn.Module):
    """An encoder producing ``(N, C)`` features followed by a linear head to ``F`` logits.

    Args:
        encoder: ``nn.Module`` (fine-tuned) or plain callable (kept fixed) mapping crops
            ``(N, 1, D, H, W)`` to ``(N, C)``.
        feature_dim: ``C``.
        num_findings: ``F``.
    """

    def __init__(
        self, encoder: nn.Module | Callable[[Tensor], Tensor], feature_dim: int, num_findings: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_findings)

    def forward(self, crops: Tensor) -> Tensor:
        """Return ``(N, F)`` logits."""
        feats = self.encoder(crops)
        if feats.ndim != 2:
            raise ValueError(f"encoder must return (N, C) features; got {tuple(feats.shape)}")
        return self.head(feats)


def _device_of(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["crops"], batch["labels"]
    crops, labels = batch
    return crops, labels


def finetune_classifier(
    encoder: nn.Module | Callable[[Tensor], Tensor],
    feature_dim: int,
    num_findings: int,
    train_batches: Iterable[Any],
    *,
    epochs: int = 3,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 1e-2,
    freeze_encoder: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[CropClassifier, list[float]]:
    """Fine-tune an encoder plus a new linear head with BCE-with-logits and AdamW.

    Args:
        encoder: module or callable mapping crops ``(N, 1, D, H, W)`` to ``(N, C)``.
        feature_dim: ``C``.
        num_findings: ``F``.
        train_batches: re-iterable (a list or ``DataLoader``) of ``(crops, labels)`` tuples or
            ``{"crops", "labels"}`` dicts; labels ``(N, F)`` in ``{0, 1}``.
        epochs: passes over ``train_batches``.
        lr: encoder learning rate.
        head_lr: head learning rate.
        weight_decay: AdamW weight decay.
        freeze_encoder: train the head only.
        seed: seeds the head initialisation and ``torch`` RNG.
        device: where to train (default: the encoder's device, else CPU).
        progress: show a tqdm bar of the steps (with the running loss) on stderr.

    Returns:
        ``(model, losses)``: the trained :class:`CropClassifier` and the loss of every step.

    Raises:
        ValueError: on ``epochs < 1`` or an empty ``train_batches``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    torch.manual_seed(seed)
    model = CropClassifier(encoder, feature_dim, num_findings)
    if device is None:
        device = _device_of(encoder)
    model.to(device)
    groups = [{"params": model.head.parameters(), "lr": head_lr}]
    if isinstance(encoder, nn.Module):
        encoder.requires_grad_(not freeze_encoder)
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
        if enc_params:
            groups.append({"params": enc_params, "lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    criterion = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    model.train()
    if freeze_encoder and isinstance(encoder, nn.Module):
        encoder.eval()
    total = epochs * len(train_batches) if hasattr(train_batches, "__len__") else None
    bar = tqdm(total=total, desc="cls fine-tune", unit="step", disable=not progress)
    for _ in range(epochs):
        for batch in train_batches:
            crops, labels = _unpack(batch)
            logits = model(crops.to(device).float())
            loss = criterion(logits, labels.to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    if not losses:
        raise ValueError("train_batches yielded no batch")
    return model, losses


@torch.no_grad()
def predict_classifier(
    model: nn.Module, batches: Iterable[Any], device: str | torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Sigmoid probabilities and labels of every crop in ``batches`` (same format as training).

    Returns:
        ``(probs (M, F), labels (M, F))`` on CPU; feed them to :func:`multilabel_auc`.
    """
    if device is None:
        device = _device_of(model)
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in batches:
        crops, y = _unpack(batch)
        probs.append(torch.sigmoid(model(crops.to(device).float())).cpu())
        labels.append(torch.as_tensor(y).cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)
