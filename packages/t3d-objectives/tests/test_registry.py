"""The term registry: built-ins, a term added from outside objective.py, chance values, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from t3d_objectives import (
    PRESETS,
    TERMS,
    AlignmentLoss,
    ObjectiveConfig,
    RestorationLoss,
    SigmoidAlignmentLoss,
    T3DObjective,
    Term,
    TextInformedContrastiveLoss,
    chance_losses,
    register_term,
    term_names,
    unregister_term,
)


class _L2Penalty(torch.nn.Module):
    """The toy fourth term: mean squared norm of the crop embeddings (plus an optional shift)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, emb, toy_shift=None):  # optional inputs arrive as keywords of their key
        emb = emb if toy_shift is None else emb - toy_shift
        return self.scale * emb.square().sum(-1).mean()


@pytest.fixture
def toy():
    """Registers ``toy`` (this test file is its "own file"), removed again afterwards."""
    term = register_term(Term(
        name="toy", build=lambda config: _L2Penalty(scale=2.0), inputs=("visual_emb",),
        optional_inputs=("toy_shift",),
        chance=lambda config, studies, crops: ("toy(N)", float(crops)),
    ))
    yield term
    unregister_term("toy")


def test_registry_lists_the_builtins_with_weights_and_inputs():
    builtins = {name: TERMS[name] for name in ("tcl", "tir", "align")}
    assert list(TERMS)[:3] == ["tcl", "tir", "align"]
    assert {n: t.weight_field for n, t in builtins.items()} == {
        "tcl": "w_tcl", "tir": "w_tir", "align": "w_align"}
    assert builtins["tcl"].inputs == ("text_informed_emb", "visual_emb", "crop_group")
    assert builtins["tir"].inputs == ("restored", "target")
    assert builtins["tir"].optional_inputs == ("corruption_mask",)
    assert builtins["align"].inputs == ("volume_emb", "text_emb", "group")
    assert [t.key for t in builtins.values()] == ["tcl_loss", "tir_loss", "align_loss"]
    with pytest.raises(TypeError):
        TERMS["mine"] = builtins["tcl"]  # read-only: register_term is the way in


