"""Segmentation fine-tuning and evaluation with MONAI (docs/method.md, "Evaluation").

Random ROI crops (``RandCropByPosNegLabeld``), ``DiceCELoss`` and AdamW for training; whole-volume
``sliding_window_inference`` and ``DiceMetric`` per class on the original voxel grid for testing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd
from monai.utils import convert_to_tensor
from torch import Tensor, nn
from tqdm.auto import tqdm

from t3d_eval.embedding import AIR_VALUE

__all__ = [
    "evaluate_segmentation",
    "finetune_segmentation",
    "label_fraction_subset",
    "overlay_figure",
    "predict_segmentation",
    "save_overlays",
]

T = TypeVar("T")


def label_fraction_subset(studies: Sequence[T], fraction: float, seed: int = 0) -> list[T]:
    """A seeded random subset holding ``fraction`` of the labelled studies (at least one).

    ``round(fraction * len(studies))`` studies (minimum 1), in their original order; the same
    seed always gives the same subset.

    Args:
        studies: the labelled training studies.
        fraction: in ``(0, 1]`` (e.g. 0.01, 0.1, 1.0).
        seed: subset seed.

    Returns:
        The selected studies.

    Raises:
        ValueError: if ``fraction`` is outside ``(0, 1]`` or ``studies`` is empty.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1]; got {fraction}")
    items = list(studies)
    if not items:
        raise ValueError("studies is empty")
    n = max(1, round(fraction * len(items)))
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]


def _roi(roi_size: Sequence[int] | int) -> tuple[int, int, int]:
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive ints; got {roi_size}")
    return roi  # type: ignore[return-value]


def _check_study(
    i: int, study: dict[str, Any], image_key: str = "image", label_key: str = "label"
) -> tuple[Tensor, Tensor]:
    """Return ``(image float (C, X, Y, Z), label long (1, X, Y, Z))``, or raise naming the study."""
    for key in (image_key, label_key):
        if key not in study:
            raise ValueError(
                f"study {i}: missing key {key!r} (need {image_key!r} and {label_key!r}); "
                f"has {sorted(study)}"
            )
        shape = tuple(study[key].shape)
        lead = "C" if key == image_key else "1"
        if len(shape) != 4 or (key == label_key and shape[0] != 1) or shape[0] < 1:
            raise ValueError(f"study {i}: {key!r} must have shape ({lead}, X, Y, Z); got {shape}")
    image = torch.as_tensor(study[image_key]).float()
    label = torch.as_tensor(study[label_key]).long()
    if image.shape[1:] != label.shape[1:]:
        raise ValueError(
            f"study {i}: {image_key!r} {tuple(image.shape)} and {label_key!r} "
            f"{tuple(label.shape)} differ"
        )
    return image, label


