#!/usr/bin/env python
"""T3D pre-training with Hugging Face Accelerate (TCL + TIR + global alignment).

    accelerate launch tools/pretrain.py --config tools/configs/pretrain/t3d-base.yaml \
        [--set section.field=value ...] [--resume latest|PATH]
    python tools/pretrain.py            # the embedded CPU demo on phantom CT-report data

The story (accelerate's examples): build the data, model and objective; ``prepare``; loop inside
``accelerator.accumulate``; ``save_state`` atomically every N steps; ``load_state`` +
``skip_first_batches`` to resume exactly. Models and losses live in the t3d packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from t3d_tools.checkpoint import resolve_resume  # noqa: E402
from t3d_tools.config import ConfigError, load_config, run_cli  # noqa: E402

log = logging.getLogger("t3d.pretrain")

DEMO_STUDIES = 96  # the phantom's patient-level split leaves 20 of them held out ("test")
# 96^3 phantoms: two random 64^3 crops of a study overlap, so TCL's positives share voxels and
# the contrastive terms can fall within the demo's minutes (native-size phantoms, ~128x128x112,
# did not in 20 steps; see docs/pretraining.md)
DEMO_SHAPE = (96, 96, 96)
DEMO_DEFAULTS: dict[str, Any] = {
    # The embedded default: the t3d-tiny-cpu model on a small phantom dataset, ~8 min on 2 quiet
    # cores (~14 s per step of 4 studies x 2 crops of 64^3). It trains on the first 4 training
    # studies only (an overfitting check: with 16 studies, or native-size phantoms, the
    # contrastive terms did not fall within 30 steps) and evaluates on all 20 held-out ones.
    # lr is the heads' learning rate; the encoders learn at 0.1x (optim.vision_lr_mult / text_lr_mult).
    "data": {"store": None, "batch_size": 4, "num_workers": 0, "max_studies": 4,
             "crop": {"num_crops": 2}},
    "model": {"preset": "t3d-tiny-cpu"},
    "optim": {"lr": 1e-3, "warmup_steps": 3, "max_steps": 30},
    # One resumable checkpoint (~330 MB: weights + AdamW state); --set run.keep_last=N keeps more.
    "run": {"output_dir": "runs/demo", "checkpoint_every": 30, "keep_last": 1, "eval_crops": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (tools/configs/pretrain/*.yaml); "
                   "omit to run the embedded CPU demo on phantom data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override one config field, e.g. --set optim.max_steps=10 (repeatable)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="resume from the newest complete checkpoint of the run, or a folder")
    return p.parse_args(argv)


def demo_cache_dir() -> Path:
    """Where the demo's phantom data is cached (``$T3D_CACHE_DIR`` or ``~/.cache/t3d``)."""
    return Path(os.environ.get("T3D_CACHE_DIR", Path.home() / ".cache" / "t3d"))


def ensure_demo_store(n_studies: int = DEMO_STUDIES, seed: int = 0,
                      shape: tuple[int, int, int] | None = DEMO_SHAPE) -> Path:
    """Build (once) the phantom dataset and prepare it into a store; return the store folder."""
    from t3d_data import prepare
    from t3d_data.phantom import generate_phantom_dataset

    tag = "" if shape is None else "-" + "x".join(map(str, shape))
    root = demo_cache_dir() / f"phantom-n{n_studies}{tag}-s{seed}"
    store = root / "store"
    if not (store / "index.json").is_file() or not (root / "manifest.ok").is_file():
        manifest = generate_phantom_dataset(root / "phantom", n_studies=n_studies, seed=seed,
                                            shape=shape)
        prepare(manifest, store)
        (root / "manifest.ok").write_text("ok\n", encoding="utf-8")
    return store


def load_pretrain_config(args: argparse.Namespace):
    """The validated :class:`PretrainConfig` (demo defaults when no ``--config``)."""
    from t3d_tools.pretrain_config import PretrainConfig

    if args.config is None:
        defaults = json.loads(json.dumps(DEMO_DEFAULTS))
        overridden = {o.split("=", 1)[0].strip() for o in args.overrides}
        if "data.store" not in overridden:
            defaults["data"]["store"] = "<demo>"
        return load_config(PretrainConfig, None, args.overrides, defaults=defaults)
    return load_config(PretrainConfig, args.config, args.overrides)


