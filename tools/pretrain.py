#!/usr/bin/env python
"""T3D pre-training with Hugging Face Accelerate (TCL + TIR + global alignment).

    accelerate launch tools/pretrain.py --config tools/configs/pretrain/t3d-base.yaml \
        [--set section.field=value ...] [--resume latest|PATH]
    python tools/pretrain.py            # the embedded CPU demo on phantom CT-report data

The story (accelerate's examples): build the data, model and objective; ``prepare``; loop inside
``accelerator.accumulate``; ``save_state`` atomically every N steps; ``load_state`` +
``skip_first_batches`` to resume exactly. One step (forward, NaN guard, backward, clip,
optimizer and schedule step, the log record) is ``t3d_train.loop.TrainStep``; models and losses
live in the t3d packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from t3d_train.checkpoint import resolve_resume
from t3d_train.config import run_cli
from t3d_train.demo import load_pretrain_config

log = logging.getLogger("t3d.pretrain")


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_pretrain_config(args.config, args.overrides)
    ckpt_root = cfg.run.output_dir / "checkpoints"
    # before anything is built: nothing to resume from is one line and status 2, in seconds
    resume_from = resolve_resume(args.resume, ckpt_root) if args.resume else None

    from accelerate.utils import set_seed
    from t3d_models import T3DModel
    from t3d_objectives import T3DObjective
    from t3d_train import loop
    from t3d_train.checkpoint import trim_log
    from t3d_train.files import write_json_atomic, write_text_atomic
    from t3d_train.pretrain_config import resolve_objective
    from t3d_train.trainer import PretrainModule, peak_memory_mib, summarise_run, timed
    from tqdm.auto import tqdm

    objective_cfg = resolve_objective(cfg.objective)
    run_dir = cfg.run.output_dir
    accelerator, use_tensorboard = loop.make_accelerator(cfg, objective_cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop.prepare_store(cfg, accelerator)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", cfg.model_dump_json(indent=2))
    resolved = json.loads(cfg.model_dump_json())

    set_seed(cfg.run.seed)
    loop.apply_threads(cfg)
    if cfg.run.gradient_checkpointing:
        cfg.model.vision.use_checkpoint = True
    model = loop.compile_model(T3DModel(cfg.model), cfg)
    module = PretrainModule(model, T3DObjective.from_config(objective_cfg))
    dataset, sampler, loader = loop.build_data(cfg, objective_cfg, accelerator.num_processes)
    optimizer, scheduler, head_group = loop.build_optimizer(module, cfg)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step, unprepared
    batches_per_epoch = len(loader)

    state = loop.new_state()
    loop.store_weights_once(accelerator)
    if resume_from is not None:
        loop.resume(accelerator, module, resume_from, state)
    if use_tensorboard:
        accelerator.init_trackers("tensorboard")
    log_path = run_dir / "log.jsonl"
    if accelerator.is_main_process:  # each step once: drop steps logged after the checkpoint
        trim_log(log_path, state["step"])
    stop = loop.StopFlag()

    def save_checkpoint() -> Path | None:
        return loop.save_checkpoint(accelerator, module, ckpt_root, state, resolved,
                                    cfg.run.keep_last)

    start_step = state["step"]
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], desc="pretrain",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step = loop.TrainStep(accelerator, module, optimizer, scheduler, cfg, state, head_group, log_path)
    waits = [0.0]
    stopped_by_signal = False
    while state["step"] < cfg.optim.max_steps and not stopped_by_signal:
        sampler.use_epoch(state["epoch"])
        dataset.use_epoch(state["epoch"])
        epoch_loader = loader
        if state["batch_in_epoch"]:
            epoch_loader = accelerator.skip_first_batches(loader, state["batch_in_epoch"])
        for batch in timed(epoch_loader, waits):
            record = step(batch)
            if record is None:  # a dropped batch, or gradients still accumulating
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if state["batch_in_epoch"] >= batches_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if stop.agreed(accelerator):
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
        accelerator.unwrap_model(module).model.save_pretrained(run_dir / "model",
                                                              card={"steps": state["step"]})
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - step.t_start
    steps_run = state["step"] - start_step
    busy = max(step.compute_seconds + waits[0], 1e-9)
    timing = {"seconds": elapsed, "data_wait_seconds": waits[0],
              "compute_seconds": step.compute_seconds, "steps_per_second": steps_run / busy,
              "crops_per_second": step.crops / busy,
              "peak_memory_mib": peak_memory_mib(accelerator.device)}
    summary = summarise_run(accelerator, accelerator.unwrap_model(module).model, cfg, log_path, timing)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "summary.json", summary)
        command = ["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
        loop.write_run_card(cfg, summary, command)  # model/README.md: steps, data, losses, chance
        print(summary["text"])
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_cli(main)
