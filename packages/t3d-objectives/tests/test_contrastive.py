"""TextInformedContrastiveLoss against a loop reference, its invariances, the text-shortcut
property, argument errors and 2-process equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from t3d_objectives import TextInformedContrastiveLoss

GROUPS = torch.tensor([4, 4, 9, 9, 9, -2, -2, 4])


def reference_direction(anchors, targets, groups, scale):
    """Naive double loop over anchors a and positives p; denominator over b != a."""
    a_n, t_n = F.normalize(anchors, dim=1), F.normalize(targets, dim=1)
    n = len(groups)
    total = 0.0
    for a in range(n):
        denom = sum(torch.exp(scale * a_n[a] @ t_n[b]) for b in range(n) if b != a)
        positives = [p for p in range(n) if p != a and groups[p] == groups[a]]
        total = total - sum(torch.log(torch.exp(scale * a_n[a] @ t_n[p]) / denom) for p in positives) / len(positives)
    return total / n


def reference(x, v, groups, scale, symmetric=False):
    loss = reference_direction(x, v, groups, scale)
    if symmetric:
        loss = 0.5 * (loss + reference_direction(v, x, groups, scale))
    return loss


def _data(n=8, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference_values_and_gradients(symmetric):
    x, v = _data()
    loss_fn = TextInformedContrastiveLoss(0.2, symmetric=symmetric).double()
    xs, vs = x.clone().requires_grad_(), v.clone().requires_grad_()
    loss = loss_fn(xs, vs, GROUPS)
    loss.backward()
    xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.2), dtype=torch.float64, requires_grad=True)
    ref = reference(xr, vr, GROUPS, scale.exp(), symmetric)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(vs.grad, vr.grad)
    torch.testing.assert_close(loss_fn.logit_scale.grad, scale.grad)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck(symmetric):
    x, v = _data(n=6, d=4)
    groups = torch.tensor([0, 1, 0, 1, 2, 2])
    loss_fn = TextInformedContrastiveLoss(0.5, learnable_temperature=False, symmetric=symmetric)
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn(a, b, groups), (x.requires_grad_(), v.requires_grad_())
    )


def test_chance_value_with_constant_visual_whatever_the_text():
    loss_fn = TextInformedContrastiveLoss()
    n = len(GROUPS)
    v = torch.randn(1, 16).expand(n, 16)
    for seed in range(3):
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        x.requires_grad_()
        loss = loss_fn(x, v, GROUPS)
        torch.testing.assert_close(loss, torch.tensor(math.log(n - 1)))
        loss.backward()  # and the text pathway gets no gradient at all
        torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_symmetric_variant_is_only_bounded_below_by_chance():
    """Swapped direction softmaxes over x: with constant v it depends on x and is >= log(N-1)."""
    n = len(GROUPS)
    v = torch.randn(1, 16).expand(n, 16)
    loss_fn = TextInformedContrastiveLoss(symmetric=True)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    assert loss_fn(x, v, GROUPS) > math.log(n - 1) + 1e-3
    # equality when every x_b is equally similar to v
    torch.testing.assert_close(loss_fn(v.clone(), v, GROUPS), torch.tensor(math.log(n - 1)))
    # and it never goes below chance, whatever x (random search)
    for seed in range(20):
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * 5
        assert loss_fn(x, v, GROUPS) >= math.log(n - 1) - 1e-5


def test_permutation_invariance_and_arbitrary_group_ids():
    x, v = _data(n=8)
    loss_fn = TextInformedContrastiveLoss(symmetric=True).double()
    base = loss_fn(x, v, GROUPS)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_fn(x[perm], v[perm], GROUPS[perm]), base)
    relabelled = torch.tensor([10**12, 10**12, 0, 0, 0, -7, -7, 10**12])
    torch.testing.assert_close(loss_fn(x, v, relabelled), base)


def test_scale_invariance_and_clamp():
    x, v = _data()
    loss_fn = TextInformedContrastiveLoss().double()
    torch.testing.assert_close(loss_fn(3 * x, 0.5 * v, GROUPS), loss_fn(x, v, GROUPS))
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)
    assert loss_fn.scale().item() == 100.0
    torch.testing.assert_close(
        loss_fn(x, v, GROUPS), reference(x, v, GROUPS, torch.tensor(100.0, dtype=torch.float64))
    )


def test_temperature_parameter_or_buffer():
    learn = TextInformedContrastiveLoss(0.07)
    assert [n for n, _ in learn.named_parameters()] == ["logit_scale"]
    assert learn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    fixed = TextInformedContrastiveLoss(0.07, learnable_temperature=False)
    assert list(fixed.parameters()) == [] and "logit_scale" in dict(fixed.named_buffers())


@pytest.mark.parametrize(
    ("kwargs", "args", "match"),
    [
        ({"temperature": 0.0}, None, "temperature must be a finite number > 0; got 0.0"),
        ({"temperature": -1}, None, "temperature"),
        ({}, ((8, 4), (8, 5), (8,)), r"same shape \(N, D\); got \(8, 4\) and \(8, 5\)"),
        ({}, ((8, 4, 1), (8, 4, 1), (8,)), r"shape \(N, D\); got \(8, 4, 1\)"),
        ({}, ((8, 4), (8, 4), (7,)), r"groups must have shape \(N,\) = \(8,\)"),
        ({}, ((8, 4), (8, 4), (8, 1)), r"groups must have shape"),
    ],
)
def test_argument_errors(kwargs, args, match):
    with pytest.raises(ValueError, match=match):
        loss_fn = TextInformedContrastiveLoss(**kwargs)
        loss_fn(torch.randn(*args[0]), torch.randn(*args[1]), torch.zeros(args[2], dtype=torch.long))


def test_float_groups_rejected():
    with pytest.raises(ValueError, match="integer group ids"):
        TextInformedContrastiveLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4))


def test_single_crop_group_names_group_and_fix():
    groups = torch.tensor([0, 0, 5, 1, 1])
    with pytest.raises(ValueError, match=r"group 5 has a single crop \(crop index 2.*K >= 2 crops per study"):
        TextInformedContrastiveLoss()(torch.randn(5, 3), torch.randn(5, 3), groups)


@pytest.mark.parametrize("name", ["tcl", "tcl_sym"])
def test_two_process_equivalence(dist_run, check_equivalence, name):
    """Mean of per-rank losses = 1-process loss; per-rank input grads = world_size x 1-process
    grads (DDP then averages); mean of per-rank temperature grads = 1-process grad."""
    check_equivalence(dist_run, name)


def test_two_process_ddp_parameter_gradients(dist_run):
    mod = dist_run["module"]
    ref = mod.run_ddp(mod.make_data())
    for rank_out in dist_run["ranks"]:
        for key, value in ref.items():
            if key != "loss":
                torch.testing.assert_close(rank_out["ddp"][key], value, msg=key)
    mean_loss = sum(r["ddp"]["loss"] for r in dist_run["ranks"]) / len(dist_run["ranks"])
    torch.testing.assert_close(mean_loss, ref["loss"])