def test_outputs_equal_the_loss_classes_called_directly(model_outputs):
    out = model_outputs()
    for kw in ({}, {"align_kind": "sigmoid", "restoration_kind": "l2", "tcl_symmetric": True}):
        objective = T3DObjective(w_tcl=0.5, w_tir=2.0, w_align=3.0, **kw)
        result = objective(**out)
        assert list(result) == ["tcl_loss", "tir_loss", "align_loss", "loss"]
        assert objective.term_names == ["tcl_loss", "tir_loss", "align_loss"]
        tcl = TextInformedContrastiveLoss(0.2, symmetric=bool(kw))(
            out["text_informed_emb"], out["visual_emb"], out["crop_group"])
        tir = RestorationLoss(kw.get("restoration_kind", "l1"))(out["restored"], out["target"])
        align_fn = SigmoidAlignmentLoss() if kw else AlignmentLoss(0.2)
        align = align_fn(out["volume_emb"], out["text_emb"], out["group"])
        for key, ref in (("tcl_loss", tcl), ("tir_loss", tir), ("align_loss", align)):
            torch.testing.assert_close(result[key], ref, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(result["loss"], 0.5 * tcl + 2.0 * tir + 3.0 * align, rtol=0, atol=0)
    # the values before the registry existed (same seeded inputs, default objective)
    ref = {"tcl_loss": 2.45819091796875, "tir_loss": 0.33366090059280396,
           "align_loss": 2.1249961853027344, "loss": 4.916848182678223}
    got = {k: v.item() for k, v in T3DObjective()(**out).items()}
    assert got == pytest.approx(ref, rel=1e-6)


def test_state_dict_keys_and_attributes_are_unchanged():
    assert sorted(T3DObjective().state_dict()) == ["align.logit_scale", "tcl.logit_scale"]
    sig = T3DObjective(align_kind="sigmoid", w_tcl=0)
    assert sorted(sig.state_dict()) == ["align.bias", "align.logit_scale"]
    assert sig.tcl is None and isinstance(sig.tir, RestorationLoss)
    assert (sig.w_tcl, sig.w_tir, sig.w_align) == (0.0, 1.0, 1.0)
    assert sig.weights == {"tcl": 0.0, "tir": 1.0, "align": 1.0}
    assert sig.term_names == ["tir_loss", "align_loss"]


def test_a_term_registered_outside_objective_py_joins_outputs_and_names(toy, model_outputs):
    out = model_outputs()
    assert list(TERMS)[-1] == "toy"
    base = T3DObjective()
    assert base.toy is None and "toy_loss" not in base(**out)  # registered = off until weighted
    objective = T3DObjective(extra_weights={"toy": 0.5})
    result = objective(**out)
    assert objective.term_names == ["tcl_loss", "tir_loss", "align_loss", "toy_loss"]
    toy_ref = 2.0 * out["visual_emb"].square().sum(-1).mean()
    torch.testing.assert_close(result["toy_loss"], toy_ref)
    torch.testing.assert_close(result["loss"], base(**out)["loss"] + 0.5 * toy_ref)
    # an optional input that only the new term reads is accepted and passed by keyword
    shifted = objective(**out, toy_shift=torch.ones(16))["toy_loss"]
    torch.testing.assert_close(shifted, 2.0 * (out["visual_emb"] - 1).square().sum(-1).mean())
    # through the config path the tools use, and in the module-level helpers
    cfg = dataclasses.replace(PRESETS["t3d-v1"], extra_weights={"toy": 0.5})
    assert T3DObjective.from_config(cfg).term_names == ["tcl_loss", "tir_loss", "toy_loss"]
    assert term_names(cfg) == ["tcl_loss", "tir_loss", "toy_loss"]
    assert chance_losses(cfg, studies=3, crops_per_study=2)["toy_loss"] == ("toy(N)", 6.0)
    assert "extra_weights={'toy': 0.5}" in repr(objective)
    # only the toy term on: the other inputs are not needed
    only = T3DObjective(w_tcl=0, w_tir=0, w_align=0, extra_weights={"toy": 1.0})
    assert set(only(visual_emb=out["visual_emb"])) == {"toy_loss", "loss"}
    with pytest.raises(ValueError, match=r"extra_weights\['toy'\]=1.0 but visual_emb was not given"):
        only(volume_emb=out["volume_emb"])


def test_chance_values_match_the_hand_formula(model_outputs):
    # TCL: log(N-1) over the N = B*K crops scored together; InfoNCE alignment: log(B)
    assert chance_losses(ObjectiveConfig(), studies=4, crops_per_study=2) == {
        "tcl_loss": ("log(7)", math.log(7)), "align_loss": ("log(4)", math.log(4))}
    # processes count only when negatives are gathered from every rank
    assert chance_losses(ObjectiveConfig(), 4, 2, processes=3)["tcl_loss"][1] == math.log(7)
    gathered = chance_losses(ObjectiveConfig(gather_distributed=True), 4, 2, processes=3)
    assert gathered == {"tcl_loss": ("log(23)", math.log(23)), "align_loss": ("log(12)", math.log(12))}
    # no chance line for disabled terms, TIR or the sigmoid loss; an objective works too
    assert chance_losses(PRESETS["t3d-v1"], 4, 2) == {"tcl_loss": ("log(7)", math.log(7))}
    assert chance_losses(T3DObjective(align_kind="sigmoid"), 4, 2) == {"tcl_loss": ("log(7)", math.log(7))}
    assert chance_losses(ObjectiveConfig(w_tcl=0), 1, 1) == {"align_loss": ("log(1)", 0.0)}
    # the claim itself: a constant visual embedding puts TCL at log(N-1) whatever the text;
    # constant volume and report embeddings put InfoNCE alignment at log(B)
    out = model_outputs(with_tir=False)
    const = {**out, "visual_emb": torch.ones(8, 16), "volume_emb": torch.ones(4, 16),
             "text_emb": torch.ones(4, 16), "group": torch.arange(4)}
    losses = T3DObjective(w_tir=0)(**const)
    chance = chance_losses(ObjectiveConfig(w_tir=0), studies=4, crops_per_study=2)
    for key in ("tcl_loss", "align_loss"):
        assert losses[key].item() == pytest.approx(chance[key][1], rel=1e-5), key
    with pytest.raises(ValueError, match="crops_per_study must be an integer >= 1; got 0"):
        chance_losses(ObjectiveConfig(), 4, 0)


def test_term_names_reads_configs_and_objectives():
    assert term_names(PRESETS["t3d"]) == ["tcl_loss", "tir_loss", "align_loss"]
    assert term_names(ObjectiveConfig(w_tir=0)) == ["tcl_loss", "align_loss"]
    assert term_names(T3DObjective(w_tcl=0)) == ["tir_loss", "align_loss"]

    class PydanticLike:
        w_tcl, w_tir, w_align, extra_weights = 1.0, 0.0, 0.0, None

    assert term_names(PydanticLike()) == ["tcl_loss"]


def test_unknown_or_misplaced_term_weights_give_clear_errors(toy, model_outputs):
    with pytest.raises(ValueError, match=r"extra_weights names unknown term 'tyo'.*did you mean 'toy'"):
        T3DObjective(extra_weights={"tyo": 0.5})
    with pytest.raises(ValueError, match=r"extra_weights names unknown term 'nope'; registered terms"):
        term_names(ObjectiveConfig(extra_weights={"nope": 1.0}))
    with pytest.raises(ValueError, match=r"extra_weights\['tcl'\].*field w_tcl; set w_tcl= instead"):
        T3DObjective(extra_weights={"tcl": 0.5})
    with pytest.raises(ValueError, match=r"extra_weights\['toy'\] must be a finite number >= 0"):
        T3DObjective(extra_weights={"toy": -1})
    with pytest.raises(ValueError, match="extra_weights must be a mapping"):
        ObjectiveConfig(extra_weights=[("toy", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got model output 'visual_embs', which no registered term"):
        T3DObjective()(**model_outputs(), visual_embs=torch.zeros(1))


def test_register_term_errors():
    def build(config):
        return _L2Penalty(1.0)

    with pytest.raises(ValueError, match="'tcl' is already registered; pass replace=True"):
        register_term(Term(name="tcl", build=build, inputs=("visual_emb",)))
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_term(Term(name="My Term", build=build, inputs=("visual_emb",)))
    for name in ("loss", "forward", "weights"):
        with pytest.raises(ValueError, match=f"term name '{name}' is reserved"):
            register_term(Term(name=name, build=build, inputs=("visual_emb",)))
    with pytest.raises(ValueError, match="inputs must be a non-empty tuple"):
        register_term(Term(name="empty", build=build, inputs=()))
    with pytest.raises(ValueError, match="no term 'empty' is registered"):
        unregister_term("empty")
    assert "empty" not in TERMS


def test_config_stays_frozen_and_hashable():
    cfg = ObjectiveConfig(extra_weights={"toy": 0.5})
    weights = {"toy": 0.5}
    assert ObjectiveConfig(extra_weights=weights).extra_weights is not weights  # private copy
    assert hash(cfg) == hash(ObjectiveConfig(extra_weights={"toy": 0.5}))
    assert cfg.to_dict()["extra_weights"] == {"toy": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.extra_weights = {}  # type: ignore[misc]
