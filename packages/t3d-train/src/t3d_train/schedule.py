"""The learning-rate schedule of pre-training, defined in optimizer steps whatever the world size.

Accelerate's prepared scheduler (``AcceleratedScheduler`` with ``split_batches=False``) steps
the wrapped scheduler ``num_processes`` times per optimizer step, so a schedule written in
optimizer steps and then passed to ``accelerator.prepare`` would end warmup and decay
``num_processes`` times too early (and a cosine rises again after its end). This schedule is
therefore *not* prepared: ``tools/pretrain.py`` steps it once per optimizer step and registers
it for checkpointing. Past ``max_steps`` the factor stays at its final value (0) instead of
following the cosine back up.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The lr multiplier after ``step`` optimizer steps: linear warmup, cosine decay to 0, clamped.

    ``step`` 0 is the first optimizer step. Warmup rises linearly from 0 over ``warmup_steps``
    steps; the cosine then falls from 1 to 0 at ``max_steps`` and stays at 0 afterwards (the same
    shape as ``transformers.get_cosine_schedule_with_warmup`` up to ``max_steps``).
    """
    step = min(max(step, 0), max_steps)
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine_factor`; step it once per optimizer step."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
