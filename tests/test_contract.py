"""The training contract: the lr schedule in optimizer steps, and the preprocessing record.

Fast unit tests; the end-to-end halves are in test_pretrain.py (2 processes == 1 process, lr
included) and test_eval_tools.py (a model trained on a non-default window is evaluated on it).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from t3d_models import PreprocessingConfig, T3DModelConfig
from t3d_train.config import ConfigError
from t3d_train.preprocessing import resolve_preprocessing
from t3d_train.pretrain_config import PretrainConfig
from t3d_train.schedule import warmup_cosine_factor, warmup_cosine_schedule


def _reference_lr(step: int, warmup: int, total: int) -> float:
    """Naive warmup + cosine, written out independently of the implementation."""
    if step < warmup:
        return step / warmup
    if step >= total:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_schedule_matches_transformers_then_stays_at_zero():
    from transformers import get_cosine_schedule_with_warmup

    warmup, total = 5, 40
    ours = warmup_cosine_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                  warmup, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total + 25):
        got = ours.get_last_lr()[0]
        assert got == pytest.approx(_reference_lr(step, warmup, total), abs=1e-12), step
        if step <= total:
            assert got == pytest.approx(theirs.get_last_lr()[0], abs=1e-12), step
        for sched in (ours, theirs):
            sched.optimizer.step()  # the order a training loop uses (and torch expects)
            sched.step()
    # past its end transformers' cosine climbs back up; ours is clamped at 0
    assert theirs.get_last_lr()[0] > 0.1
    assert ours.get_last_lr()[0] == 0.0
    assert warmup_cosine_factor(10**6, warmup, total) == 0.0


def test_schedule_state_round_trips():
    """Resume restores the schedule's position (it is registered for checkpointing)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    a = warmup_cosine_schedule(opt, 2, 10)
    for _ in range(4):
        opt.step()
        a.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    b = warmup_cosine_schedule(opt2, 2, 10)
    b.load_state_dict(a.state_dict())
    for o, sched in ((opt, a), (opt2, b)):
        o.step()
        sched.step()
    assert b.get_last_lr() == a.get_last_lr() == [pytest.approx(2.0 * _reference_lr(5, 2, 10))]


def _cfg(**data) -> PretrainConfig:
    return PretrainConfig.model_validate({"data": {"store": "s", **data}})


def test_data_window_is_recorded_in_the_model_config():
    cfg = _cfg(crop={"hu_window": [-200, 300], "pad_value": -1000})
    assert cfg.data.crop.hu_window == (-200.0, 300.0)
    assert cfg.model.preprocessing.hu_window == (-200.0, 300.0)
    assert cfg.model.preprocessing.pad_value == -1000
    record = cfg.model.preprocessing_record()
    assert record == {"crop_size": [64, 64, 64], "hu_window": [-200.0, 300.0], "pad_value": -1000,
                      "orientation": "RAS", "spacing": "native", "intensity": "hu_window_linear"}
    # and the default run records the default window, with the crop size of the model
    default = _cfg()
    assert default.data.crop.crop_size == default.model.vision.crop_size == (64, 64, 64)
    assert default.model.preprocessing == PreprocessingConfig()
    assert default.data.crop.hu_window == PreprocessingConfig().hu_window


def test_a_model_window_drives_the_data_window():
    cfg = PretrainConfig.model_validate({"data": {"store": "s"}, "model": {
        "preset": "t3d-tiny-cpu", "preprocessing": {"hu_window": [-100, 200]}}})
    assert cfg.data.crop.hu_window == (-100.0, 200.0)


@pytest.mark.parametrize(("payload", "needle"), [
    ({"data": {"store": "s", "crop": {"crop_size": [32, 32, 32]}}},
     "data.crop.crop_size [32, 32, 32] differs from the model's crop size model.vision.crop_size "
     "[64, 64, 64]"),
    ({"data": {"store": "s", "crop": {"hu_window": [-200, 300]}},
      "model": {"preset": "t3d-tiny-cpu", "preprocessing": {"hu_window": [-100, 100]}}},
     "data.crop.hu_window=[-200, 300] disagrees with model.preprocessing.hu_window=[-100, 100]"),
    # pre-training crops are HU-windowed: the MRI policy is only for fine-tuning (issue 11.3)
    ({"data": {"store": "s"},
      "model": {"preset": "t3d-tiny-cpu", "preprocessing": {"intensity": "zscore_foreground"}}},
     "model.preprocessing.intensity=zscore_foreground: pre-training crops are HU-windowed CT"),
])
def test_mismatched_preprocessing_is_refused(payload, needle):
    with pytest.raises(ValueError) as err:
        PretrainConfig.model_validate(payload)
    assert needle in str(err.value)


def test_old_config_without_a_record_loads_the_old_default():
    raw = T3DModelConfig.from_preset("t3d-tiny-cpu").model_dump(mode="json")
    raw.pop("preprocessing")
    assert T3DModelConfig.model_validate(raw).preprocessing.hu_window == (-1000.0, 1000.0)


def test_evaluation_reads_the_record_and_refuses_a_disagreeing_override():
    model_cfg = T3DModelConfig.from_preset("t3d-tiny-cpu",
                                           preprocessing={"hu_window": [-200, 300]})
    section = SimpleNamespace(checkpoint=Path("runs/x/model"), hu_window=None, force_preprocessing=False)
    assert resolve_preprocessing(section, model_cfg).hu_window == (-200.0, 300.0)
    section.hu_window = (-200, 300)  # agreeing with the record is fine
    assert resolve_preprocessing(section, model_cfg).hu_window == (-200.0, 300.0)
    section.hu_window = (-1000, 1000)
    with pytest.raises(ConfigError) as err:
        resolve_preprocessing(section, model_cfg)
    msg = str(err.value)
    assert "model.hu_window=[-1000, 1000]" in msg and "[-200.0, 300.0]" in msg
    assert "runs/x/model/config.json" in msg and "model.force_preprocessing=true" in msg
    section.force_preprocessing = True
    assert resolve_preprocessing(section, model_cfg).hu_window == (-1000.0, 1000.0)