class StopFlag:
    """Set by SIGTERM; ranks agree on it at step boundaries so all save at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_pretrain_config(args)
    ckpt_root = cfg.run.output_dir / "checkpoints"
    # before anything is built: nothing to resume from is one line and status 2, in seconds
    resume_from = resolve_resume(args.resume, ckpt_root) if args.resume else None

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from t3d_data import CropDataset
    from t3d_models import T3DModel
    from t3d_objectives import CropCorruption, T3DObjective
    from t3d_tools.checkpoint import (
        OBJECTIVE,
        clear_stale,
        finalize,
        load_module_weights,
        read_state,
        save_module_weights,
        tmp_folder,
        trim_log,
        write_json_atomic,
    )
    from t3d_tools.data import EpochShuffleSampler, PretrainDataset, collate_pretrain
    from t3d_tools.pretrain_config import resolve_objective
    from t3d_tools.schedule import warmup_cosine_schedule
    from t3d_tools.trainer import (
        PretrainModule,
        collapse_warning,
        peak_memory_mib,
        summarise_run,
        timed,
    )
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    objective_cfg = resolve_objective(cfg.objective)
    disabled_term = min(objective_cfg.w_tcl, objective_cfg.w_tir, objective_cfg.w_align) == 0
    run_dir = cfg.run.output_dir
    use_tensorboard = cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if use_tensorboard else None,
        project_dir=str(run_dir),
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=disabled_term)],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if str(cfg.data.store) == "<demo>":
        with accelerator.main_process_first():  # the main process builds; the others find the cache
            cfg.data.store = ensure_demo_store(seed=cfg.run.seed)
    if not (Path(cfg.data.store) / "index.json").is_file():
        raise ConfigError(f"data.store: {cfg.data.store} is not a prepared store (no index.json); "
                          "run `t3d-data prepare MANIFEST OUT` first")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    resolved = json.loads(cfg.model_dump_json())

    set_seed(cfg.run.seed)
    if cfg.run.gradient_checkpointing:
        cfg.model.vision.use_checkpoint = True
    module = PretrainModule(T3DModel(cfg.model), T3DObjective.from_config(objective_cfg))

    crops = CropDataset(cfg.data.store, cfg.data.crop, split=cfg.data.split,
                        max_studies=cfg.data.max_studies)
    corruption = None
    if objective_cfg.w_tir > 0:
        c = cfg.corruption
        corruption = CropCorruption(drop_fraction=c.drop_fraction, max_block_fraction=c.max_block_fraction,
                                    shuffle_block_size=c.shuffle_block_size, mode=c.mode,
                                    noise_std=c.noise_std)
    dataset = PretrainDataset(crops, corruption, seed=cfg.data.crop.seed)
    per_step = cfg.data.batch_size * accelerator.num_processes
    sampler = EpochShuffleSampler(len(dataset), seed=cfg.data.crop.seed, shuffle=cfg.data.shuffle,
                                  global_batch=per_step)
    if len(dataset) < per_step:
        raise ConfigError(f"data: split {cfg.data.split!r} has {len(dataset)} studies, fewer than one "
                          f"global batch ({cfg.data.batch_size} x {accelerator.num_processes} processes)")
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_pretrain,
                        drop_last=True, pin_memory=cfg.data.pin_memory,
                        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None)

    groups = module.model.param_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.vision_lr_mult,
                                       cfg.optim.text_lr_mult, extra=module.objective)
    head_group = next(i for i, g in enumerate(groups) if g["name"].startswith("heads/"))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    # Not prepared: accelerate would step it num_processes times per optimizer step. It is
    # stepped once per optimizer step below and saved/restored with the checkpoint.
    scheduler = warmup_cosine_schedule(optimizer, cfg.optim.warmup_steps, cfg.optim.max_steps)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    batches_per_epoch = len(loader)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0,
             "consecutive_skips": 0, "studies_seen": 0, "studies_failed": 0, "collapsed_steps": 0}
    # The weights are stored once per checkpoint: the model as save_pretrained writes it
    # (model/, loadable by every tool) and the objective's temperatures in objective.safetensors;
    # accelerate keeps the optimizer, scheduler and RNG states.
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(
        lambda models, folder: models.clear() if (Path(folder) / OBJECTIVE).is_file() else None)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if (resume_from / OBJECTIVE).is_file():  # else an older checkpoint: accelerate loaded it
            load_module_weights(accelerator.unwrap_model(module), resume_from)
        state.update(read_state(resume_from)["state"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state["step"],
                 state["epoch"], state["batch_in_epoch"])

    if use_tensorboard:
        accelerator.init_trackers("tensorboard")
    log_path = run_dir / "log.jsonl"
    if accelerator.is_main_process:  # each step once: drop steps logged after the checkpoint
        trim_log(log_path, state["step"])
    stop = StopFlag()

    def save_checkpoint() -> Path | None:
        tmp = tmp_folder(ckpt_root, state["step"])
        if accelerator.is_main_process:  # a killed write's partial files must not end up in it
            clear_stale(ckpt_root)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process:
            save_module_weights(accelerator.unwrap_model(module), tmp)
            final = finalize(tmp, ckpt_root, state["step"], {"step": state["step"], "state": state,
                                                             "config": resolved}, cfg.run.keep_last)
            log.info("checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    start_step = state["step"]
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], desc="pretrain",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    t_start, compute_time, crops_done, waits = time.perf_counter(), 0.0, 0, [0.0]
    stopped_by_signal = False
    while state["step"] < cfg.optim.max_steps and not stopped_by_signal:
        sampler.use_epoch(state["epoch"])
        dataset.use_epoch(state["epoch"])
        epoch_loader = loader
        if state["batch_in_epoch"]:
            epoch_loader = accelerator.skip_first_batches(loader, state["batch_in_epoch"])
        for batch in timed(epoch_loader, waits):
            state["batch_in_epoch"] += 1
            state["studies_seen"] += batch["num_samples"]
            for study_id, reason in batch["failed"]:
                state["studies_failed"] += 1
                log.warning("study %s skipped: %s", study_id, reason)
            failed = accelerator.reduce(torch.tensor(len(batch["failed"]), device=accelerator.device), "sum")
            if failed.item():
                if state["studies_failed"] / max(state["studies_seen"], 1) > cfg.run.max_bad_fraction:
                    raise SystemExit(
                        f"error: {state['studies_failed']} of {state['studies_seen']} studies failed to "
                        f"load (> run.max_bad_fraction={cfg.run.max_bad_fraction}); check the store "
                        "(t3d-data prepare) and the warnings above")
                continue  # every rank drops this batch together (keeps DDP in step)
            # Seed per micro-batch: dropout depends only on (seed, step, batch, rank) -> exact resume.
            torch.manual_seed(hash((cfg.run.seed, state["step"], state["batch_in_epoch"],
                                    accelerator.process_index)) % 2**62)
            t1 = time.perf_counter()
            with accelerator.accumulate(module):
                losses = module(batch)
                loss = losses["loss"]
                if state["step"] in cfg.run.debug_nan_steps:
                    loss = loss * float("nan")
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float(), "min").item() > 0
                if finite:
                    accelerator.backward(loss)
                grad_norm = math.nan
                if accelerator.sync_gradients and finite:
                    grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip))
                    finite = math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            compute_time += time.perf_counter() - t1
            crops_done += batch["crops"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            lr = optimizer.param_groups[head_group]["lr"]  # the rate this step was taken with
            scheduler.step()
            state["step"] += 1
            if finite:
                state["consecutive_skips"] = 0
            else:
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
                log.warning("step %d skipped: non-finite loss or gradients (%d in a row)",
                            state["step"], state["consecutive_skips"])
                if state["consecutive_skips"] >= cfg.run.max_consecutive_skips:
                    raise SystemExit(
                        f"error: {state['consecutive_skips']} consecutive steps had non-finite loss or "
                        f"gradients (run.max_consecutive_skips={cfg.run.max_consecutive_skips}); lower "
                        "optim.lr, check the data, or try run.mixed_precision=no")
            logged = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in losses.items()}
            record = {"step": state["step"], "epoch": state["epoch"], **logged,
                      "lr": lr, "grad_norm": grad_norm,
                      "skipped": not finite, "time": time.perf_counter() - t_start}
            warning = collapse_warning(record)
            state["collapsed_steps"] += warning is not None
            if warning and (state["collapsed_steps"] == 1 or state["step"] % 25 == 0):
                log.warning("%s", warning)
            if accelerator.is_main_process:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items()
                             if isinstance(v, float) and math.isfinite(v)}, step=state["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.3f}")
            if state["batch_in_epoch"] >= batches_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            flag = accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device), "max")
            if flag.item() > 0:
                log.warning("SIGTERM: saving at step %d and exiting", state["step"])
                save_checkpoint()
                stopped_by_signal = True
                break
            if state["step"] % cfg.run.checkpoint_every == 0 or state["step"] == cfg.optim.max_steps:
                save_checkpoint()
            if state["step"] >= cfg.optim.max_steps or state["batch_in_epoch"] == 0:
                break
        else:  # the loader ran out (e.g. the epoch's last batches failed to load)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    if stopped_by_signal:
        return 0
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).model.save_pretrained(run_dir / "model")
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t_start
    steps_run = state["step"] - start_step
    timing = {"seconds": elapsed, "data_wait_seconds": waits[0], "compute_seconds": compute_time,
              "steps_per_second": steps_run / max(compute_time + waits[0], 1e-9),
              "crops_per_second": crops_done / max(compute_time + waits[0], 1e-9),
              "peak_memory_mib": peak_memory_mib(accelerator.device)}
    summary = summarise_run(accelerator, accelerator.unwrap_model(module).model, cfg, log_path, timing)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "summary.json", summary)
        print(summary["text"])
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_cli(main)
