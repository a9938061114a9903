"""T3DObjective: keys, weighting, skipped terms, presets, config, parameters, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from t3d_objectives import (
    AlignmentLoss,
    ObjectiveConfig,
    RestorationLoss,
    SigmoidAlignmentLoss,
    T3DObjective,
    TextInformedContrastiveLoss,
)


def test_keys_and_weighted_total_match_the_individual_losses(model_outputs):
    out = model_outputs()
    objective = T3DObjective(w_tcl=0.5, w_tir=2.0, w_align=3.0, restore_only_corrupted=True)
    result = objective(**out)
    assert set(result) == {"tcl_loss", "tir_loss", "align_loss", "loss"}
    # the objective starts both temperatures at 0.2 (the loss classes alone: 0.07)
    assert objective.tcl.scale().item() == pytest.approx(5.0)
    assert objective.align.scale().item() == pytest.approx(5.0)
    tcl = TextInformedContrastiveLoss(0.2)(out["text_informed_emb"], out["visual_emb"], out["crop_group"])
    tir = RestorationLoss(only_corrupted=True)(out["restored"], out["target"], out["corruption_mask"])
    align = AlignmentLoss(0.2)(out["volume_emb"], out["text_emb"], out["group"])
    torch.testing.assert_close(result["tcl_loss"], tcl)
    torch.testing.assert_close(result["tir_loss"], tir)
    torch.testing.assert_close(result["align_loss"], align)
    torch.testing.assert_close(result["loss"], 0.5 * tcl + 2.0 * tir + 3.0 * align)


def test_zero_weight_terms_are_not_built_computed_or_returned(model_outputs):
    objective = T3DObjective.from_preset("t3d-v1")
    assert objective.align is None
    names = [n for n, _ in objective.named_parameters()]
    assert names == ["tcl.logit_scale"]
    result = objective(**model_outputs())
    assert set(result) == {"tcl_loss", "tir_loss", "loss"}
    torch.testing.assert_close(result["loss"], result["tcl_loss"] + result["tir_loss"])
    # no TIR inputs needed when w_tir = 0
    result = T3DObjective(w_tir=0)(**model_outputs(with_tir=False))
    assert set(result) == {"tcl_loss", "align_loss", "loss"}


def test_presets_config_and_overrides():
    assert dataclasses.asdict(ObjectiveConfig()) == dataclasses.asdict(ObjectiveConfig(w_tcl=1, w_tir=1, w_align=1))
    t3d = T3DObjective.from_preset("t3d")
    assert (t3d.w_tcl, t3d.w_tir, t3d.w_align) == (1.0, 1.0, 1.0)
    sig = T3DObjective.from_preset("t3d", align_kind="sigmoid", temperature=0.1)
    assert isinstance(sig.align, SigmoidAlignmentLoss)
    assert sig.tcl.scale().item() == pytest.approx(10.0)
    cfg = ObjectiveConfig(w_align=0.0, restoration_kind="l2")
    built = T3DObjective.from_config(cfg)
    assert built.align is None and built.tir.kind == "l2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.w_tcl = 2.0  # type: ignore[misc]


def test_from_config_accepts_any_object_with_the_fields():
    class PydanticLike:  # what the training script's pydantic model looks like to us
        w_tcl, w_tir, w_align, align_kind = 1.0, 0.0, 0.5, "sigmoid"

    built = T3DObjective.from_config(PydanticLike())
    assert built.tir is None and isinstance(built.align, SigmoidAlignmentLoss)


def test_temperatures_are_parameters_and_receive_gradients(model_outputs):
    objective = T3DObjective()
    names = sorted(n for n, _ in objective.named_parameters())
    assert names == ["align.logit_scale", "tcl.logit_scale"]
    objective(**model_outputs())["loss"].backward()
    assert all(p.grad is not None and p.grad != 0 for p in objective.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w_tcl": -1.0}, r"w_tcl must be a finite number >= 0; got -1.0"),
        ({"w_align": float("nan")}, "w_align must be a finite number"),
        ({"w_tcl": 0, "w_tir": 0, "w_align": 0}, "all 0; enable at least one term"),
        ({"align_kind": "sigmoidal"}, r"align_kind must be one of .*did you mean 'sigmoid'"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T3DObjective(**kwargs)


def test_preset_and_forward_errors(model_outputs):
    with pytest.raises(ValueError, match=r"unknown objective preset 't3d_v1'.*did you mean 't3d-v1'"):
        T3DObjective.from_preset("t3d_v1")
    with pytest.raises(ValueError, match="bad override"):
        T3DObjective.from_preset("t3d", w_unknown=1.0)
    with pytest.raises(ValueError, match="w_tir=1.0 but restored/target were not given"):
        T3DObjective()(**model_outputs(with_tir=False))
    out = model_outputs()
    out["crop_group"] = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3])
    with pytest.raises(ValueError, match="group 3 has a single crop.*K >= 2"):
        T3DObjective()(**out)


def test_forward_keywords_are_the_model_output_contract():
    import inspect

    params = inspect.signature(T3DObjective.forward).parameters
    assert list(params)[1:] == [
        "visual_emb", "text_informed_emb", "crop_group", "volume_emb", "text_emb", "group",
        "restored", "target", "corruption_mask", "outputs",
    ]
    # further keys (of terms registered outside this package) arrive through **outputs
    assert params["outputs"].kind is inspect.Parameter.VAR_KEYWORD
