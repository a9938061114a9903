"""Speed knobs of the pre-training loop (issue 13): each reaches what it configures and changes
no maths beyond float rounding; ``tools/gpu_check.py --smoke`` runs end to end on the CPU.

The model knobs (``vision.attention``, ``vision.channels_last``) are checked against the eager
step in packages/t3d-models/tests/test_speed_equivalence.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**sections):
    from t3d_train.pretrain_config import PretrainConfig

    return PretrainConfig.model_validate({"data": {"store": "/nonexistent/store"}, **sections})


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x)))

    def param_groups(self, lr, weight_decay, vision_lr_mult, text_lr_mult, extra=None):
        return [{"params": list(self.a.parameters()), "lr": lr, "weight_decay": weight_decay,
                 "name": "heads/decay"},
                {"params": list(self.b.parameters()), "lr": lr * 0.1, "weight_decay": 0.0,
                 "name": "vision/no_decay"}]


def test_fused_adamw_takes_the_same_steps_as_the_default():
    """optim.fused=true reaches AdamW; three steps on identical gradients land on the same
    parameters as torch's default implementation (|diff| <= 1e-6)."""
    from t3d_train.loop import build_optimizer

    x = torch.randn(8, 16)
    params = {}
    for fused in (None, True):
        toy = _Toy()
        opt, _, head = build_optimizer(SimpleNamespace(model=toy, objective=None),
                                       _cfg(optim={"fused": fused, "lr": 1e-2, "warmup_steps": 0}))
        assert opt.defaults["fused"] is fused and head == 0
        for _ in range(3):
            toy(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        params[fused] = [p.detach().clone() for p in toy.parameters()]
    moved = max(float((p - q.detach()).abs().max()) for p, q in zip(params[None], _Toy().parameters(),
                                                           strict=True))
    assert moved > 1e-3  # the steps did something
    for p, q in zip(params[None], params[True], strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


def test_threads_and_compile_settings():
    """run.threads sets torch's intra-op threads; run.compile compiles in place: the same
    values and gradients as eager, the same state-dict keys; bad values are refused."""
    from pydantic import ValidationError
    from t3d_train.loop import apply_threads, compile_model

    before = torch.get_num_threads()
    try:
        got = apply_threads(_cfg(run={"threads": 1}))
        assert got["threads"] == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValidationError, match="threads"):
        _cfg(run={"threads": 0})
    with pytest.raises(ValidationError, match="compile_mode"):
        _cfg(run={"compile": True, "compile_mode": "fastest"})

    eager, fast = _Toy(), _Toy()
    assert compile_model(eager, _cfg()) is eager and eager._compiled_call_impl is None
    compile_model(fast, _cfg(run={"compile": True}))
    assert fast._compiled_call_impl is not None
    assert list(fast.state_dict()) == list(eager.state_dict())
    x = torch.randn(8, 16)
    outs = []
    for m in (eager, fast):
        y = m(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), m.a.weight.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_gpu_check_smoke_writes_its_table_and_json(tmp_path):
    """tools/gpu_check.sh --smoke (the CPU path of the GPU check): every part has its rows,
    SDPA's first loss equals eager's, the linear fit is skipped with one batch size."""
    out = tmp_path / "check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, T3D_TEST_THREADS="1")
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, encoding="utf-8", timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["meta"]["smoke"] and result["meta"]["preset"] == "t3d-tiny-cpu"
    variants = [r["variant"] for r in result["steps"]]
    assert variants == ["eager", "sdpa,checkpoint"]
    for r in result["steps"]:
        assert r["crops_per_s"] > 0 and r["loss_diff"] <= 1e-4 * abs(r["loss"]), r
    assert result["largest_batch"] == [] and result["confirm"] is None
    (loop,) = result["loader"]
    assert loop["workers"] == 0 and loop["steps"] == 1 and 0 <= loop["data_wait_pct"] <= 100
    assert "| step | sdpa,checkpoint | 4 |" in res.stdout and "| loop | 0 workers |" in res.stdout
    assert res.stdout.strip() == result["table"]
