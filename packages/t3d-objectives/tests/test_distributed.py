"""rank/world_size/gather_with_grad without a process group, and with 2 gloo processes."""

from __future__ import annotations

import torch
from t3d_objectives import gather_with_grad, rank, world_size
from t3d_objectives.distributed import gather_no_grad, is_distributed


def test_without_process_group():
    assert rank() == 0 and world_size() == 1 and not is_distributed()
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    g = torch.tensor([1, 2])
    assert gather_no_grad(g) is g


def test_two_processes_rank_world_size(dist_run):
    assert [(r["rank"], r["world_size"]) for r in dist_run["ranks"]] == [(0, 2), (1, 2)]


def test_non_contiguous_gather_values_and_summed_gradients(dist_run):
    base = [torch.arange(12, dtype=torch.float64).view(3, 4) + 100 * r for r in range(2)]
    expected = torch.cat([b.T for b in base])
    weights = torch.arange(1, 9, dtype=torch.float64)
    for r, out in enumerate(dist_run["ranks"]):
        for path in ("noncontig", "fallback"):  # functional collectives, torch.distributed.nn
            torch.testing.assert_close(out[path]["gathered"], expected)
            # both ranks back-propagate the same weighted sum: each input gets the sum over ranks
            own = weights[4 * r : 4 * (r + 1)]
            torch.testing.assert_close(out[path]["grad"], (2 * own)[None, :].expand(3, 4))


def test_unequal_shapes_raise_readable_error(dist_run):
    for out in dist_run["ranks"]:
        assert "same shape on every rank; got [(3, 4), (2, 4)]" in out["shape_error"]
        assert "drop_last=True" in out["shape_error"]
