"""The adapters against the real t3d_models.T3DModel and t3d_data phantom prompts (tiny preset).

Every number of the end-to-end path is recomputed from the model's own encoders by hand.
"""

from __future__ import annotations

import pytest
import t3d_eval as ev
import torch
import torch.nn.functional as F


def naive_v2r_recall_at_1(vol: torch.Tensor, rep: torch.Tensor) -> float:
    """Fraction of volumes whose own report is strictly the most cosine-similar one."""
    sim = F.normalize(vol, dim=-1) @ F.normalize(rep, dim=-1).T
    hits = [all(sim[i, i] > sim[i, j] for j in range(len(sim)) if j != i) for i in range(len(sim))]
    return sum(hits) / len(hits)


class Recording(torch.nn.Module):
    """Records the inputs and outputs of every forward pass of ``net``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.inputs.append(x)
        self.outputs.append(out)
        return out


@pytest.mark.slow
def test_tiny_t3d_model_end_to_end():
    t3d_models = pytest.importorskip("t3d_models")
    phantom = pytest.importorskip("t3d_data.phantom")
    torch.manual_seed(0)
    model = t3d_models.T3DModel.from_preset("t3d-tiny-cpu").eval()
    assert isinstance(model, ev.EncoderModel)
    reports = ["No acute findings.", "A 12 mm lung nodule."]
    samples = [
        {"image": torch.rand(1, 64, 64, 64), "report": r, "labels": torch.tensor([float(i)])}
        for i, r in enumerate(reports)
    ]
    emb = ev.embed_studies(model, samples, (64, 64, 64))
    # The crop is the whole volume: one encode_volume_crops call per study, by hand.
    with torch.no_grad():
        vol_ref = model.encode_volume_crops(torch.stack([s["image"] for s in samples]))
        rep_ref = model.encode_text(reports)
    assert torch.allclose(emb["volume_emb"], vol_ref, atol=1e-5)
    assert torch.allclose(emb["report_emb"], rep_ref, atol=1e-5)
    assert emb["labels"].tolist() == [[0.0], [1.0]]

    metrics = ev.retrieval_metrics(emb["volume_emb"], emb["report_emb"])
    assert metrics["v2r_recall@1"] == naive_v2r_recall_at_1(vol_ref, rep_ref)
    assert metrics["v2r_recall@5"] == 1.0  # two candidates
    # Perfect retrieval: volumes embedded as their own reports.
    assert ev.retrieval_metrics(emb["report_emb"], emb["report_emb"])["v2r_recall@1"] == 1.0
    # A constant volume encoder: every volume query gets the same ranking (one of 2 hits);
    # every report query sees all volumes tied, and ties count against it (no hit).
    const = ev.retrieval_metrics(torch.ones_like(emb["volume_emb"]), emb["report_emb"])
    assert const["v2r_recall@1"] == 0.5 and const["r2v_recall@1"] == 0.0

    prompts = phantom.ZERO_SHOT_PROMPTS
    scores = ev.zero_shot_scores(emb["volume_emb"], ev.text_encoder(model), prompts)
    v = F.normalize(vol_ref, dim=-1)
    texts = [t for pair in prompts.values() for side in ("positive", "negative") for t in pair[side]]
    with torch.no_grad():
        text_emb = dict(zip(texts, F.normalize(model.encode_text(texts), dim=-1), strict=True))
    for j, pair in enumerate(prompts.values()):
        pos, neg = (
            F.normalize(torch.stack([text_emb[t] for t in pair[side]]).mean(0), dim=0)
            for side in ("positive", "negative")
        )
        ref = torch.sigmoid((v @ pos - v @ neg) / 0.07)  # 2-way softmax, positive entry
        assert torch.allclose(scores[:, j], ref, atol=1e-5)

    net = Recording(t3d_models.build_monai_swinunetr(model, out_channels=2))
    label = torch.zeros(1, 64, 64, 64, dtype=torch.long)
    label[:, 20:40, 20:40, 20:40] = 1
    out = ev.evaluate_segmentation(
        net, [{"image": samples[0]["image"], "mask": label}], 64, 2, label_key="mask"
    )
    # The window is the volume: one forward pass, whose argmax the Dice must be computed on.
    assert len(net.inputs) == 1 and torch.equal(net.inputs[0], samples[0]["image"][None])
    pred = net.outputs[0].argmax(1)[0] == 1
    gt = label[0] == 1
    dice = 2 * (pred & gt).sum().item() / (pred.sum().item() + gt.sum().item())
    assert out["class_1"] == pytest.approx(dice, abs=1e-5)
