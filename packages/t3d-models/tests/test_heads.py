"""Projection heads: the BatchNorm MLP default, its distributed statistics, parameter groups."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from t3d_models import ProjectionHead, T3DModel
from torch import nn

HERE = Path(__file__).resolve().parent


def test_head_kinds_and_layers():
    bn = ProjectionHead(192, 128)
    assert bn.kind == "bn_mlp"
    assert [type(m).__name__ for m in bn] == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear",
                                              "GlobalBatchNorm1d"]
    assert not bn[4].affine  # MoCo v3: the output BatchNorm has no affine parameters
    assert [type(m).__name__ for m in ProjectionHead(8, 4, "mlp")] == ["Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="one of"):
        ProjectionHead(8, 4, "bn")
    assert {m.momentum for m in bn if isinstance(m, nn.BatchNorm1d)} == {0.5}
    assert ProjectionHead(8, 4, bn_momentum=0.1)[1].momentum == 0.1
    with pytest.raises(ValueError, match="bn_momentum"):
        ProjectionHead(8, 4, bn_momentum=0.0)


def test_bn_head_centres_a_near_constant_batch():
    """Features that are 0.99-cosine alike (as SwinUNETR's pooled bottleneck is at init) leave a
    plain MLP head near-constant; the BatchNorm head spreads them out."""
    torch.manual_seed(0)
    shared = torch.randn(1, 192) * 5
    feats = shared + 0.3 * torch.randn(16, 192)
    cos = nn.functional.cosine_similarity
    for kind, low, high in (("mlp", 0.9, 1.01), ("bn_mlp", -0.5, 0.5)):
        out = ProjectionHead(192, 128, kind)(feats)
        off = cos(out[:, None], out[None], dim=-1)[~torch.eye(16, dtype=torch.bool)].mean()
        assert low < off < high, (kind, float(off))


def test_bn_head_needs_two_rows_in_training_only():
    head = ProjectionHead(8, 4)
    with pytest.raises(ValueError, match=">= 2 rows"):
        head(torch.randn(1, 8))
    assert head.eval()(torch.randn(1, 8)).shape == (1, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_batchnorm_two_gloo_processes_equal_one_batchnorm(tmp_path):
    """2 processes x 3 rows == nn.BatchNorm1d on the 6 rows: outputs, input gradients (of the sum
    of both processes' objectives, which DDP then averages), weight gradients, running stats."""
    sys.path.insert(0, str(HERE))  # spawned children unpickle the worker by module name
    try:
        import heads_dist_worker as w

        torch.manual_seed(1)
        x, upstream = torch.randn(6, 5), torch.randn(6, 5)
        mp.spawn(w.worker, args=(_free_port(), x, upstream, str(tmp_path)), nprocs=2, join=True)
    finally:
        sys.path.remove(str(HERE))
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    ref = w.make_bn(5)
    ref.__class__ = nn.BatchNorm1d  # the plain torch layer, same parameters
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * upstream).sum().backward()
    for r in (0, 1):
        rows = slice(3 * r, 3 * r + 3)
        torch.testing.assert_close(out[r]["y"], y[rows].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[r]["grad_x"], xr.grad[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[r]["running_mean"], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[r]["running_var"], ref.running_var, rtol=1e-5, atol=1e-6)
    # each process holds the weight gradient of its own rows; DDP sums/averages them
    torch.testing.assert_close(out[0]["grad_w"] + out[1]["grad_w"], ref.weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_param_groups_lr_multipliers_and_decay(tiny_model):
    from t3d_objectives import T3DObjective

    objective = T3DObjective.from_preset("t3d")
    groups = tiny_model.param_groups(lr=1e-3, weight_decay=0.05, vision_lr_mult=0.1,
                                     text_lr_mult=0.5, extra=objective)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # no parameter twice
    trainable = [p for p in [*named.values(), *objective.parameters()] if p.requires_grad]
    assert set(by_id) == {id(p) for p in trainable}  # every trainable parameter, once

    def group(name):
        return by_id[id(named[name])]

    assert group("vision.swin.swinViT.patch_embed.proj.weight")["lr"] == pytest.approx(1e-4)
    assert group("vision.swin.encoder10.layer.conv1.conv.weight")["lr"] == pytest.approx(1e-4)
    assert group("vision.swin.decoder1.transp_conv.conv.weight")["lr"] == pytest.approx(1e-3)
    text_w = next(n for n in named if n.startswith("text.") and n.endswith("weight")
                  and named[n].ndim == 2)
    assert group(text_w)["lr"] == pytest.approx(5e-4) and group(text_w)["weight_decay"] == 0.05
    assert group("proj_v.0.weight")["lr"] == pytest.approx(1e-3)
    assert group("interactor.layers.0.norm1.weight")["weight_decay"] == 0.0
    for p in objective.parameters():  # temperatures: head lr, no decay
        assert by_id[id(p)]["lr"] == pytest.approx(1e-3) and by_id[id(p)]["weight_decay"] == 0.0
    # frozen parameters are left out
    frozen = T3DModel.from_preset("t3d-tiny-cpu", text={"model_name_or_path": "minilm",
                                                        "max_length": 128, "freeze": True})
    ids = {id(p) for g in frozen.param_groups(lr=1e-3) for p in g["params"]}
    assert not any(id(p) in ids for p in frozen.text.parameters())
