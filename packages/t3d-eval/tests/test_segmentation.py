"""Segmentation: label subsets, Dice on the original grid, fine-tuning, overlays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from t3d_eval import (
    bootstrap_ci,
    class_mean_statistic,
    evaluate_segmentation,
    finetune_segmentation,
    label_fraction_subset,
    predict_segmentation,
    save_overlays,
)

NUM_CLASSES = 3


class Oracle(torch.nn.Module):
    """Reads the class index encoded in the image (value = class / 10) and outputs logits."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0] * 10).round().long().clamp(0, NUM_CLASSES - 1)
        return torch.nn.functional.one_hot(cls, NUM_CLASSES).permute(0, 4, 1, 2, 3).float() * 5


def naive_dice(preds: list[np.ndarray], labels: list[np.ndarray]) -> list[float]:
    """Per class: mean over volumes where the class is in the label, of 2|P∩G| / (|P| + |G|)."""
    out = []
    for c in range(1, NUM_CLASSES):
        scores = []
        for p, g in zip(preds, labels, strict=True):
            if (g == c).sum() == 0:
                continue
            inter = np.logical_and(p == c, g == c).sum()
            scores.append(2 * inter / ((p == c).sum() + (g == c).sum()))
        out.append(float(np.mean(scores)) if scores else math.nan)
    return out


def make_study(shape, seed, absent_class=None):
    gen = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    label[5:20, 4:15, 10:30] = 1
    label[22:30, 15:25, 5:12] = 2
    if absent_class is not None:
        label[label == absent_class] = 0
    pred = label.copy()
    flip = gen.random(shape) < 0.1
    pred[flip] = gen.integers(0, NUM_CLASSES, flip.sum())
    study = {
        "image": torch.from_numpy(pred / 10.0).float()[None],
        "label": torch.from_numpy(label)[None],
    }
    return study, pred, label


def test_dice_on_original_grid_matches_naive_numpy():
    shape = (37, 29, 41)  # not a multiple of the ROI: sliding windows pad, then crop back
    studies, preds, labels = zip(
        *(make_study(shape, 0), make_study(shape, 1, absent_class=2)), strict=True
    )
    out = evaluate_segmentation(
        Oracle(), studies, roi_size=16, num_classes=NUM_CLASSES, class_names=["liver", "tumour"]
    )
    ref = naive_dice(list(preds), list(labels))
    assert out["liver"] == pytest.approx(ref[0], abs=1e-5)
    assert out["tumour"] == pytest.approx(ref[1], abs=1e-5)
    assert out["mean"] == pytest.approx(np.mean(ref), abs=1e-5)
    pred = predict_segmentation(Oracle(), studies[0]["image"], (16, 16, 16))
    assert tuple(pred.shape) == shape and np.array_equal(pred.numpy(), preds[0])


def test_per_study_dice_matches_naive_and_reproduces_the_aggregate():
    shape = (37, 29, 41)
    made = [make_study(shape, 0), make_study(shape, 1, absent_class=2), make_study(shape, 2)]
    studies, preds, labels = zip(*made, strict=True)
    out = evaluate_segmentation(Oracle(), studies, roi_size=16, num_classes=NUM_CLASSES,
                                class_names=["liver", "tumour"], per_study=True)
    rows = np.array(out["per_study"])
    assert rows.shape == (3, 2)
    for k in range(3):
        ref = naive_dice([preds[k]], [labels[k]])
        assert rows[k] == pytest.approx(ref, abs=1e-5, nan_ok=True)
    assert math.isnan(rows[1, 1])  # class 2 absent from study 1's label
    stat = class_mean_statistic(rows)
    assert stat(np.arange(3)) == pytest.approx(out["mean"], abs=1e-6)
    ci = bootstrap_ci(np.arange(3), stat, n_resamples=200)
    assert ci.estimate == pytest.approx(out["mean"], abs=1e-6) and ci.low <= ci.high
    plain = evaluate_segmentation(Oracle(), studies, roi_size=16, num_classes=NUM_CLASSES)
    assert "per_study" not in plain and plain["mean"] == pytest.approx(out["mean"])


def test_padded_studies_are_cropped_back():
    shape = (37, 29, 41)
    study, pred, label = make_study(shape, 2)
    padded = {
        # Padding region predicted as class 1 but labelled 0: counts only if not cropped back.
        "image": torch.nn.functional.pad(study["image"], (0, 7, 0, 3, 0, 11), value=0.1),
        "mask": torch.nn.functional.pad(study["label"], (0, 7, 0, 3, 0, 11), value=0),
        "original_shape": shape,
    }
    out = evaluate_segmentation(
        Oracle(), [padded], roi_size=(16, 16, 16), num_classes=NUM_CLASSES, label_key="mask"
    )
    ref = naive_dice([pred], [label])
    assert [out["class_1"], out["class_2"]] == pytest.approx(ref, abs=1e-5)


