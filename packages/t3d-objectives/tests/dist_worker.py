"""Two-process gloo worker for the distributed-equivalence tests (run by conftest.py).

conftest.py spawns ``worker`` (or: python dist_worker.py PORT OUT_DIR). Each rank takes its half of a fixed batch, computes
every loss with gather_distributed=True, back-propagates and saves values and gradients to
OUT_DIR/rank{r}.pt; the tests compare them with one process on the whole batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from t3d_objectives import (
    AlignmentLoss,
    SigmoidAlignmentLoss,
    TextInformedContrastiveLoss,
    gather_with_grad,
    rank,
    world_size,
)
from t3d_objectives.distributed import _all_gather_nn
from torch import nn

WORLD = 2


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        # groups 5 and 9 have one crop per rank: positives exist only across ranks
        "x": torch.randn(12, 16, generator=g, dtype=torch.float64),
        "v": torch.randn(12, 16, generator=g, dtype=torch.float64),
        "crop_group": torch.tensor([3, 3, 7, 7, 5, 9, 5, 9, 1, 1, 3, 3]),
        "e": torch.randn(8, 16, generator=g, dtype=torch.float64),
        "u": torch.randn(8, 16, generator=g, dtype=torch.float64),
        "group": torch.tensor([0, 1, 2, 1, 3, 0, 4, 5]),
        "inputs": torch.randn(12, 10, generator=g, dtype=torch.float64),
    }


def make_losses(gather: bool) -> dict[str, nn.Module]:
    return {
        "tcl": TextInformedContrastiveLoss(0.1, gather_distributed=gather),
        "tcl_sym": TextInformedContrastiveLoss(0.1, gather_distributed=gather, symmetric=True),
        "align": AlignmentLoss(0.1, gather_distributed=gather),
        "sigmoid": SigmoidAlignmentLoss(gather_distributed=gather),
    }


class Encoder(nn.Module):
    """Stand-in for T3DModel: one linear map per embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.x, self.v = nn.Linear(10, 16), nn.Linear(10, 16)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x(t), self.v(t)


def run_losses(data, losses, part=None) -> dict[str, dict[str, torch.Tensor]]:
    """Loss value and gradients (inputs, temperature/bias) for each loss on a batch slice."""
    results = {}
    for name, loss_fn in losses.items():
        crops = name.startswith("tcl")
        a_key, b_key, g_key = ("x", "v", "crop_group") if crops else ("e", "u", "group")
        n = data[a_key].shape[0]
        sl = slice(None) if part is None else slice(part * n // WORLD, (part + 1) * n // WORLD)
        a = data[a_key][sl].clone().requires_grad_()
        b = data[b_key][sl].clone().requires_grad_()
        loss = loss_fn(a, b, data[g_key][sl])
        loss.backward()
        res = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad}
        for pname, p in loss_fn.named_parameters():
            res[f"grad_{pname}"] = p.grad.clone()
        results[name] = res
    return results


def run_ddp(data, part=None) -> dict[str, torch.Tensor]:
    """A linear encoder (DDP-wrapped when distributed) trained by TCL: parameter gradients."""
    encoder = Encoder().double()
    loss_fn = TextInformedContrastiveLoss(0.1, gather_distributed=part is not None, symmetric=True)
    model = encoder if part is None else nn.parallel.DistributedDataParallel(encoder)
    sl = slice(None) if part is None else slice(part * 6, (part + 1) * 6)
    inputs = data["inputs"][sl]
    x, v = model(inputs)  # through the DDP wrapper: its reducer averages the gradients
    loss = loss_fn(x, v, data["crop_group"][sl])
    loss.backward()
    if part is not None:  # the objective is not DDP-wrapped: average its gradient like DDP would
        dist.all_reduce(loss_fn.logit_scale.grad)
        loss_fn.logit_scale.grad /= world_size()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    grads["logit_scale"] = loss_fn.logit_scale.grad.clone()
    grads["loss"] = loss.detach()
    return grads


def worker(r: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD)
    data = make_data()
    out: dict[str, object] = {"rank": rank(), "world_size": world_size()}
    out["losses"] = run_losses(data, make_losses(True), part=r)
    out["ddp"] = run_ddp(data, part=r)
    # non-contiguous input: gather a transposed view, back-propagate a rank-weighted sum
    base = (torch.arange(12, dtype=torch.float64).view(3, 4) + 100 * r).requires_grad_()
    gathered = gather_with_grad(base.T)  # (4, 3) per rank -> (8, 3)
    (gathered * torch.arange(1, 9, dtype=torch.float64)[:, None]).sum().backward()
    out["noncontig"] = {"gathered": gathered.detach(), "grad": base.grad}
    base.grad = None  # the same through the torch.distributed.nn fallback
    gathered = _all_gather_nn(base.T.contiguous())
    (gathered * torch.arange(1, 9, dtype=torch.float64)[:, None]).sum().backward()
    out["fallback"] = {"gathered": gathered.detach(), "grad": base.grad}
    try:
        gather_with_grad(torch.zeros(3 - r, 4))
        out["shape_error"] = None
    except ValueError as err:
        out["shape_error"] = str(err)
    torch.save(out, f"{out_dir}/rank{r}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD)
