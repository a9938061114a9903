"""Unit tests of the pre-training loop's helpers: the collapse warning, the chance values, and
the loss keys read from the objective's term registry."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from t3d_objectives import T3DObjective, Term, register_term, unregister_term
from t3d_train.pretrain_config import PretrainConfig, resolve_objective
from t3d_train.trainer import chance_losses, collapse_warning, loss_keys, plot_losses, summarise_run


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


class _SquaredNorm(torch.nn.Module):
    """The toy term's loss: mean squared norm of the crop embeddings."""

    def forward(self, emb):
        return emb.square().sum(-1).mean()


@pytest.fixture
def toy():
    """A fourth term registered here, outside t3d_train (removed again afterwards)."""
    term = register_term(Term(name="toy", build=lambda config: _SquaredNorm(), inputs=("visual_emb",),
                              chance=lambda config, studies, crops: (f"toy({crops})", float(crops))))
    yield term
    unregister_term("toy")


def test_a_registered_term_reaches_the_summary_plot_and_chance_values(toy, tmp_path):
    """The loop reads the term names from the registry: a term registered by the test (not
    named anywhere in t3d_train) is summarised, plotted and given its chance value."""
    cfg = PretrainConfig.model_validate({
        "data": {"store": "x", "batch_size": 4, "crop": {"num_crops": 2}},
        "objective": {"extra_weights": {"toy": 0.5}},
        "run": {"output_dir": str(tmp_path), "eval_split": None}})
    keys = loss_keys(cfg)
    assert keys == ["loss", "tcl_loss", "tir_loss", "align_loss", "toy_loss"]
    assert T3DObjective.from_config(resolve_objective(cfg.objective)).term_names == keys[1:]
    chance = chance_losses(cfg, 1)
    assert chance["toy_loss"] == ("toy(8)", 8.0) and chance["tcl_loss"][0] == "log(7)"
    records = [{"step": s, "epoch": 0, "skipped": False, "lr": 1e-3, "grad_norm": 1.0,
                **{k: 10.0 / s + i for i, k in enumerate(keys)}} for s in range(1, 9)]
    log_path = tmp_path / "log.jsonl"
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    timing = {"seconds": 1.0, "data_wait_seconds": 0.1, "compute_seconds": 0.9,
              "crops_per_second": 8.0}
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    summary = summarise_run(accelerator, None, cfg, log_path, timing)
    assert list(summary["loss_start"]) == list(summary["loss_end"]) == keys
    assert summary["loss_end"]["toy_loss"] == pytest.approx(4 + 10 * (1 / 7 + 1 / 8) / 2)
    assert summary["loss_chance"]["toy_loss"] == ("toy(8)", 8.0)
    assert "toy_loss" in summary["loss_ratio"] and "chance toy(8) = 8.0000" in summary["text"]
    assert (tmp_path / "loss_curve.png").is_file()
    labels = plot_losses(records, tmp_path / "plot.png", chance)
    assert [label for label in labels if " chance " not in label] == keys
    assert "toy_loss chance toy(8) = 8.000" in labels


def test_config_checks_the_terms_through_the_registry(toy):
    base = {"data": {"store": "x", "crop": {"num_crops": 1}}, "model": {"restoration": False}}
    with pytest.raises(ValidationError, match="TCL needs K >= 2 crops"):
        PretrainConfig.model_validate({**base, "objective": {"w_tir": 0}})
    # the toy term alone: neither TCL nor TIR, so one crop and no decoder are fine
    PretrainConfig.model_validate({**base, "objective": {
        "w_tcl": 0, "w_tir": 0, "w_align": 0, "extra_weights": {"toy": 1.0}}})
    with pytest.raises(ValidationError, match="unknown term 'toyy'.*did you mean 'toy'"):
        PretrainConfig.model_validate({**base, "objective": {"w_tir": 0, "extra_weights": {"toyy": 1}}})
