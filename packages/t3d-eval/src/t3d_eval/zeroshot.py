"""Zero-shot classification from report-style prompts (T3D v3; CLIP-style prompt ensembling).

Per finding, several positive and negative paraphrases are embedded, normalised and averaged;
a volume's score is the softmax over (positive, negative) of its cosine similarities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from t3d_eval.classification import multilabel_auc

__all__ = ["prompt_embeddings", "zero_shot_auc", "zero_shot_scores"]

Prompts = Mapping[str, Mapping[str, Sequence[str]]]


def _check_prompts(prompts: Prompts) -> None:
    if not prompts:
        raise ValueError(
            "prompts is empty; expected {finding: {'positive': [...], 'negative': [...]}}"
        )
    for finding, pair in prompts.items():
        for side in ("positive", "negative"):
            texts = pair.get(side) if isinstance(pair, Mapping) else None
            if not texts or isinstance(texts, str):
                raise ValueError(
                    f"prompts[{finding!r}][{side!r}] must be a non-empty list of strings; got {texts!r}"
                )


def prompt_embeddings(
    encode_text_fn: Callable[[list[str]], Tensor], prompts: Prompts
) -> tuple[Tensor, Tensor]:
    """Class embeddings: mean of the L2-normalised prompt embeddings, re-normalised.

    All prompts are encoded in one ``encode_text_fn`` call.

    Args:
        encode_text_fn: ``list[str] -> (B, E)`` (e.g. :func:`t3d_eval.text_encoder` of a model).
        prompts: ``{finding: {"positive": [...], "negative": [...]}}``.

    Returns:
        ``(positive (F, E), negative (F, E))`` unit vectors, findings in ``prompts`` order.

    Raises:
        ValueError: on malformed prompts or a wrong number of text embeddings.
    """
    _check_prompts(prompts)
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for pair in prompts.values():
        for side in ("positive", "negative"):
            spans.append((len(texts), len(texts) + len(pair[side])))
            texts.extend(str(t) for t in pair[side])
    emb = encode_text_fn(texts).detach().float().cpu()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(
            f"encode_text_fn returned {tuple(emb.shape)} for {len(texts)} prompts; expected (B, E)"
        )
    emb = F.normalize(emb, dim=-1)
    means = torch.stack([F.normalize(emb[a:b].mean(0), dim=-1) for a, b in spans])
    return means[0::2], means[1::2]


def zero_shot_scores(
    volume_emb: Tensor,
    encode_text_fn: Callable[[list[str]], Tensor],
    prompts: Prompts,
    mode: str = "softmax",
    temperature: float = 0.07,
) -> Tensor:
    """Score every volume for every finding from prompt similarities.

    With ``s_pos``, ``s_neg`` the cosine similarities of a volume to the positive and negative
    class embeddings (:func:`prompt_embeddings`), the score is
    ``softmax([s_pos, s_neg] / temperature)[0]`` (``mode="softmax"``, a probability) or
    ``s_pos - s_neg`` (``mode="difference"``). Both give the same AUC.

    Args:
        volume_emb: ``(M, E)`` volume embeddings.
        encode_text_fn: ``list[str] -> (B, E)``.
        prompts: ``{finding: {"positive": [...], "negative": [...]}}`` (e.g.
            ``t3d_data.phantom.ZERO_SHOT_PROMPTS``).
        mode: ``"softmax"`` or ``"difference"``.
        temperature: softmax temperature (``1 / logit_scale``).

    Returns:
        ``(M, F)`` scores, findings in ``prompts`` key order.

    Raises:
        ValueError: on a bad mode, temperature, prompts or embedding size.
    """
    if mode not in ("softmax", "difference"):
        raise ValueError(f"mode must be 'softmax' or 'difference'; got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if volume_emb.ndim != 2:
        raise ValueError(f"volume_emb must have shape (M, E); got {tuple(volume_emb.shape)}")
    pos, neg = prompt_embeddings(encode_text_fn, prompts)
    if pos.shape[1] != volume_emb.shape[1]:
        raise ValueError(
            f"text embeddings have size {pos.shape[1]} but volume_emb has {volume_emb.shape[1]}"
        )
    v = F.normalize(volume_emb.detach().float().cpu(), dim=-1)
    s_pos, s_neg = v @ pos.T, v @ neg.T
    if mode == "difference":
        return s_pos - s_neg
    return torch.sigmoid((s_pos - s_neg) / temperature)  # = 2-way softmax, positive entry


def zero_shot_auc(
    scores: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    finding_names: Sequence[str],
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Per-finding AUC of zero-shot scores, plus the macro mean over findings with both classes.

    Args:
        scores: ``(M, F)`` from :func:`zero_shot_scores`.
        labels: ``(M, F)`` binary labels.
        finding_names: the ``F`` names (``list(prompts)``).
        ignore_index: label value meaning "unknown".

    Returns:
        ``{finding: auc or NaN, "macro": float, "skipped": [findings with one class]}``.
    """
    return multilabel_auc(scores, labels, finding_names, ignore_index=ignore_index)