def test_label_fraction_subset():
    studies = list(range(50))
    assert len(label_fraction_subset(studies, 0.1, seed=0)) == 5
    assert len(label_fraction_subset(studies, 0.01, seed=0)) == 1  # at least one study
    assert label_fraction_subset(studies, 1.0) == studies
    a = label_fraction_subset(studies, 0.2, seed=3)
    assert a == label_fraction_subset(studies, 0.2, seed=3) and a == sorted(a)
    assert a != label_fraction_subset(studies, 0.2, seed=4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        label_fraction_subset(studies, 0.0)


def sphere_studies(n: int, size: int = 32) -> list[dict]:
    gen = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    out = []
    for _ in range(n):
        centre = gen.integers(10, size - 10, 3)[:, None, None, None]
        label = (((grid - centre) ** 2).sum(0) < 6**2).astype(np.int64)
        image = 0.3 + 0.4 * label + gen.normal(0, 0.1, label.shape)
        out.append(
            {"image": torch.from_numpy(image).float()[None], "label": torch.from_numpy(label)[None]}
        )
    return out


def test_finetune_decreases_the_loss_on_a_tiny_problem():
    torch.manual_seed(0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(8, 16),
        strides=(2,),
        num_res_units=0,
    )
    studies = sphere_studies(3)
    losses = finetune_segmentation(
        net,
        studies,
        roi_size=16,
        num_classes=2,
        steps=25,
        lr=1e-2,
        batch_size=2,
        samples_per_volume=2,
        seed=0,
    )
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert evaluate_segmentation(net, studies[:1], roi_size=16, num_classes=2)["mean"] > 0.5


@pytest.mark.slow
def test_swinunetr_fine_tunes_and_evaluates():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=12,
        window_size=4,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )
    # 32 x 32 x 64: every axis a multiple of 32, bottleneck 1 x 1 x 2 (instance norm needs > 1).
    grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), np.arange(64), indexing="ij"))
    label = (((grid - np.array([16, 16, 32])[:, None, None, None]) ** 2).sum(0) < 36).astype(int)
    studies = [
        {
            "image": torch.from_numpy(0.3 + 0.4 * label).float()[None],
            "label": torch.from_numpy(label)[None],
        }
    ]
    losses = finetune_segmentation(
        net,
        studies,
        roi_size=(32, 32, 64),
        num_classes=2,
        steps=1,
        batch_size=1,
        samples_per_volume=2,
    )
    assert len(losses) == 1 and math.isfinite(losses[0])
    out = evaluate_segmentation(net, studies, roi_size=(32, 32, 64), num_classes=2)
    assert 0.0 <= out["class_1"] <= 1.0


def test_save_overlays_writes_a_png(tmp_path: Path):
    study = sphere_studies(1)[0]
    path = save_overlays(
        study["image"], study["label"], study["label"][0], tmp_path / "a" / "o.png", n_slices=2
    )
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_overlays_have_a_legend_and_leave_air_outside_the_body_unpainted():
    from t3d_eval.segmentation import overlay_figure

    image = np.zeros((1, 24, 24, 4), dtype=np.float32)  # air (0.0) around a body disc
    yy, xx = np.mgrid[:24, :24]
    body = (yy - 12) ** 2 + (xx - 12) ** 2 < 64
    image[0][body] = 0.5
    image[0][(yy - 12) ** 2 + (xx - 12) ** 2 < 9] = 0.0  # a lung: air enclosed by the body
    label = np.zeros_like(image, dtype=np.int64)
    label[0][body] = 1
    pred = np.full_like(label, 2)  # a bad network paints every voxel, air included
    fig = overlay_figure(image, label, pred, n_slices=1, class_names=["liver", "spleen"])
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["1 liver", "2 spleen"]
    pred_layer = fig.axes[2].get_images()[1].get_array()
    assert pred_layer.mask[0, 0] and pred_layer.mask[23, 23]  # air outside: unpainted
    assert not pred_layer.mask[12, 12] and not pred_layer.mask[12, 17]  # lung + tissue: painted
    label_layer = fig.axes[1].get_images()[1].get_array()
    assert label_layer.mask[0, 0] and not label_layer.mask[12, 17]
    plain = overlay_figure(image, label, pred, n_slices=1, air_threshold=None)
    assert not plain.axes[2].get_images()[1].get_array().mask[0, 0]
    assert [t.get_text() for t in plain.legends[0].get_texts()] == ["1 class_1", "2 class_2"]
