"""Zero-shot scores from prompt ensembles and their AUC against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from t3d_eval import prompt_embeddings, zero_shot_auc, zero_shot_scores

PROMPTS = {
    "nodule": {"positive": ["nodule is present", "a pulmonary nodule"], "negative": ["no nodule"]},
    "effusion": {"positive": ["pleural effusion"], "negative": ["no effusion", "clear pleura"]},
    "emphysema": {"positive": ["emphysema"], "negative": ["no emphysema"]},
}
# Each finding owns two axes of a 6-d space: (present, absent).
AXES = {"nodule": (0, 1), "effusion": (2, 3), "emphysema": (4, 5)}


def fake_text_encoder(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), 6)
    for i, t in enumerate(texts):
        finding = next(f for f in AXES if f in t or (f == "effusion" and "pleura" in t))
        negative = t.startswith(("no ", "clear"))
        out[i, AXES[finding][1 if negative else 0]] = 1.0 + 0.1 * i
    return out


def make_volumes(m: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (m, 3), generator=gen)
    vol = torch.randn(m, 6, generator=gen) * 0.8
    for j, (pos, neg) in enumerate(AXES.values()):
        vol[:, pos] += labels[:, j].float()
        vol[:, neg] += 1 - labels[:, j].float()
    return vol, labels


def test_prompt_embeddings_are_normalised_means_in_order():
    pos, neg = prompt_embeddings(fake_text_encoder, PROMPTS)
    assert pos.shape == neg.shape == (3, 6)
    assert torch.allclose(pos.norm(dim=1), torch.ones(3))
    assert pos[0, 0] == 1.0 and neg[1, 3] == 1.0  # findings in prompts order


def test_zero_shot_auc_matches_sklearn():
    vol, labels = make_volumes()
    scores = zero_shot_scores(vol, fake_text_encoder, PROMPTS)
    assert scores.shape == (60, 3) and scores.min() >= 0 and scores.max() <= 1
    out = zero_shot_auc(scores, labels, list(PROMPTS))
    refs = [roc_auc_score(labels[:, j].numpy(), scores[:, j].numpy()) for j in range(3)]
    for name, ref in zip(PROMPTS, refs, strict=True):
        assert out[name] == pytest.approx(ref, abs=1e-6)
    assert out["macro"] == pytest.approx(np.mean(refs), abs=1e-6)
    assert out["macro"] > 0.8 and out["skipped"] == []
    diff = zero_shot_auc(
        zero_shot_scores(vol, fake_text_encoder, PROMPTS, mode="difference"), labels, list(PROMPTS)
    )
    assert diff["macro"] == pytest.approx(out["macro"], abs=1e-6)


def test_single_class_finding_is_skipped():
    vol, labels = make_volumes()
    labels[:, 2] = 0
    out = zero_shot_auc(zero_shot_scores(vol, fake_text_encoder, PROMPTS), labels, list(PROMPTS))
    assert math.isnan(out["emphysema"]) and out["skipped"] == ["emphysema"]
    assert out["macro"] == pytest.approx((out["nodule"] + out["effusion"]) / 2)


def test_malformed_prompts_are_rejected():
    with pytest.raises(ValueError, match=r"prompts\['x'\]\['negative'\]"):
        zero_shot_scores(
            torch.randn(2, 6), fake_text_encoder, {"x": {"positive": ["x"], "negative": []}}
        )
    with pytest.raises(ValueError, match="mode"):
        zero_shot_scores(torch.randn(2, 6), fake_text_encoder, PROMPTS, mode="argmax")


def test_accepts_the_phantom_prompt_table():
    phantom = pytest.importorskip("t3d_data.phantom")
    prompts = phantom.ZERO_SHOT_PROMPTS
    vocab: dict[str, int] = {}

    def bag_of_words(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, vocab.setdefault(w, len(vocab)) % 256] += 1
        return out

    scores = zero_shot_scores(torch.randn(4, 256), bag_of_words, prompts)
    assert scores.shape == (4, len(prompts)) and torch.isfinite(scores).all()
