"""The pieces of the pre-training loop that ``tools/pretrain.py`` tells as a story.

:class:`TrainStep` is one training step on one micro-batch: bad-study accounting, forward, the
NaN guard, backward, gradient clipping, the optimizer step and, when the accumulated gradients
were applied, the schedule step, the skip accounting and the ``log.jsonl`` record. The builders
around it (:func:`make_accelerator`, :func:`build_data`, :func:`build_optimizer`), resuming
(:func:`resume`), atomic checkpoints (:func:`save_checkpoint`) and the final model card
(:func:`write_run_card`) keep the script to its story.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from t3d_train.checkpoint import (
    OBJECTIVE,
    clear_stale,
    finalize,
    load_module_weights,
    read_state,
    save_module_weights,
    tmp_folder,
)
from t3d_train.config import ConfigError
from t3d_train.demo import DEMO_STORE, ensure_demo_store
from t3d_train.trainer import collapse_warning

log = logging.getLogger("t3d.pretrain")


def make_accelerator(cfg: Any, objective_cfg: Any) -> tuple[Any, bool]:
    """The run's ``Accelerator`` and whether it logs to TensorBoard (asked for and installed).

    DDP looks for unused parameters only when a registered loss term is switched off (weight 0;
    ``t3d_objectives.term_names`` lists the enabled ones)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available
    from t3d_objectives import TERMS, term_names

    disabled_term = len(term_names(objective_cfg)) < len(TERMS)
    use_tensorboard = cfg.run.tensorboard and is_tensorboard_available()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if use_tensorboard else None,
        project_dir=str(cfg.run.output_dir),
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=disabled_term)],
    )
    return accelerator, use_tensorboard


def prepare_store(cfg: Any, accelerator: Any) -> None:
    """Build the demo store if ``data.store`` is the demo's; check the store is prepared.

    Raises:
        ConfigError: ``data.store`` has no ``index.json``.
    """
    if str(cfg.data.store) == DEMO_STORE:
        with accelerator.main_process_first():  # the main process builds; the others find the cache
            cfg.data.store = ensure_demo_store(seed=cfg.run.seed)
    if not (Path(cfg.data.store) / "index.json").is_file():
        raise ConfigError(f"data.store: {cfg.data.store} is not a prepared store (no index.json); "
                          "run `t3d-data prepare MANIFEST OUT` first")


def build_data(cfg: Any, objective_cfg: Any, num_processes: int) -> tuple[Any, Any, Any]:
    """``(dataset, sampler, loader)``: crops (+ TIR corruption) of the training split, sampled
    in whole global batches of ``data.batch_size x num_processes`` studies.

    Raises:
        ConfigError: the split has fewer studies than one global batch.
    """
    from t3d_data import CropDataset, EpochShuffleSampler, PretrainDataset, collate_pretrain
    from t3d_objectives import CropCorruption, term_names
    from torch.utils.data import DataLoader

    crops = CropDataset(cfg.data.store, cfg.data.crop, split=cfg.data.split,
                        max_studies=cfg.data.max_studies)
    corruption = None
    if "tir_loss" in term_names(objective_cfg):  # TIR restores the corrupted crops
        c = cfg.corruption
        corruption = CropCorruption(drop_fraction=c.drop_fraction, max_block_fraction=c.max_block_fraction,
                                    shuffle_block_size=c.shuffle_block_size, mode=c.mode,
                                    noise_std=c.noise_std)
    dataset = PretrainDataset(crops, corruption, seed=cfg.data.crop.seed)
    per_step = cfg.data.batch_size * num_processes
    sampler = EpochShuffleSampler(len(dataset), seed=cfg.data.crop.seed, shuffle=cfg.data.shuffle,
                                  global_batch=per_step)
    if len(dataset) < per_step:
        raise ConfigError(f"data: split {cfg.data.split!r} has {len(dataset)} studies, fewer than one "
                          f"global batch ({cfg.data.batch_size} x {num_processes} processes)")
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_pretrain,
                        drop_last=True, pin_memory=cfg.data.pin_memory,
                        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None)
    return dataset, sampler, loader


def build_optimizer(module: Any, cfg: Any) -> tuple[Any, Any, int]:
    """``(AdamW, schedule, index of the heads' param group)``.

    The schedule is not to be prepared: accelerate would step it ``num_processes`` times per
    optimizer step. :class:`TrainStep` steps it once per optimizer step; register it for
    checkpointing (:mod:`t3d_train.schedule`).
    """
    from t3d_train.schedule import warmup_cosine_schedule

    groups = module.model.param_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.vision_lr_mult,
                                       cfg.optim.text_lr_mult, extra=module.objective)
    head_group = next(i for i, g in enumerate(groups) if g["name"].startswith("heads/"))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  fused=cfg.optim.fused)
    scheduler = warmup_cosine_schedule(optimizer, cfg.optim.warmup_steps, cfg.optim.max_steps)
    return optimizer, scheduler, head_group


