"""Held-out pretext losses against a naive loop over batches, with a stub model and objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from t3d_data import collate_crops
from t3d_eval import chance_losses, pretext_losses

K, E = 2, 8


class StubModel(torch.nn.Module):
    """Crop embedding = a linear map of the crop's mean intensities; text = a hashed bag of words.

    Records whether it ran in eval mode without gradients. ``constant=True`` maps every crop
    and report to one embedding (the chance level).
    """

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vis = torch.nn.Linear(4, E)
        self.txt = torch.nn.Embedding(50, E)
        self.bn = torch.nn.BatchNorm1d(E)  # eval mode matters: batch statistics differ
        self.constant = constant
        self.calls: list[tuple[bool, bool]] = []

    def tokenize(self, reports):
        ids = torch.tensor([[hash(w) % 50 for w in r.split()[:3]] for r in reports])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(self, crops, study_index, group, input_ids, attention_mask):
        self.calls.append((self.training, torch.is_grad_enabled()))
        n, b = crops.shape[0], input_ids.shape[0]
        feats = crops.reshape(n, 4, -1).mean(-1)
        v = self.bn(self.vis(feats))
        t = self.txt(input_ids).mean(1)
        if self.constant:
            v, t = torch.ones(n, E), torch.ones(b, E)
        x = v + t[study_index]
        vol = torch.zeros(b, E).index_add_(0, study_index, v) / K
        return {"visual_emb": v, "text_informed_emb": x, "crop_group": group[study_index],
                "volume_emb": vol, "text_emb": t, "group": group}


def naive_multi_positive(anchors, targets, ga, gt, tau, exclude_self):
    """Loop version: -1/|P| Σ_p log softmax over targets (self excluded for TCL)."""
    a = torch.nn.functional.normalize(anchors, dim=-1)
    t = torch.nn.functional.normalize(targets, dim=-1)
    losses = []
    for i in range(a.shape[0]):
        cand = [j for j in range(t.shape[0]) if not (exclude_self and j == i)]
        logits = torch.stack([a[i] @ t[j] / tau for j in cand])
        logp = logits - torch.logsumexp(logits, 0)
        pos = [k for k, j in enumerate(cand) if gt[j] == ga[i]]
        losses.append(-logp[pos].mean())
    return torch.stack(losses).mean()


class NaiveObjective(torch.nn.Module):
    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, visual_emb, text_informed_emb, crop_group, volume_emb, text_emb, group):
        tcl = naive_multi_positive(text_informed_emb, visual_emb, crop_group, crop_group,
                                   self.tau, True)
        a = 0.5 * (naive_multi_positive(volume_emb, text_emb, group, group, self.tau, False)
                   + naive_multi_positive(text_emb, volume_emb, group, group, self.tau, False))
        return {"tcl_loss": tcl, "align_loss": a, "loss": tcl + a}


def make_dataset(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    words = ["nodule", "left", "right", "cyst", "normal", "effusion"]
    return [{"crops": torch.rand(K, 1, 4, 4, 4, generator=gen),
             "report": " ".join(words[(i + j) % 6] for j in range(3)),
             "group": i % 5,  # studies 0 and 5 share a report: positives of each other
             "study_id": f"s{i}"} for i in range(n)]


def test_matches_a_naive_loop_and_drops_the_incomplete_batch():
    data = make_dataset(11)
    model, objective = StubModel(), NaiveObjective()
    model.train()
    out = pretext_losses(model, objective, data, batch_studies=4)
    assert out["batches"] == 2 and out["studies_per_batch"] == 4 and out["crops_per_batch"] == 8
    assert out["study_ids"] == [[f"s{i}" for i in range(4)], [f"s{i}" for i in range(4, 8)]]
    assert set(out["per_batch"]) == {"tcl_loss", "align_loss"}  # the total "loss" is left out
    # eval mode and no gradients inside; the caller's training flag comes back
    assert model.calls == [(False, False)] * 2 and model.training
    model.eval()
    ref: dict[str, list[float]] = {"tcl_loss": [], "align_loss": []}
    with torch.no_grad():
        for b in range(2):
            batch = collate_crops(data[4 * b: 4 * b + 4])
            tokens = model.tokenize(batch["reports"])
            losses = objective(**model(crops=batch["crops"], study_index=batch["study_index"],
                                       group=batch["group"], **tokens))
            for k in ref:
                ref[k].append(float(losses[k]))
    for k in ref:
        assert out["per_batch"][k] == pytest.approx(ref[k], rel=1e-5)
        assert out[k] == pytest.approx(np.mean(ref[k]), rel=1e-5)
    assert out["chance"] == pytest.approx({"tcl_loss": math.log(7), "align_loss": math.log(4)})


def test_constant_embeddings_give_exactly_the_chance_values():
    data = make_dataset(6)
    out = pretext_losses(StubModel(constant=True), NaiveObjective(), data, batch_studies=3)
    assert out["tcl_loss"] == pytest.approx(math.log(5), abs=1e-5)
    assert out["align_loss"] == pytest.approx(math.log(3), abs=1e-5)
    assert out["chance"] == pytest.approx(chance_losses(6, 3))


def test_several_objectives_share_the_forward_passes():
    data = make_dataset(8)
    model = StubModel()
    out = pretext_losses(model, {"a": NaiveObjective(0.1), "b": NaiveObjective(1.0)}, data, 4,
                         max_batches=1)
    assert len(model.calls) == 1 and set(out) == {"a", "b"}
    assert out["a"]["batches"] == 1 and out["a"]["tcl_loss"] != out["b"]["tcl_loss"]


def test_too_few_studies():
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretext_losses(StubModel(), NaiveObjective(), make_dataset(3), batch_studies=4)
    with pytest.raises(ValueError, match="batch_studies"):
        pretext_losses(StubModel(), NaiveObjective(), make_dataset(3), batch_studies=0)
