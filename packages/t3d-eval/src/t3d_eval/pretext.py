"""Held-out pretext losses: does the pre-training task generalise to studies never trained on?

The model and the objective are used as objects (duck typing, nothing imported from
``t3d_models`` / ``t3d_objectives``): ``model.tokenize(reports) -> {"input_ids",
"attention_mask"}``, ``model(crops=, study_index=, group=, input_ids=, attention_mask=) ->
dict`` (``t3d_models.T3DModel``) and ``objective(**model_output) -> {"tcl_loss", ...}``
(``t3d_objectives.T3DObjective``, built with ``w_tir=0`` since no corrupted crops are given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .embedding import _model_device

__all__ = ["chance_losses", "pretext_losses"]


def chance_losses(num_crops: int, num_studies: int) -> dict[str, float]:
    """Loss of an encoder that maps everything to one embedding, per batch.

    TCL (multi-positive InfoNCE of each crop against the other ``N - 1`` crops):
    ``log(N - 1)``; InfoNCE alignment over ``B`` studies: ``log(B)``. Both hold whatever the
    report groups, since every logit of a row is equal.
    """
    out = {}
    if num_crops > 1:
        out["tcl_loss"] = math.log(num_crops - 1)
    if num_studies > 0:
        out["align_loss"] = math.log(num_studies)
    return out


def pretext_losses(
    model: Any,
    objective: Callable[..., Mapping[str, torch.Tensor]]
    | Mapping[str, Callable[..., Mapping[str, torch.Tensor]]],
    dataset: Sequence[Mapping[str, Any]],
    batch_studies: int,
    *,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Pretext losses of ``model`` on a held-out split, in eval mode, without gradients.

    Batches are consecutive runs of ``batch_studies`` studies of ``dataset`` (in its order;
    an incomplete last batch is dropped, since the chance values depend on the batch shape),
    collated like training (``t3d_data.collate_crops``: the K crops of each study, report
    groups, reports). ``dataset`` items are ``t3d_data.CropDataset`` items (``crops (K, 1, D,
    H, W)``, ``report``, ``group``, ``study_id``); draw them with a fixed crop seed so every
    model is scored on the same crops. Clean crops only: no ``corrupted`` is passed, so the
    objective must not need TIR (``w_tir=0``).

    Args:
        model: a ``t3d_models.T3DModel`` (or anything with ``tokenize`` and that forward).
        objective: ``objective(**model_output)`` → dict of scalar loss tensors, or a mapping
            ``{name: objective}`` to score the same forward passes with several objectives
            (e.g. trained vs fixed temperatures).
        dataset: indexable items as above.
        batch_studies: studies per batch (B).
        collate_fn: default ``t3d_data.collate_crops``.
        device: where the model runs (default: its parameters' device).
        max_batches: score at most this many batches.

    Returns:
        For one objective: ``{"<key>": mean over batches, ...}`` for every loss key except the
        weighted total ``"loss"``, plus ``"per_batch": {key: [value per batch]}``,
        ``"chance": {key: value}`` (:func:`chance_losses`, for ``tcl_loss``/``align_loss``),
        ``"batches"``, ``"studies_per_batch"``, ``"crops_per_batch"`` and ``"study_ids"``
        (one list per batch). For a mapping: ``{name: that dict}``.

    Raises:
        ValueError: ``batch_studies < 1`` or fewer studies than one batch.
    """
    if batch_studies < 1:
        raise ValueError(f"batch_studies must be >= 1; got {batch_studies}")
    n_batches = len(dataset) // batch_studies
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise ValueError(f"{len(dataset)} studies: fewer than one batch of {batch_studies}")
    if collate_fn is None:
        from t3d_data import collate_crops as collate_fn  # noqa: N813
    objectives = dict(objective) if isinstance(objective, Mapping) else {"": objective}
    dev = torch.device(device) if device is not None else _model_device(model)
    modules = [m for m in (model, *objectives.values()) if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    per_batch: dict[str, dict[str, list[float]]] = {name: {} for name in objectives}
    study_ids: list[list[str]] = []
    crops_per_batch = None
    try:
        with torch.no_grad():
            for b in range(n_batches):
                batch = collate_fn([dataset[i] for i in
                                    range(b * batch_studies, (b + 1) * batch_studies)])
                tokens = {k: v.to(dev) for k, v in model.tokenize(list(batch["reports"])).items()}
                out = model(crops=batch["crops"].to(dev), study_index=batch["study_index"].to(dev),
                            group=batch["group"].to(dev), **tokens)
                crops_per_batch = int(batch["crops"].shape[0])
                study_ids.append(list(batch.get("study_ids", [])))
                for name, obj in objectives.items():
                    for key, value in obj(**out).items():
                        if key != "loss":
                            per_batch[name].setdefault(key, []).append(float(value))
    finally:
        for m, flag in zip(modules, was_training, strict=True):
            m.train(flag)
    chance = chance_losses(crops_per_batch or 0, batch_studies)
    results = {}
    for name, losses in per_batch.items():
        res: dict[str, Any] = {k: float(sum(v) / len(v)) for k, v in losses.items()}
        res.update(per_batch=losses, chance={k: chance[k] for k in losses if k in chance},
                   batches=n_batches, studies_per_batch=batch_studies,
                   crops_per_batch=crops_per_batch, study_ids=study_ids)
        results[name] = res
    return results[""] if "" in results and len(results) == 1 else results