def apply_threads(cfg: Any) -> dict[str, int]:
    """Set ``run.threads`` / ``run.interop_threads`` (when given) before any parallel work;
    returns the thread counts in effect.

    Raises:
        ConfigError: the inter-op thread count can no longer be changed in this process.
    """
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.interop_threads and cfg.run.interop_threads != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(cfg.run.interop_threads)
        except RuntimeError as err:
            raise ConfigError(f"run.interop_threads={cfg.run.interop_threads}: {err}; it must be "
                              "set before torch starts parallel work (drop the setting)") from err
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def compile_model(model: Any, cfg: Any) -> Any:
    """``run.compile``: compile ``model`` in place with ``nn.Module.compile`` (its state-dict
    keys, checkpoints and ``save_pretrained`` stay as they are); returns it."""
    if cfg.run.compile:
        model.compile(mode=None if cfg.run.compile_mode == "default" else cfg.run.compile_mode)
    return model


def new_state() -> dict[str, int]:
    """The loop's counters, saved in every checkpoint's ``trainer_state.json``."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0,
            "consecutive_skips": 0, "studies_seen": 0, "studies_failed": 0, "collapsed_steps": 0}


def store_weights_once(accelerator: Any) -> None:
    """Checkpoints keep the weights once: the model as ``save_pretrained`` writes it (``model/``,
    loadable by every tool) and the objective's temperatures in ``objective.safetensors``
    (:func:`save_checkpoint`); accelerate keeps the optimizer, scheduler and RNG states."""
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(
        lambda models, folder: models.clear() if (Path(folder) / OBJECTIVE).is_file() else None)


def resume(accelerator: Any, module: Any, folder: Path, state: dict[str, Any]) -> None:
    """Load a checkpoint into the prepared objects and ``state`` (every process)."""
    accelerator.load_state(str(folder))
    if (folder / OBJECTIVE).is_file():  # else an older checkpoint: accelerate loaded it
        load_module_weights(accelerator.unwrap_model(module), folder)
    state.update(read_state(folder)["state"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, state["step"],
             state["epoch"], state["batch_in_epoch"])


def save_checkpoint(accelerator: Any, module: Any, root: Path, state: dict[str, Any],
                    config: dict[str, Any], keep_last: int) -> Path | None:
    """Every process: the atomic checkpoint of ``state["step"]`` under ``root``; its folder on
    the main process (:mod:`t3d_train.checkpoint`)."""
    tmp = tmp_folder(root, state["step"])
    if accelerator.is_main_process:  # a killed write's partial files must not end up in it
        clear_stale(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        save_module_weights(accelerator.unwrap_model(module), tmp, card={"steps": state["step"]})
        final = finalize(tmp, root, state["step"], {"step": state["step"], "state": state,
                                                    "config": config}, keep_last)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


#: The notes of the run folder's model card (:func:`write_run_card`).
CARD_NOTES = ("Metrics are the training losses averaged over the last logged steps (summary.json); "
              "chance is the loss of an encoder that learned nothing.")


def write_run_card(cfg: Any, summary: dict[str, Any], command: list[str]) -> Path:
    """Main process, after ``summary.json``: rewrite ``RUN/model/README.md`` (the model card,
    :func:`t3d_models.write_model_card`) with the run's steps, store, the store's report
    languages, ``command``, the final training losses and their chance values; returns its
    path."""
    from t3d_data import VolumeStore
    from t3d_models import write_model_card

    languages = sorted({r.language for r in VolumeStore(cfg.data.store).records})
    return write_model_card(cfg.run.output_dir / "model", card={
        "steps": summary["steps"], "data": str(cfg.data.store), "command": command,
        "metrics": summary["loss_end"], "chance": summary["loss_chance"], "notes": CARD_NOTES,
        "languages": languages})


class StopFlag:
    """Set by SIGTERM; ranks agree on it at step boundaries so all save at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop (a collective: call it on every process)."""
        flag = accelerator.reduce(torch.tensor(float(self.requested), device=accelerator.device), "max")
        return flag.item() > 0


class TrainStep:
    """One training step per call on one micro-batch; owns the step counters of ``state``.

    ``step(batch)`` returns the ``log.jsonl`` record of the optimizer step the batch completed
    (written, and sent to the trackers), or ``None``: the batch was dropped (a study failed to
    load on some process: every rank drops it together) or gradients are still accumulating.
    A step whose loss or gradients are not finite on any process is skipped by every process
    (``"skipped": true``); ``run.max_consecutive_skips`` in a row end the run (``SystemExit``).
    ``compute_seconds`` and ``crops`` add up the time in forward/backward and the crops seen.
    """

    def __init__(self, accelerator: Any, module: Any, optimizer: Any, scheduler: Any, cfg: Any,
                 state: dict[str, Any], head_group: int, log_path: Path) -> None:
        self.accelerator, self.module, self.optimizer, self.scheduler = (accelerator, module,
                                                                         optimizer, scheduler)
        self.cfg, self.state, self.head_group, self.log_path = cfg, state, head_group, log_path
        self.t_start = time.perf_counter()
        self.compute_seconds, self.crops = 0.0, 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        acc, state, cfg = self.accelerator, self.state, self.cfg
        state["batch_in_epoch"] += 1
        if self._drop_failed(batch):
            return None
        # Seed per micro-batch: dropout depends only on (seed, step, batch, rank) -> exact resume.
        torch.manual_seed(hash((cfg.run.seed, state["step"], state["batch_in_epoch"],
                                acc.process_index)) % 2**62)
        t1 = time.perf_counter()
        losses, finite, grad_norm = self._forward_backward(batch)
        self.compute_seconds += time.perf_counter() - t1
        self.crops += batch["crops"].shape[0] * acc.num_processes
        if not acc.sync_gradients:
            return None
        lr = self.optimizer.param_groups[self.head_group]["lr"]  # the rate this step was taken with
        self.scheduler.step()
        state["step"] += 1
        self._count_skip(finite)
        logged = {k: acc.reduce(v.detach().float(), "mean").item() for k, v in losses.items()}
        record = {"step": state["step"], "epoch": state["epoch"], **logged,
                  "lr": lr, "grad_norm": grad_norm,
                  "skipped": not finite, "time": time.perf_counter() - self.t_start}
        self._log(record)
        return record

    def _drop_failed(self, batch: dict[str, Any]) -> bool:
        """Count the studies that failed to load; True when any process has one (drop the batch)."""
        acc, state, cfg = self.accelerator, self.state, self.cfg
        state["studies_seen"] += batch["num_samples"]
        for study_id, reason in batch["failed"]:
            state["studies_failed"] += 1
            log.warning("study %s skipped: %s", study_id, reason)
        failed = acc.reduce(torch.tensor(len(batch["failed"]), device=acc.device), "sum")
        if not failed.item():
            return False
        if state["studies_failed"] / max(state["studies_seen"], 1) > cfg.run.max_bad_fraction:
            raise SystemExit(
                f"error: {state['studies_failed']} of {state['studies_seen']} studies failed to "
                f"load (> run.max_bad_fraction={cfg.run.max_bad_fraction}); check the store "
                "(t3d-data prepare) and the warnings above")
        return True

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[dict[str, Any], bool, float]:
        """Forward, NaN guard, backward, clip and optimizer step inside ``accumulate``:
        ``(losses, finite on every process, gradient norm or NaN)``."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.module):
            losses = self.module(batch)
            loss = losses["loss"]
            if self.state["step"] in cfg.run.debug_nan_steps:
                loss = loss * float("nan")
            finite = acc.reduce(torch.isfinite(loss.detach()).float(), "min").item() > 0
            if finite:
                acc.backward(loss)
            grad_norm = math.nan
            if acc.sync_gradients and finite:
                grad_norm = float(acc.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip))
                finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses, finite, grad_norm

    def _count_skip(self, finite: bool) -> None:
        state, cfg = self.state, self.cfg
        if finite:
            state["consecutive_skips"] = 0
            return
        state["skipped_steps"] += 1
        state["consecutive_skips"] += 1
        log.warning("step %d skipped: non-finite loss or gradients (%d in a row)",
                    state["step"], state["consecutive_skips"])
        if state["consecutive_skips"] >= cfg.run.max_consecutive_skips:
            raise SystemExit(
                f"error: {state['consecutive_skips']} consecutive steps had non-finite loss or "
                f"gradients (run.max_consecutive_skips={cfg.run.max_consecutive_skips}); lower "
                "optim.lr, check the data, or try run.mixed_precision=no")

    def _log(self, record: dict[str, Any]) -> None:
        """The collapse warning (first time, then every 25 steps), ``log.jsonl``, the trackers."""
        state, acc = self.state, self.accelerator
        warning = collapse_warning(record)
        state["collapsed_steps"] += warning is not None
        if warning and (state["collapsed_steps"] == 1 or state["step"] % 25 == 0):
            log.warning("%s", warning)
        if acc.is_main_process:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        acc.log({k: v for k, v in record.items()
                 if isinstance(v, float) and math.isfinite(v)}, step=state["step"])
