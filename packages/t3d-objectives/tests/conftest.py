"""Test configuration: no network, ever; one shared 2-process gloo run for the distributed tests."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dist_run(tmp_path_factory) -> dict[str, object]:
    """Spawn dist_worker.worker on 2 gloo processes (CPU, free port) once per session; return
    both ranks' results and the worker module (for the 1-process references)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    sys.path.insert(0, str(HERE))  # spawned children inherit sys.path and unpickle the worker
    try:
        import dist_worker

        torch.multiprocessing.spawn(
            dist_worker.worker, args=(_free_port(), str(out)), nprocs=dist_worker.WORLD
        )
    finally:
        sys.path.remove(str(HERE))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(dist_worker.WORLD)]
    return {"ranks": ranks, "module": dist_worker}

def _check_equivalence(dist_run: dict[str, object], name: str) -> None:
    """The distributed convention: the mean of the per-rank losses equals the 1-process loss on
    the whole batch; per-rank input gradients are world_size x the 1-process ones (so DDP's
    averaging of parameter gradients is exact); the mean of the per-rank gradients of the
    replicated temperature/bias equals the 1-process gradient."""
    mod, ranks = dist_run["module"], dist_run["ranks"]
    world = len(ranks)
    ref = mod.run_losses(mod.make_data(), {name: mod.make_losses(False)[name]})[name]
    outs = [r["losses"][name] for r in ranks]
    torch.testing.assert_close(sum(o["loss"] for o in outs) / world, ref["loss"])
    for grad in ("grad_a", "grad_b"):
        torch.testing.assert_close(torch.cat([o[grad] for o in outs]) / world, ref[grad], msg=grad)
    for key in ref:
        if key.startswith("grad_") and key not in ("grad_a", "grad_b"):
            torch.testing.assert_close(sum(o[key] for o in outs) / world, ref[key], msg=key)


@pytest.fixture
def check_equivalence():
    return _check_equivalence


def _model_outputs(with_tir=True):
    """Seeded T3DModel-like outputs for the objective tests (TIR keys unless with_tir=False)."""
    g = torch.Generator().manual_seed(0)
    out = {
        "visual_emb": torch.randn(8, 16, generator=g),
        "text_informed_emb": torch.randn(8, 16, generator=g),
        "crop_group": torch.tensor([0, 0, 1, 1, 2, 2, 0, 0]),
        "volume_emb": torch.randn(4, 16, generator=g),
        "text_emb": torch.randn(4, 16, generator=g),
        "group": torch.tensor([0, 1, 2, 0]),
    }
    if with_tir:
        out["restored"] = torch.rand(8, 1, 8, 8, 8, generator=g)
        out["target"] = torch.rand(8, 1, 8, 8, 8, generator=g)
        out["corruption_mask"] = torch.rand(8, 1, 8, 8, 8, generator=g) < 0.2
    return out


@pytest.fixture
def model_outputs():
    """The seeded outputs builder: ``model_outputs(with_tir=True) -> dict``."""
    return _model_outputs
