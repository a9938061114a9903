"""The adapters against the real t3d_models.T3DModel and t3d_data phantom prompts (tiny preset)."""

from __future__ import annotations

import pytest
import t3d_eval as ev
import torch


@pytest.mark.slow
def test_tiny_t3d_model_end_to_end():
    t3d_models = pytest.importorskip("t3d_models")
    phantom = pytest.importorskip("t3d_data.phantom")
    torch.manual_seed(0)
    model = t3d_models.T3DModel.from_preset("t3d-tiny-cpu").eval()
    assert isinstance(model, ev.EncoderModel)
    samples = [
        {"image": torch.rand(1, 64, 64, 64), "report": r, "labels": torch.tensor([float(i)])}
        for i, r in enumerate(["No acute findings.", "A 12 mm lung nodule."])
    ]
    emb = ev.embed_studies(model, samples, (64, 64, 64))
    assert emb["volume_emb"].shape[0] == emb["report_emb"].shape[0] == 2
    assert emb["volume_emb"].shape[1] == emb["report_emb"].shape[1]
    assert 0.0 <= ev.retrieval_metrics(emb["volume_emb"], emb["report_emb"])["v2r_recall@1"] <= 1.0
    prompts = phantom.ZERO_SHOT_PROMPTS
    scores = ev.zero_shot_scores(emb["volume_emb"], ev.text_encoder(model), prompts)
    assert scores.shape == (2, len(prompts)) and torch.isfinite(scores).all()

    net = t3d_models.build_monai_swinunetr(model, out_channels=2)
    label = torch.zeros(1, 64, 64, 64, dtype=torch.long)
    label[:, 20:40, 20:40, 20:40] = 1
    out = ev.evaluate_segmentation(
        net, [{"image": samples[0]["image"], "mask": label}], 64, 2, label_key="mask"
    )
    assert 0.0 <= out["class_1"] <= 1.0