def _logits(model: Callable[[Tensor], Any], x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, list | tuple) else out


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def finetune_segmentation(
    model: nn.Module,
    train_data: Iterable[dict[str, Any]],
    roi_size: Sequence[int] | int,
    num_classes: int,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    label_fraction: float = 1.0,
    seed: int = 0,
    batch_size: int = 2,
    samples_per_volume: int = 2,
    pos_neg: tuple[float, float] = (1.0, 1.0),
    device: str | torch.device | None = None,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = False,
) -> list[float]:
    """Fine-tune a segmentation network on random ROI crops with Dice + cross-entropy.

    Each step draws ``batch_size`` studies (seeded), pads them with air to at least the ROI,
    takes ``samples_per_volume`` crops each with MONAI ``RandCropByPosNegLabeld`` (foreground /
    background centres in the ratio ``pos_neg``) and makes one AdamW step on ``DiceCELoss``. The
    budget is counted in steps, so a T3D-initialised and a from-scratch network can be given
    the same one.

    Args:
        model: ``(B, C, *roi) -> (B, num_classes, *roi)`` logits (e.g. MONAI ``SwinUNETR``).
        train_data: dicts with ``"image"`` float ``(C, X, Y, Z)`` (C channels, e.g. 1 for CT,
            4 for BraTS) and ``"label"`` int ``(1, X, Y, Z)`` (class indices
            ``0..num_classes-1``).
        roi_size: training crop size.
        num_classes: output channels, background included.
        steps: optimizer steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        label_fraction: fraction of ``train_data`` used (:func:`label_fraction_subset`).
        seed: seeds the subset, the crop sampler and ``torch``.
        batch_size: studies per step.
        samples_per_volume: crops per study per step.
        pos_neg: relative weights of foreground- and background-centred crops.
        device: where to train (default: the model's device).
        image_key: study key of the image.
        label_key: study key of the label map (``"mask"`` for ``t3d_data.VolumeDataset``).
        progress: show a tqdm bar of the steps (with the running loss) on stderr.

    Returns:
        The loss of every step.

    Raises:
        ValueError: on malformed studies or arguments.
    """
    roi = _roi(roi_size)
    if steps < 1 or batch_size < 1 or samples_per_volume < 1:
        raise ValueError(
            f"steps, batch_size and samples_per_volume must be >= 1; got {steps}, {batch_size}, "
            f"{samples_per_volume}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included); got {num_classes}")
    studies = label_fraction_subset(list(train_data), label_fraction, seed)
    checked = [_check_study(i, s, image_key, label_key) for i, s in enumerate(studies)]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device) if device is not None else _device_of(model)

    keys = ["image", "label"]
    prepare = Compose(
        [
            SpatialPadd(keys=keys, spatial_size=roi, mode="constant", value=AIR_VALUE),
            FgBgToIndicesd(keys="label", fg_postfix="_fg", bg_postfix="_bg"),
        ]
    )
    crop = RandCropByPosNegLabeld(
        keys=keys,
        label_key="label",
        spatial_size=roi,
        pos=pos_neg[0],
        neg=pos_neg[1],
        num_samples=samples_per_volume,
        fg_indices_key="label_fg",
        bg_indices_key="label_bg",
    )
    crop.set_random_state(seed=seed)
    prepared = [prepare({"image": image, "label": label}) for image, label in checked]

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.to(device).train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="seg fine-tune", unit="step", disable=not progress)
    for _ in bar:
        images, labels = [], []
        for idx in rng.integers(0, len(prepared), size=batch_size):
            for sample in crop(prepared[int(idx)]):
                # Plain tensors: MetaTensor's __torch_function__ slows every op of the network.
                images.append(convert_to_tensor(sample["image"], track_meta=False))
                labels.append(convert_to_tensor(sample["label"], track_meta=False))
        x = torch.stack(images).to(device)
        y = torch.stack(labels).to(device)
        loss = loss_fn(_logits(model, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return losses


@torch.no_grad()
def predict_segmentation(
    model: Callable[[Tensor], Any],
    image: Tensor | np.ndarray,
    roi_size: Sequence[int] | int,
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: str | torch.device | None = None,
) -> Tensor:
    """Label map of a whole volume by sliding-window inference (air padding, cropped back).

    Args:
        model: ``(B, C_in, *roi) -> (B, C, *roi)`` logits.
        image: ``(C_in, X, Y, Z)`` float.
        roi_size: window size.
        sw_batch_size: windows per forward pass.
        overlap: window overlap in ``[0, 1)``.
        device: where the model runs (default: its device).

    Returns:
        ``(X, Y, Z)`` long tensor of class indices on the input grid, on CPU.
    """
    roi = _roi(roi_size)
    device = torch.device(device) if device is not None else _device_of(model)
    x = torch.as_tensor(image).float()
    if x.ndim != 4:
        raise ValueError(f"image must have shape (C, X, Y, Z); got {tuple(x.shape)}")
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        logits = sliding_window_inference(
            x[None].to(device),
            roi,
            sw_batch_size,
            lambda t: _logits(model, t),
            overlap=overlap,
            padding_mode="constant",
            cval=AIR_VALUE,
        )
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    pred = convert_to_tensor(logits, track_meta=False).argmax(dim=1)[0].cpu()
    if tuple(pred.shape) != tuple(x.shape[1:]):
        raise RuntimeError(f"prediction {tuple(pred.shape)} not on input grid {tuple(x.shape[1:])}")
    return pred


def evaluate_segmentation(
    model: Callable[[Tensor], Any],
    volumes: Iterable[dict[str, Any]],
    roi_size: Sequence[int] | int,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: str | torch.device | None = None,
    image_key: str = "image",
    label_key: str = "label",
    per_study: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Dice per foreground class on whole volumes, on the original voxel grid.

    Every volume is predicted with :func:`predict_segmentation` (no resampling). When a study
    carries ``"original_shape"`` ``(X, Y, Z)`` (a loader padded it), prediction and label are
    cropped back to ``[:X, :Y, :Z]`` before scoring. Dice is MONAI's
    ``DiceMetric(include_background=False, reduction="mean_batch")``: a class absent from a
    volume's label is left out of that class's mean (NaN if absent everywhere).

    Args:
        model: ``(B, C, *roi) -> (B, num_classes, *roi)`` logits.
        volumes: dicts with ``"image"`` ``(C, X, Y, Z)`` and ``"label"`` ``(1, X, Y, Z)``.
        roi_size: sliding-window size.
        num_classes: classes, background included.
        class_names: names of the ``num_classes - 1`` foreground classes.
        sw_batch_size: windows per forward pass.
        overlap: window overlap.
        device: where the model runs.
        image_key: study key of the image.
        label_key: study key of the label map (``"mask"`` for ``t3d_data.VolumeDataset``).
        per_study: also return ``"per_study"``: one list per volume (in order) of its Dice per
            class (NaN where the class is absent from its label), e.g. for a bootstrap
            (``t3d_eval.class_mean_statistic``).
        progress: show a tqdm bar of the volumes on stderr.

    Returns:
        ``{class_name: dice, ..., "mean": mean over classes with a Dice}`` (and
        ``"per_study"`` when asked).

    Raises:
        ValueError: on malformed volumes, names or an empty ``volumes``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included); got {num_classes}")
    names = (
        list(class_names)
        if class_names is not None
        else [f"class_{c}" for c in range(1, num_classes)]
    )
    if len(names) != num_classes - 1:
        raise ValueError(f"{len(names)} class names for {num_classes - 1} foreground classes")
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    count = 0
    rows: list[list[float]] = []
    bar = tqdm(volumes, desc="seg test", unit="study", disable=not progress)
    for i, study in enumerate(bar):
        image, label = _check_study(i, study, image_key, label_key)
        pred = predict_segmentation(
            model,
            image,
            roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            device=device,
        )
        label = label[0]
        if "original_shape" in study:
            ox, oy, oz = (int(s) for s in study["original_shape"])
            pred, label = pred[:ox, :oy, :oz], label[:ox, :oy, :oz]
        value = metric(
            one_hot(pred[None, None], num_classes, dim=1),
            one_hot(label[None, None], num_classes, dim=1),
        )
        if per_study:
            rows.append([float(v) for v in torch.as_tensor(value).reshape(-1).tolist()])
        count += 1
    if count == 0:
        raise ValueError("volumes is empty")
    per_class = metric.aggregate().reshape(-1).tolist()
    valid = [v for v in per_class if not np.isnan(v)]
    out: dict[str, Any] = {n: float(v) for n, v in zip(names, per_class, strict=True)}
    out["mean"] = float(np.mean(valid)) if valid else float("nan")
    if per_study:
        out["per_study"] = rows
    return out


#: Windowed intensity below which a voxel is air (−900 HU with the default −1000..1000 HU
#: window, as ``t3d_data.CropConfig.air_threshold``).
AIR_THRESHOLD = 0.05


def body_mask(image_slice: np.ndarray, air_threshold: float = AIR_THRESHOLD) -> np.ndarray:
    """Pixels inside the body of a 2-D slice: non-air, with enclosed air (lungs) filled in."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(np.asarray(image_slice) > air_threshold)


def save_overlays(
    image: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    pred: Tensor | np.ndarray,
    path: str | os.PathLike[str],
    n_slices: int = 3,
    axis: int = 2,
    class_names: Sequence[str] | None = None,
    air_threshold: float | None = AIR_THRESHOLD,
) -> str:
    """Write a PNG of ``n_slices`` slices: image, ground truth overlay, prediction overlay.

    Slices are spread evenly over those containing ground-truth foreground (all slices if
    there is none). Background (class 0) is never painted, nor is air outside the body
    (:func:`body_mask`), so a network that labels the air shows as clean; a legend names the
    colour of every class. Uses matplotlib's Agg canvas directly; pyplot's global state is
    untouched. The file is written to a temporary name and renamed (atomic).

    Args:
        image: ``(1, X, Y, Z)`` or ``(X, Y, Z)``.
        label: same spatial shape, class indices.
        pred: same spatial shape, class indices.
        path: output ``.png`` path (parent folders are created).
        n_slices: rows of the figure.
        axis: slicing axis (2 = axial in RAS order).
        class_names: names of the foreground classes ``1..K`` for the legend (default
            ``class_1``, ...).
        air_threshold: windowed intensity below which pixels outside the body are left
            unpainted; ``None`` paints every non-background pixel.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: on shape mismatches or ``n_slices < 1``.
    """
    fig = overlay_figure(image, label, pred, n_slices, axis, class_names, air_threshold)
    out = os.fspath(path)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(out) or ".", f".tmp-{os.getpid()}-{os.path.basename(out)}")
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def overlay_figure(
    image: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    pred: Tensor | np.ndarray,
    n_slices: int = 3,
    axis: int = 2,
    class_names: Sequence[str] | None = None,
    air_threshold: float | None = AIR_THRESHOLD,
) -> Any:
    """The matplotlib ``Figure`` that :func:`save_overlays` writes (same arguments)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    def vol(name: str, x: Tensor | np.ndarray) -> np.ndarray:
        a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)
        a = a[0] if a.ndim == 4 else a
        if a.ndim != 3:
            raise ValueError(f"{name} must be (1, X, Y, Z) or (X, Y, Z); got {a.shape}")
        return a

    img, lab, prd = vol("image", image), vol("label", label), vol("pred", pred)
    if not img.shape == lab.shape == prd.shape:
        raise ValueError(f"shapes differ: image {img.shape}, label {lab.shape}, pred {prd.shape}")
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1; got {n_slices}")
    other = tuple(a for a in range(3) if a != axis)
    candidates = np.flatnonzero((lab > 0).any(axis=other))
    if candidates.size == 0:
        candidates = np.arange(img.shape[axis])
    picks = candidates[np.linspace(0, candidates.size - 1, n_slices).round().astype(int)]
    top = max(int(lab.max()), int(prd.max()), len(class_names or ()), 1)
    names = list(class_names) if class_names is not None else []
    names += [f"class_{c}" for c in range(len(names) + 1, top + 1)]
    cmap = colormaps["tab10" if top < 10 else "tab20"]
    vmax = max(top, cmap.N - 1)

    fig = Figure(figsize=(9, 3 * n_slices + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_slices, 3, squeeze=False)
    for row, s in enumerate(picks):
        im = np.take(img, s, axis=axis).T
        outside = ~body_mask(im, air_threshold) if air_threshold is not None else None
        for col, (title, overlay) in enumerate((("image", None), ("label", lab), ("pred", prd))):
            ax = axes[row][col]
            ax.imshow(im, cmap="gray", origin="lower")
            if overlay is not None:
                sl = np.take(overlay, s, axis=axis).T
                hide = sl == 0 if outside is None else (sl == 0) | outside
                ax.imshow(
                    np.ma.masked_array(sl, mask=hide),
                    cmap=cmap,
                    vmin=0,
                    vmax=vmax,
                    alpha=0.5,
                    origin="lower",
                    interpolation="nearest",
                )
            ax.set_title(f"{title}, slice {int(s)}")
            ax.axis("off")
    handles = [Patch(facecolor=cmap(c / vmax), alpha=0.5, label=f"{c} {names[c - 1]}")
               for c in range(1, top + 1)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3 * n_slices + 0.6), 1, 1))
    return fig
