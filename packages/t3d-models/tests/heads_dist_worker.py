"""Two-process gloo worker for test_heads.py: GlobalBatchNorm1d on each rank's half of a batch.

Spawned by ``test_heads.py`` (the module must be importable by name in the children).
"""

from __future__ import annotations

import os

import torch
from t3d_models import GlobalBatchNorm1d


def make_bn(channels: int) -> torch.nn.BatchNorm1d:
    """A GlobalBatchNorm1d with fixed non-trivial affine parameters."""
    torch.manual_seed(0)
    bn = GlobalBatchNorm1d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def worker(rank: int, port: int, x: torch.Tensor, upstream: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bn = make_bn(x.shape[1])
        rows = x.shape[0] // 2
        part = x[rows * rank: rows * (rank + 1)].clone().requires_grad_(True)
        y = bn(part)
        (y * upstream[rows * rank: rows * (rank + 1)]).sum().backward()
        torch.save({"y": y.detach(), "grad_x": part.grad, "grad_w": bn.weight.grad,
                    "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
