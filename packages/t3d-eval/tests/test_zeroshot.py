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


def random_text_encoder(dim: int = 6, seed: int = 0):
    """Each distinct text gets a fixed random vector of random length (normalisation matters)."""
    gen = torch.Generator().manual_seed(seed)
    table: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        for t in texts:
            if t not in table:
                table[t] = torch.randn(dim, generator=gen) * (0.2 + 3 * torch.rand(1, generator=gen))
        return torch.stack([table[t] for t in texts])

    return encode


def unit(x: list[float]) -> list[float]:
    n = math.sqrt(sum(v * v for v in x))
    return [v / n for v in x]


def naive_class_embeddings(encode, prompts) -> dict[str, dict[str, list[float]]]:
    """Per finding and side: normalise each prompt embedding, average, normalise (plain lists)."""
    out: dict[str, dict[str, list[float]]] = {}
    for finding, pair in prompts.items():
        out[finding] = {}
        for side in ("positive", "negative"):
            embs = [unit(encode([t])[0].tolist()) for t in pair[side]]
            out[finding][side] = unit([sum(col) / len(embs) for col in zip(*embs, strict=True)])
    return out


def naive_scores(volumes: torch.Tensor, encode, prompts, mode: str = "softmax",
                 temperature: float = 0.07) -> np.ndarray:
    """Loop version: cosine to the positive / negative class embedding, 2-way softmax."""
    cls = naive_class_embeddings(encode, prompts)
    out = np.zeros((volumes.shape[0], len(prompts)))
    for i, v in enumerate(volumes.tolist()):
        v = unit(v)
        for j, finding in enumerate(prompts):
            s_pos = sum(a * b for a, b in zip(v, cls[finding]["positive"], strict=True))
            s_neg = sum(a * b for a, b in zip(v, cls[finding]["negative"], strict=True))
            if mode == "difference":
                out[i, j] = s_pos - s_neg
            else:
                e_pos, e_neg = math.exp(s_pos / temperature), math.exp(s_neg / temperature)
                out[i, j] = e_pos / (e_pos + e_neg)
    return out


def test_prompt_embeddings_are_normalised_means_in_order():
    pos, neg = prompt_embeddings(fake_text_encoder, PROMPTS)
    # Every prompt of a side lies on that side's axis: the class embedding is that unit axis.
    eye = torch.eye(6)
    assert torch.equal(pos, eye[[0, 2, 4]]) and torch.equal(neg, eye[[1, 3, 5]])
    encode = random_text_encoder()
    pos, neg = prompt_embeddings(encode, PROMPTS)
    ref = naive_class_embeddings(encode, PROMPTS)
    for j, finding in enumerate(PROMPTS):  # findings in prompts order
        assert pos[j].tolist() == pytest.approx(ref[finding]["positive"], abs=1e-6)
        assert neg[j].tolist() == pytest.approx(ref[finding]["negative"], abs=1e-6)
    # Not the same as normalising the plain mean: prompt lengths differ.
    plain = torch.nn.functional.normalize(encode(PROMPTS["nodule"]["positive"]).mean(0), dim=0)
    assert not torch.allclose(pos[0], plain, atol=1e-3)


def test_scores_match_a_naive_cosine_loop():
    encode = random_text_encoder()
    vol = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)) * 3
    for mode, temperature in (("softmax", 0.07), ("softmax", 0.5), ("difference", 0.07)):
        scores = zero_shot_scores(vol, encode, PROMPTS, mode=mode, temperature=temperature)
        ref = naive_scores(vol, encode, PROMPTS, mode=mode, temperature=temperature)
        assert scores.shape == ref.shape
        np.testing.assert_allclose(scores.numpy(), ref, atol=1e-5, rtol=0)


def test_zero_shot_auc_matches_sklearn():
    vol, labels = make_volumes()
    scores = zero_shot_scores(vol, fake_text_encoder, PROMPTS)
    np.testing.assert_allclose(scores.numpy(), naive_scores(vol, fake_text_encoder, PROMPTS),
                               atol=1e-5, rtol=0)
    out = zero_shot_auc(scores, labels, list(PROMPTS))
    refs = [roc_auc_score(labels[:, j].numpy(), scores[:, j].numpy()) for j in range(3)]
    for name, ref in zip(PROMPTS, refs, strict=True):
        assert out[name] == pytest.approx(ref, abs=1e-6)
    assert out["macro"] == pytest.approx(np.mean(refs), abs=1e-6)
    assert out["macro"] > 0.8 and out["skipped"] == []
    diff = zero_shot_auc(
        zero_shot_scores(vol, fake_text_encoder, PROMPTS, mode="difference"), labels, list(PROMPTS)
    )
    assert [diff[n] for n in PROMPTS] == pytest.approx(refs, abs=1e-6)


def test_known_answers_separable_inverted_and_uninformative():
    """Nodule axes carry the label exactly, effusion axes are zero, emphysema is noise."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    vol = torch.zeros(6, 6)
    vol[:, 0] = labels[:, 0] * (1 + torch.rand(6, generator=gen))  # present axis
    vol[:, 1] = (1 - labels[:, 0]) * (1 + torch.rand(6, generator=gen))  # absent axis
    vol[:, 4:] = torch.randn(6, 2, generator=gen)
    scores = zero_shot_scores(vol, fake_text_encoder, PROMPTS)
    assert (scores[labels[:, 0] == 1, 0] > 0.5).all() and (scores[labels[:, 0] == 0, 0] < 0.5).all()
    assert torch.equal(scores[:, 1], torch.full((6,), 0.5))  # s_pos = s_neg = 0
    out = zero_shot_auc(scores, labels, list(PROMPTS))
    assert out["nodule"] == 1.0 and out["effusion"] == 0.5  # all tied: half credit
    assert out["emphysema"] == pytest.approx(roc_auc_score(labels[:, 2].numpy(), scores[:, 2].numpy()))
    assert out["macro"] == pytest.approx((1.0 + 0.5 + out["emphysema"]) / 3)
    inverted = zero_shot_auc(scores, 1 - labels, list(PROMPTS))
    assert inverted["nodule"] == 0.0 and inverted["effusion"] == 0.5
    assert inverted["emphysema"] == pytest.approx(1 - out["emphysema"])


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

    vol = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    scores = zero_shot_scores(vol, bag_of_words, prompts)
    np.testing.assert_allclose(scores.numpy(), naive_scores(vol, bag_of_words, prompts),
                               atol=1e-5, rtol=0)
    # A volume embedded as a finding's positive class embedding scores it positive, and vice versa.
    pos, neg = prompt_embeddings(bag_of_words, prompts)
    j = list(prompts).index("lung_nodule")
    both = zero_shot_scores(torch.stack([pos[j], neg[j]]), bag_of_words, prompts)
    assert both[0, j] > 0.5 > both[1, j]
