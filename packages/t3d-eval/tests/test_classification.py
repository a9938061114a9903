"""Multi-label AUC against scikit-learn, the linear probe and classifier fine-tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from t3d_eval import finetune_classifier, linear_probe, multilabel_auc, predict_classifier


def test_multilabel_auc_matches_sklearn():
    gen = np.random.default_rng(0)
    labels = gen.integers(0, 2, (80, 4))
    probs = np.clip(labels * 0.3 + gen.random((80, 4)) * 0.7, 0, 1)
    out = multilabel_auc(torch.from_numpy(probs), torch.from_numpy(labels), list("abcd"))
    refs = [roc_auc_score(labels[:, j], probs[:, j]) for j in range(4)]
    assert [out[n] for n in "abcd"] == pytest.approx(refs, abs=1e-6)
    assert out["macro"] == pytest.approx(roc_auc_score(labels, probs, average="macro"), abs=1e-6)


def test_multilabel_auc_skips_single_class_and_ignored_labels():
    labels = torch.tensor([[0, 1], [1, 1], [0, -1], [1, 1]])
    probs = torch.tensor([[0.1, 0.2], [0.9, 0.3], [0.2, 0.9], [0.8, 0.4]])
    out = multilabel_auc(probs, labels, ["a", "b"], ignore_index=-1)
    assert out["a"] == 1.0 and math.isnan(out["b"]) and out["skipped"] == ["b"]
    assert out["macro"] == 1.0


def toy_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(n, 16))
    w = np.random.default_rng(99).normal(size=(16, 3))
    return x, (x @ w > 0).astype(int)


def test_linear_probe_separates_a_separable_set():
    xtr, ytr = toy_features(300, 0)
    xte, yte = toy_features(300, 1)
    out = linear_probe(xtr, ytr, xte, yte, ["a", "b", "c"])
    assert out["macro"] > 0.95 and all(out[n] > 0.95 for n in "abc")


def test_linear_probe_is_at_chance_on_shuffled_labels():
    xtr, ytr = toy_features(300, 0)
    xte, yte = toy_features(300, 1)
    ytr = np.random.default_rng(5).permutation(ytr)
    out = linear_probe(xtr, ytr, xte, yte)
    assert abs(out["macro"] - 0.5) < 0.1


def test_linear_probe_skips_untrainable_findings():
    xtr, ytr = toy_features(50, 0)
    xte, yte = toy_features(50, 1)
    ytr[:, 1] = 1
    out = linear_probe(xtr, ytr, xte, yte, ["a", "b", "c"])
    assert math.isnan(out["b"]) and out["skipped"] == ["b"]


def test_finetune_classifier_learns_brightness():
    torch.manual_seed(0)
    crops = torch.rand(64, 1, 8, 8, 8)
    labels = torch.zeros(64, 2)
    crops[:32] += 0.5
    labels[:32, 0] = 1
    labels[::2, 1] = 1  # unlearnable
    perm = torch.randperm(64)
    batches = [(crops[perm[i : i + 16]], labels[perm[i : i + 16]]) for i in range(0, 64, 16)]
    encoder = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
    )
    model, losses = finetune_classifier(encoder, 4, 2, batches, epochs=15, lr=1e-2, head_lr=1e-2)
    assert len(losses) == 60 and np.mean(losses[-4:]) < np.mean(losses[:4])
    probs, y = predict_classifier(model, [{"crops": crops, "labels": labels}])
    assert probs.shape == (64, 2) and model.training
    assert multilabel_auc(probs, y, ["bright", "noise"])["bright"] > 0.95


def test_nan_labels_are_unknown():
    # t3d_data.VolumeDataset marks missing labels with NaN.
    labels = torch.tensor([[0.0, 1.0], [1.0, math.nan], [0.0, 0.0], [1.0, 1.0], [math.nan, 0.0]])
    probs = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.2, 0.2], [0.8, 0.7], [0.0, 0.3]])
    out = multilabel_auc(probs, labels, ["a", "b"])
    assert out["a"] == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]))
    assert out["b"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.7, 0.3]))
    xtr, ytr = toy_features(100, 0)
    ytr = ytr.astype(float)
    ytr[:10, 0] = np.nan
    assert linear_probe(xtr, ytr, *toy_features(100, 1))["macro"] > 0.9
