"""AlignmentLoss and SigmoidAlignmentLoss against loop references, CLIP/SigLIP special cases,
group positives, errors and 2-process equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from t3d_objectives import AlignmentLoss, SigmoidAlignmentLoss

GROUPS = torch.tensor([0, 1, 2, 1, 7])


def _data(n=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def reference_infonce(e, u, groups, scale):
    def direction(a, t):
        a, t = F.normalize(a, dim=1), F.normalize(t, dim=1)
        n, total = len(groups), 0.0
        for i in range(n):
            denom = sum(torch.exp(scale * a[i] @ t[b]) for b in range(n))
            pos = [p for p in range(n) if groups[p] == groups[i]]
            total = total - sum(torch.log(torch.exp(scale * a[i] @ t[p]) / denom) for p in pos) / len(pos)
        return total / n

    return 0.5 * (direction(e, u) + direction(u, e))


def reference_sigmoid(e, u, groups, t, b):
    e, u = F.normalize(e, dim=1), F.normalize(u, dim=1)
    n, total = len(groups), 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if groups[i] == groups[j] else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * e[i] @ u[j] + b)))
    return total / n


def test_infonce_matches_reference_values_and_gradients():
    e, u = _data()
    loss_fn = AlignmentLoss(0.3).double()
    es, us = e.clone().requires_grad_(), u.clone().requires_grad_()
    loss = loss_fn(es, us, GROUPS)
    loss.backward()
    er, ur = e.clone().requires_grad_(), u.clone().requires_grad_()
    s = torch.tensor(math.log(1 / 0.3), dtype=torch.float64, requires_grad=True)
    ref = reference_infonce(er, ur, GROUPS, s.exp())
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(es.grad, er.grad)
    torch.testing.assert_close(us.grad, ur.grad)
    torch.testing.assert_close(loss_fn.logit_scale.grad, s.grad)


def test_sigmoid_matches_reference_values_and_gradients():
    e, u = _data()
    loss_fn = SigmoidAlignmentLoss(scale=5.0, bias=-2.0).double()
    es, us = e.clone().requires_grad_(), u.clone().requires_grad_()
    loss = loss_fn(es, us, GROUPS)
    loss.backward()
    er, ur = e.clone().requires_grad_(), u.clone().requires_grad_()
    t = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ref = reference_sigmoid(er, ur, GROUPS, t.exp(), b)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(es.grad, er.grad)
    torch.testing.assert_close(us.grad, ur.grad)
    torch.testing.assert_close(loss_fn.logit_scale.grad, t.grad)
    torch.testing.assert_close(loss_fn.bias.grad, b.grad)


@pytest.mark.parametrize("cls", [AlignmentLoss, SigmoidAlignmentLoss])
def test_gradcheck(cls):
    e, u = _data(n=4, d=3)
    loss_fn = cls(learnable_temperature=False) if cls is AlignmentLoss else cls(learnable=False)
    groups = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn.double()(a, b, groups), (e.requires_grad_(), u.requires_grad_())
    )


def test_unique_groups_is_clip():
    e, u = _data(n=6)
    loss_fn = AlignmentLoss(0.07).double()
    logits = F.normalize(e, dim=1) @ F.normalize(u, dim=1).T / 0.07
    labels = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss_fn(e, u, torch.tensor([5, 3, 1, 0, 2, 4])), clip)


def test_identical_reports_are_soft_positives_not_negatives():
    """Studies 1 and 3 share a report: each one's row is a cross-entropy against the uniform
    target over {1, 3}, not a one-hot target that would make the other a negative."""
    e, u = _data(n=4)
    groups = torch.tensor([0, 1, 2, 1])
    logits = F.normalize(e, dim=1) @ F.normalize(u, dim=1).T / 0.07
    soft = (groups[:, None] == groups[None, :]).double()
    soft = soft / soft.sum(1, keepdim=True)
    expected = 0.5 * (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft))
    loss_fn = AlignmentLoss(0.07).double()
    torch.testing.assert_close(loss_fn(e, u, groups), expected)
    assert not torch.allclose(loss_fn(e, u, torch.arange(4)), expected)


@pytest.mark.parametrize("cls", [AlignmentLoss, SigmoidAlignmentLoss])
def test_permutation_invariance(cls):
    e, u = _data()
    loss_fn = cls().double()
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(loss_fn(e[perm], u[perm], GROUPS[perm] + 100), loss_fn(e, u, GROUPS))


def test_sigmoid_defaults():
    loss_fn = SigmoidAlignmentLoss()
    assert loss_fn.scale().item() == pytest.approx(10.0)
    assert loss_fn.bias.item() == -10.0
    assert sorted(n for n, _ in loss_fn.named_parameters()) == ["bias", "logit_scale"]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: AlignmentLoss(temperature=-0.1), "temperature must be a finite number > 0; got -0.1"),
        (lambda: AlignmentLoss(temperature=float("nan")), "temperature"),
        (lambda: SigmoidAlignmentLoss(scale=0), "scale must be a finite number > 0; got 0"),
        (lambda: SigmoidAlignmentLoss(bias=float("inf")), "bias must be a finite number"),
    ],
)
def test_constructor_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", [AlignmentLoss, SigmoidAlignmentLoss])
def test_forward_errors(cls):
    with pytest.raises(ValueError, match=r"volume and text must have the same shape"):
        cls()(torch.randn(4, 8), torch.randn(3, 8), torch.arange(4))
    with pytest.raises(ValueError, match=r"groups must have shape \(N,\) = \(4,\)"):
        cls()(torch.randn(4, 8), torch.randn(4, 8), torch.arange(5))


@pytest.mark.parametrize("name", ["align", "sigmoid"])
def test_two_process_equivalence(dist_run, check_equivalence, name):
    check_equivalence(dist_run, name)
