"""Segmentation: label subsets, Dice on the original grid, fine-tuning, overlays."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
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


def test_dice_of_constructed_masks_with_known_overlap():
    """2|A∩B| / (|A| + |B|) by construction, checked against MONAI's compute_dice as well."""
    label = np.zeros((12, 10, 8), dtype=np.int64)
    pred = np.zeros_like(label)
    label[0:4, 0:4, 0:4] = 1  # 64 voxels
    pred[2:6, 0:4, 0:4] = 1  # 64 voxels, 32 shared: Dice 0.5
    label[8:10, 0:2, 0:2] = 2  # 8 voxels
    pred[8:10, 0:2, 0:4] = 2  # 16 voxels, 8 shared: Dice 2 * 8 / 24 = 2/3
    perfect = label.copy()
    perfect[label == 2] = 0  # second study: class 1 exact, class 2 absent from the label...
    perfect_pred = label.copy()  # ...but predicted: no Dice for it, not a zero
    studies = [
        {"image": torch.from_numpy(p / 10.0).float()[None], "label": torch.from_numpy(g)[None]}
        for p, g in ((pred, label), (perfect_pred, perfect))
    ]
    out = evaluate_segmentation(Oracle(), studies, roi_size=8, num_classes=NUM_CLASSES,
                                class_names=["liver", "tumour"], per_study=True)
    assert out["per_study"][0] == pytest.approx([0.5, 2 / 3], abs=1e-6)
    assert out["per_study"][1][0] == pytest.approx(1.0) and math.isnan(out["per_study"][1][1])
    assert out["liver"] == pytest.approx(0.75, abs=1e-6)  # (0.5 + 1) / 2
    assert out["tumour"] == pytest.approx(2 / 3, abs=1e-6)  # study 1 does not count
    assert out["mean"] == pytest.approx((0.75 + 2 / 3) / 2, abs=1e-6)
    monai = compute_dice(one_hot(torch.from_numpy(pred)[None, None], NUM_CLASSES, dim=1),
                         one_hot(torch.from_numpy(label)[None, None], NUM_CLASSES, dim=1),
                         include_background=False)
    assert monai[0].tolist() == pytest.approx(out["per_study"][0], abs=1e-6)


def test_label_fraction_subset():
    # Items in descending order: "in the original order" is not "sorted".
    studies = [f"study{49 - i:02d}" for i in range(50)]
    for fraction, n in ((0.01, 1), (0.07, 4), (0.1, 5), (0.2, 10), (0.5, 25), (0.9, 45)):
        subset = label_fraction_subset(studies, fraction, seed=1)
        positions = [studies.index(s) for s in subset]
        assert len(subset) == n and len(set(subset)) == n
        assert positions == sorted(positions)
    studies = list(range(50))
    assert len(label_fraction_subset(studies, 0.1, seed=0)) == 5
    assert len(label_fraction_subset(studies, 0.01, seed=0)) == 1  # at least one study
    assert label_fraction_subset(studies, 1.0) == studies
    a = label_fraction_subset(studies, 0.2, seed=3)
    assert a == label_fraction_subset(studies, 0.2, seed=3) and a == sorted(a)
    assert a != label_fraction_subset(studies, 0.2, seed=4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        label_fraction_subset(studies, 0.0)


class RecordingNet(torch.nn.Module):
    """A 1x1x1 convolution that records the study id of every crop (the image is constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.update((x.flatten(1).amax(1) * 100).round().long().tolist())
        return self.conv(x)


def test_finetune_trains_on_exactly_the_label_fraction_subset():
    studies = []
    for i in range(20):
        label = torch.zeros(1, 12, 12, 12, dtype=torch.long)
        label[:, 3:7, 3:7, 3:7] = 1
        studies.append({"image": torch.full((1, 12, 12, 12), (i + 1) / 100), "label": label})
    net = RecordingNet()
    finetune_segmentation(net, studies, roi_size=8, num_classes=2, steps=12, batch_size=2,
                          samples_per_volume=1, label_fraction=0.25, seed=3)
    chosen = label_fraction_subset(list(range(1, 21)), 0.25, seed=3)
    assert len(chosen) == 5 and net.seen == set(chosen)


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
    out = evaluate_segmentation(net, studies[:1], roi_size=16, num_classes=2)
    pred = predict_segmentation(net, studies[0]["image"], 16)
    ref = naive_dice([pred.numpy()], [studies[0]["label"][0].numpy()])[0]
    assert out["class_1"] == pytest.approx(ref, abs=1e-5) and out["mean"] == out["class_1"]
    assert ref > 0.5  # it learnt the sphere
    # A window covering the volume: one direct forward pass.
    net.eval()
    with torch.no_grad():
        direct = net(studies[0]["image"][None]).argmax(1)[0]
    assert torch.equal(predict_segmentation(net, studies[0]["image"], 32), direct)


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
    net.eval()
    with torch.no_grad():  # the window is the volume: Dice of one direct forward pass
        direct = net(studies[0]["image"][None]).argmax(1)[0]
    ref = naive_dice([direct.numpy()], [label])[0]
    assert out["class_1"] == pytest.approx(ref, abs=1e-5)


def test_save_overlays_writes_a_png(tmp_path: Path):
    study = sphere_studies(1)[0]
    path = save_overlays(
        study["image"], study["label"], study["label"][0], tmp_path / "a" / "o.png", n_slices=2
    )
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    from t3d_eval.segmentation import overlay_figure

    written = imread(path)
    assert written.shape == (round(80 * (3 * 2 + 0.6)), 80 * 9, 4)  # figure size x dpi 80
    buf = io.BytesIO()
    overlay_figure(study["image"], study["label"], study["label"][0], n_slices=2).savefig(
        buf, dpi=80, format="png")
    buf.seek(0)
    assert np.array_equal(written, imread(buf))  # the overlay figure, pixel for pixel


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


def test_t3d_data_zscore_is_monai_normalize_intensity_nonzero_channel_wise():
    """The MRI policy of t3d_data (numpy, no MONAI import there) is MONAI's transform."""
    from monai.transforms import NormalizeIntensity
    from t3d_data import zscore_foreground

    gen = np.random.default_rng(5)
    image = gen.normal(200, 50, (4, 9, 8, 7)).astype(np.float32)
    image[:, :3] = 0  # background
    image[1, 5:] = 0
    image[3] = 0  # no foreground at all
    ref = NormalizeIntensity(nonzero=True, channel_wise=True)(image.copy())
    np.testing.assert_allclose(zscore_foreground(image), np.asarray(ref), atol=1e-5)
