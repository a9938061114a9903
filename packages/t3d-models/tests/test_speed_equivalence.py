"""Speed knobs change the speed, not the maths: losses and every gradient of a full T3D step
(model + ``T3DObjective``) with the knob on equal the eager reference within a stated tolerance.

Knobs (docs/performance.md): ``vision.attention="sdpa"`` (window attention through
``scaled_dot_product_attention``), ``vision.channels_last`` (``channels_last_3d`` convolutions).
Tolerance (fp32; only the summation order differs): each loss within 1e-4 relative; each gradient
tensor within 1e-3 of its largest entry (norm weights sum ~10^5 voxel terms; measured up to
1.2e-4), plus 1e-6 of the step's largest gradient for gradients that are zero in exact
arithmetic (attention key biases: softmax is shift-invariant), which are pure rounding.
"""

from __future__ import annotations

import pytest
import torch

TOL = 1e-4
GRAD_TOL = 1e-3

REPORTS = ["No acute findings. Lungs are clear.",
           "Spiculated nodule of 12 mm in the right upper lobe, suspicious for malignancy."]


def _config(**vision):
    from t3d_models import T3DModelConfig

    cfg = T3DModelConfig.from_preset("t3d-tiny-cpu")  # 64^3 crops: the smallest the
    # decoder's instance norm trains on (32^3 leaves a 1^3 bottleneck)
    # the reference is eager whatever the preset's defaults (it ships sdpa + channels_last)
    knobs = {"attention": "eager", "channels_last": False, **vision}
    return cfg.model_copy(update={"vision": cfg.vision.model_copy(update=knobs)})


@pytest.fixture(scope="module")
def reference():
    """The eager model's weights, a batch and its (losses, gradients)."""
    from t3d_models import T3DModel

    torch.manual_seed(0)
    model = T3DModel(_config()).train()
    assert not any(type(m).__name__.startswith("SDPA") for m in model.modules())  # eager
    g = torch.Generator().manual_seed(3)
    crops = torch.rand(4, 1, 64, 64, 64, generator=g)
    corrupted = crops.clone()
    corrupted[:, :, :16] = torch.rand(4, 1, 16, 64, 64, generator=g)
    batch = {"crops": crops, "corrupted": corrupted, "study_index": torch.tensor([0, 0, 1, 1]),
             "group": torch.tensor([0, 1]), **model.tokenize(REPORTS)}
    return model.state_dict(), batch, _step(model, batch)


def _step(model, batch):
    from t3d_objectives import T3DObjective

    torch.manual_seed(7)  # the same text-dropout draws in every variant
    objective = T3DObjective()
    losses = objective(**model(**batch))
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("vision", [{"attention": "sdpa", "channels_last": True}],
                         ids=["sdpa+channels_last"])  # sdpa alone: the module test below
def test_step_equals_eager_reference(reference, vision):
    from t3d_models import T3DModel

    state, batch, (ref_losses, ref_grads) = reference
    model = T3DModel(_config(**vision)).train()
    model.load_state_dict(state)
    if vision.get("attention") == "sdpa":
        assert sum(type(m).__name__.startswith("SDPA") for m in model.modules()) == 8
    if vision.get("channels_last"):
        conv = model.vision.swin.encoder1.layer.conv1.conv.weight
        assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    losses, grads = _step(model, batch)
    for key in ("loss", "tcl_loss", "tir_loss", "align_loss"):
        assert abs(losses[key] - ref_losses[key]) <= TOL * abs(ref_losses[key]), key
    assert grads.keys() == ref_grads.keys()
    floor = 1e-6 * max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = float((ref - grads[name]).abs().max())
        assert err <= GRAD_TOL * float(ref.abs().max()) + floor, (name, err)


def test_sdpa_window_attention_matches_monai_with_shift_mask_and_dropout_off():
    """One shifted-window attention module, values and gradients, against MONAI's own forward
    (a relative-position bias far from zero and a mask that hides keys)."""
    import copy

    from monai.networks.nets.swin_unetr import WindowAttention
    from t3d_models.vision import use_sdpa_attention

    torch.manual_seed(0)
    ref = WindowAttention(12, 3, (4, 4, 4)).train()
    torch.nn.init.normal_(ref.relative_position_bias_table, std=1.0)
    fast = copy.deepcopy(ref)
    assert use_sdpa_attention(fast) == 1 and use_sdpa_attention(fast) == 0  # idempotent
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2 * 8, 64, 12)
    mask = torch.zeros(8, 64, 64)
    mask[::3, :, 10:30] = -100.0
    outs = []
    for m in (ref, fast):
        xx = x.clone().requires_grad_()
        y = m(xx, mask)
        (y * y).sum().backward()
        outs.append((y.detach(), xx.grad, m.relative_position_bias_table.grad))
    for a, b in zip(*outs, strict=True):
        assert _close(a, b) <= TOL
    assert pytest.approx(0.0, abs=1e-3) != float(outs[0][2].abs().max())  # the bias is used
    pickled = copy.deepcopy(fast)  # the switched class survives copying (and pickling by name)
    assert type(pickled) is type(fast)


def test_tiny_preset_ships_the_tested_knobs():
    """The CPU preset's defaults are the knobs this file proves equal (docs/performance.md)."""
    from t3d_models import T3DModelConfig

    vision = T3DModelConfig.from_preset("t3d-tiny-cpu").vision
    assert (vision.attention, vision.channels_last) == ("sdpa", True)


def test_unknown_attention_kind_is_refused():
    from pydantic import ValidationError
    from t3d_models import VisionConfig
    from t3d_models.vision import SwinUNETRBackbone

    with pytest.raises(ValidationError, match="attention"):
        VisionConfig(attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        SwinUNETRBackbone(feature_size=12, window_size=4, attention="flash")
