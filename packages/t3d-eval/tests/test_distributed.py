"""gather_embeddings: single process, an Accelerate-like object, and a 2-process gloo run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from t3d_eval import gather_embeddings

DISTRIBUTED_PY = Path(__file__).parents[1] / "src" / "t3d_eval" / "distributed.py"

WORKER = r"""
import importlib.util, sys, torch, torch.distributed as dist
from torch.utils.data import DistributedSampler
# Load distributed.py alone (torch only) so the two workers start fast.
spec = importlib.util.spec_from_file_location("t3d_eval_distributed", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
rank, out = int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=2)
n = 5  # odd: DistributedSampler pads rank 1 with a repeat of item 0
idx = torch.tensor(list(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=False)))
emb = torch.stack([idx.float(), idx.float() * 10], 1)
inter = mod.gather_embeddings(emb, num_samples=n)
# contiguous blocks of unequal length: rank 0 items 0..2, rank 1 items 3..4
block = torch.arange(3) if rank == 0 else torch.arange(3, 5)
contig = mod.gather_embeddings(block.float()[:, None], num_samples=n, layout="contiguous")
torch.save({"interleaved": inter, "contiguous": contig, "local": len(idx)}, out)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_gather_drops_padded_tail(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(DISTRIBUTED_PY), str(r), str(tmp_path / f"{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    expected = torch.stack([torch.arange(5.0), torch.arange(5.0) * 10], 1)
    for r in range(2):
        res = torch.load(tmp_path / f"{r}.pt")
        assert res["local"] == 3  # 6 padded items over 2 ranks
        assert torch.equal(res["interleaved"], expected)
        assert torch.equal(res["contiguous"][:, 0], torch.arange(5.0))


def test_single_process_truncates():
    x = torch.arange(6.0)[:, None]
    assert torch.equal(gather_embeddings(x, num_samples=4), x[:4])
    assert torch.equal(gather_embeddings(x), x)


def test_uses_accelerator_gather_for_metrics():
    class FakeAccelerator:
        calls = 0

        def gather_for_metrics(self, x):
            FakeAccelerator.calls += 1
            return torch.cat([x, x])

    x = torch.arange(3.0, requires_grad=True)
    out = gather_embeddings(x * 1, num_samples=5, accelerator=FakeAccelerator())
    assert FakeAccelerator.calls == 1
    assert out.tolist() == [0.0, 1.0, 2.0, 0.0, 1.0] and not out.requires_grad
