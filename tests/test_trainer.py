"""Unit tests of the pre-training loop's helpers: the collapse warning and the chance values."""

from __future__ import annotations

import math

import pytest
from t3d_train.pretrain_config import PretrainConfig
from t3d_train.trainer import chance_losses, collapse_warning


def _record(cross: float, ratio: float, informed_cross: float = 0.0) -> dict:
    rec = {"step": 7}
    for key, c in (("visual_emb", cross), ("text_informed_emb", informed_cross)):
        rec.update({f"{key}/same_cos": 0.5, f"{key}/cross_cos": c, f"{key}/std": ratio / 8,
                    f"{key}/std_ratio": ratio if key == "visual_emb" else 0.9})
    return rec


def test_collapse_warning_names_the_collapsed_embedding_and_the_fix():
    assert collapse_warning(_record(cross=0.1, ratio=0.9)) is None
    msg = collapse_warning(_record(cross=0.9999, ratio=0.01))
    assert msg.startswith("step 7: embedding collapse: visual_emb (cross-study cosine 0.9999")
    assert "text_informed_emb" not in msg and "model.head=bn_mlp" in msg
    both = collapse_warning(_record(cross=0.1, ratio=0.05, informed_cross=0.97))
    assert "visual_emb" in both and "text_informed_emb (cross-study cosine 0.9700" in both


@pytest.mark.parametrize(("gather", "procs", "tcl", "align"), [
    (False, 1, math.log(7), math.log(4)),
    (False, 2, math.log(7), math.log(4)),  # negatives from this process only
    (True, 2, math.log(15), math.log(8)),  # negatives from both processes
])
def test_chance_losses(gather, procs, tcl, align):
    cfg = PretrainConfig.model_validate({
        "data": {"store": "x", "batch_size": 4, "crop": {"num_crops": 2}},
        "objective": {"gather_distributed": gather}})
    chance = chance_losses(cfg, procs)
    assert chance["tcl_loss"][1] == pytest.approx(tcl)
    assert chance["align_loss"][1] == pytest.approx(align)
    v1 = PretrainConfig.model_validate({"data": {"store": "x"}, "objective": {"preset": "t3d-v1"}})
    assert "align_loss" not in chance_losses(v1, 1)
