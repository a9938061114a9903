"""Report generation downstream of a T3D encoder: config, fine-tuning, generation, scoring, evidence.

The library side of ``tools/finetune_report.py`` and ``tools/generate_reports.py``. The model is
:class:`t3d_models.report.ReportGenerator`; the metrics are :mod:`t3d_eval.report_metrics`.
A study is covered by a sliding window of crops at native resolution (``t3d_eval``'s
:func:`~t3d_eval.sliding_window_starts`, padded with air as ``embed_volumes`` pads); with a
frozen encoder each study's crop tokens are computed once and cached for the whole run.

Fine-tuning follows the pre-training conventions: one YAML config with ``--set`` overrides
(unknown keys are errors), Accelerate, a ``log.jsonl`` record per step, atomic resumable
checkpoints (``checkpoints/step-N``, :func:`t3d_train.loop.save_checkpoint` / ``resume``) and
the final ``model/`` folder (:meth:`ReportGenerator.save_pretrained`). Heavy imports happen
inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from t3d_train.config import ConfigError, apply_overrides
from t3d_train.eval_config import ModelSection, RuntimeSection

log = logging.getLogger("t3d.report")
_STRICT = ConfigDict(extra="forbid")

#: Markers of the "Report generation" section that :func:`report_evidence` writes into docs/results.md.
SECTION_START = "<!-- report-generation:start -->"
SECTION_END = "<!-- report-generation:end -->"
#: ``t3d_models.report.CONFIG_NAME``: the file that marks a saved generator folder.
GENERATOR_CONFIG = "report_config.json"
#: Training studies whose tokens fit the resampler's location statistics when the encoder is
#: not frozen (a frozen encoder's cached tokens of every training study are used).
LOCATION_FIT_STUDIES = 64


class DecoderSection(BaseModel):
    """``t3d_models.report.DecoderConfig`` (same fields; kept here so a config is checked
    before torch is imported): the causal LM, by hub id / folder, or ``model_type`` + ``config``
    with random weights; its tokenizer (``minilm``: the packaged one, offline)."""

    model_config = _STRICT
    model_name_or_path: str | None = None
    model_type: str = "gpt2"
    config: dict[str, Any] = Field(default_factory=lambda: {
        "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512})
    pretrained: bool = True
    tokenizer: str | None = "minilm"
    max_length: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _needs_tokenizer(self) -> DecoderSection:
        if self.model_name_or_path is None and self.tokenizer is None:
            raise ValueError("a decoder built from model_type needs decoder.tokenizer (e.g. "
                             "minilm, or a hub id / folder)")
        return self


class ResamplerSection(BaseModel):
    """``t3d_models.report.ResamplerConfig`` (same fields): the learned queries."""

    model_config = _STRICT
    num_queries: int = Field(16, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    width: int | None = Field(None, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    position_frequencies: int = Field(4, ge=1)
    location_grid: int = Field(4, ge=0, le=16)


class GeneratorSection(BaseModel):
    """The generator on top of the encoder (:class:`t3d_models.report.ReportGeneratorConfig`)."""

    model_config = _STRICT
    encoder: Literal["frozen", "partial", "trainable"] = "frozen"
    trainable_stages: int = Field(1, ge=1, le=4)
    resampler: ResamplerSection = Field(default_factory=ResamplerSection)
    decoder: DecoderSection = Field(default_factory=DecoderSection)
    #: Weight of the auxiliary finding loss: a head on the visual prefix predicts the findings
    #: the ``labeller`` reads in each training report (0: no head).
    finding_loss_weight: float = Field(1.0, ge=0)


class ReportDataSection(BaseModel):
    """Which studies; how a study is cut into crops (sliding window, native resolution)."""

    model_config = _STRICT
    store: Path
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    crop_batch: int = Field(4, ge=1)

    @field_validator("store")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return Path(v).expanduser()


class ReportOptimSection(BaseModel):
    """AdamW with warm-up + cosine decay (:mod:`t3d_train.schedule`); the encoder's trainable
    parameters learn at ``lr * encoder_lr_mult``."""

    model_config = _STRICT
    lr: float = Field(5e-4, gt=0)
    encoder_lr_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_clip: float = Field(1.0, gt=0)


class ReportRunSection(BaseModel):
    """Run folder, checkpoints, precision, logging."""

    model_config = _STRICT
    output_dir: Path = Path("runs/report")
    seed: int = 0
    threads: int | None = Field(2, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    tensorboard: bool = False


class GenerateSection(BaseModel):
    """Decoding: greedy (``num_beams: 1``) or beam search, via transformers' ``generate``."""

    model_config = _STRICT
    num_beams: int = Field(1, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    length_penalty: float = 1.0
    batch_size: int = Field(8, ge=1)


class ReportConfig(BaseModel):
    """tools/finetune_report.py: everything a fine-tuning run needs (saved in its run folder)."""

    model_config = _STRICT
    model: ModelSection = Field(default_factory=ModelSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    data: ReportDataSection
    optim: ReportOptimSection = Field(default_factory=ReportOptimSection)
    run: ReportRunSection = Field(default_factory=ReportRunSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    #: The labeller vocabulary of the closing scores (``t3d_eval.report_labeller.vocabulary``).
    labeller: Literal["phantom", "ct-rate"] = "phantom"


class GenerateConfig(BaseModel):
    """tools/generate_reports.py: a fine-tuned generator, a store split, decoding, the JSONL."""

    model_config = _STRICT
    checkpoint: Path
    store: Path
    split: str = "test"
    max_studies: int | None = Field(None, ge=1)
    out: Path = Path("runs/report/generated.jsonl")
    overlap: float | None = Field(None, ge=0.0, lt=1.0)  # default: the generator's
    generate: GenerateSection = Field(default_factory=GenerateSection)
    labeller: Literal["phantom", "ct-rate"] | None = "phantom"  # null: JSONL only, no scores
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @field_validator("checkpoint", "store", "out")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return Path(v).expanduser()


# --------------------------------------------------------------------------- input checks
def check_report_inputs(cfg: ReportConfig) -> None:
    """Paths of a fine-tuning config, before torch is imported."""
    from t3d_train.eval_common import check_checkpoint, check_store

    check_checkpoint(cfg.model)
    check_store(cfg.data.store)
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir: {out} is a file; pass a folder")


def check_generate_inputs(cfg: GenerateConfig) -> None:
    """Paths of a generation config, before torch is imported."""
    from t3d_train.eval_common import check_store

    if not (Path(cfg.checkpoint) / GENERATOR_CONFIG).is_file():
        raise ConfigError(f"checkpoint: {cfg.checkpoint} has no {GENERATOR_CONFIG}; pass the "
                          "model/ folder of a tools/finetune_report.py run (e.g. runs/report/model)")
    check_store(cfg.store)
    if Path(cfg.out).is_dir():
        raise ConfigError(f"out: {cfg.out} is a folder; pass a .jsonl file path")


# --------------------------------------------------------------------------- model + crops
def train_reports(cfg: ReportConfig) -> list[str]:
    """The reports of the training studies (``data.train_split``, ``data.max_train``)."""
    from t3d_data import VolumeStore

    store = VolumeStore(cfg.data.store)
    idx = store.indices(cfg.data.train_split)
    if cfg.data.max_train is not None:
        idx = idx[: cfg.data.max_train]
    return [store.records[i].report for i in idx]


def finding_names(cfg: ReportConfig) -> list[str]:
    """The findings of the auxiliary head: the ``labeller`` vocabulary's, or none when
    ``generator.finding_loss_weight`` is 0."""
    if cfg.generator.finding_loss_weight == 0:
        return []
    from t3d_eval.report_labeller import vocabulary

    return [rule.name for rule in vocabulary(cfg.labeller)]


def finding_targets(reports: list[str], labeller: str, names: list[str]) -> Any:
    """``(N, F)`` float 0/1 targets: the findings ``names`` the labeller reads as present."""
    import torch
    from t3d_eval.report_labeller import ReportLabeller, vocabulary

    rules = {r.name: r for r in vocabulary(labeller)}
    missing = [n for n in names if n not in rules]
    if missing:
        raise ConfigError(f"generator findings {missing} are not in the {labeller!r} labeller "
                          f"vocabulary ({sorted(rules)}); set labeller to the vocabulary the "
                          "generator was trained with")
    pos = ReportLabeller([rules[n] for n in names]).positives(reports)
    return torch.tensor(pos, dtype=torch.float32).reshape(len(reports), len(names))


def build_generator(cfg: ReportConfig, encoder_model: Any = None) -> Any:
    """The generator on the encoder of ``cfg.model`` (a T3D checkpoint, or the random-init
    preset when ``checkpoint`` is null), seeded by ``run.seed``; ``encoder_model`` (a
    T3DModel) skips loading. A ``words`` tokenizer is fitted on the training reports."""
    import torch
    from t3d_models.report import (
        DecoderConfig,
        ReportGenerator,
        ReportGeneratorConfig,
        ResamplerConfig,
    )

    from t3d_train.eval_common import load_model
    from t3d_train.preprocessing import resolve_preprocessing

    t3d = encoder_model if encoder_model is not None else load_model(cfg.model, cfg.run.seed)
    prep = resolve_preprocessing(cfg.model, t3d.config)
    source = str(cfg.model.checkpoint) if cfg.model.checkpoint is not None else \
        f"random:{cfg.model.preset}"
    g = cfg.generator
    gen_cfg = ReportGeneratorConfig(vision=t3d.config.vision, preprocessing=prep,
                                    encoder=g.encoder, trainable_stages=g.trainable_stages,
                                    resampler=ResamplerConfig(**g.resampler.model_dump()),
                                    decoder=DecoderConfig(**g.decoder.model_dump()),
                                    overlap=cfg.data.overlap, encoder_source=source,
                                    findings=finding_names(cfg),
                                    finding_loss_weight=g.finding_loss_weight)
    torch.manual_seed(cfg.run.seed + 1)  # resampler + decoder init, independent of the encoder's
    try:
        return ReportGenerator.from_t3d(t3d, gen_cfg, reports=train_reports(cfg)).train()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def study_crops(image: Any, crop_size: tuple[int, int, int], overlap: float
                ) -> tuple[Any, list[tuple[int, int, int]], tuple[int, int, int]]:
    """``(crops (K, 1, D, H, W), starts, padded shape)``: the sliding window that covers a
    ``(1, X, Y, Z)`` volume (``t3d_eval.sliding_window_starts``; short axes padded with air)."""
    import torch.nn.functional as F
    from t3d_eval import AIR_VALUE, sliding_window_starts

    need = [max(0, c - d) for c, d in zip(crop_size, image.shape[1:], strict=True)]
    vol = F.pad(image, (0, need[2], 0, need[1], 0, need[0]), value=AIR_VALUE) if any(need) else image
    starts = sliding_window_starts(vol.shape[1:], crop_size, overlap)
    import torch

    crops = torch.stack([vol[:, x : x + crop_size[0], y : y + crop_size[1], z : z + crop_size[2]]
                         for x, y, z in starts])
    return crops, starts, tuple(vol.shape[1:])


def study_features(generator: Any, dataset: Any, indices: list[int], *, overlap: float,
                   crop_batch: int = 4, grad: bool = False, progress: bool = False,
                   desc: str = "crop tokens") -> list[tuple[Any, Any]]:
    """Per study ``(tokens (T, C), positions (T, 3))`` of its sliding-window crops (CPU unless
    ``grad``; no gradients unless ``grad``)."""
    import torch
    from tqdm.auto import tqdm

    crop = tuple(generator.config.vision.crop_size)
    out = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for i in tqdm(indices, desc=desc, unit="study", disable=not progress):
            crops, starts, shape = study_crops(dataset[i]["image"], crop, overlap)
            tokens, pos = generator.study_tokens(crops.to(generator.device), starts, shape,
                                                 batch_size=crop_batch)
            out.append((tokens, pos) if grad else (tokens.cpu(), pos.cpu()))
    return out


def _report_module(generator: Any) -> Any:
    """``module.model`` = the generator, ``module.objective`` = an empty module: the layout
    :func:`t3d_train.loop.save_checkpoint` / ``resume`` expect."""
    from torch import nn

    class _Module(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.objective = model, nn.Module()

        def forward(self, tokens: Any, positions: Any, mask: Any, reports: list[str],
                    finding_labels: Any = None) -> Any:
            ids = self.model.tokenize_reports(reports, device=tokens.device)
            return self.model(tokens, positions, mask, **ids, finding_labels=finding_labels)

    return _Module(generator)


def _param_groups(generator: Any, cfg: ReportOptimSection) -> list[dict[str, Any]]:
    enc = [p for p in generator.vision.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in generator.vision.parameters()}
    rest = [p for p in generator.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [{"params": rest, "lr": cfg.lr, "name": "generator"}]
    if enc:
        groups.append({"params": enc, "lr": cfg.lr * cfg.encoder_lr_mult, "name": "encoder"})
    return groups


def finetune(cfg: ReportConfig, *, resume_from: Path | None = None, generator: Any = None,
             features: list[tuple[Any, Any]] | None = None, progress: bool = False,
             command: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune a report generator on ``data.train_split``; returns the run summary.

    Writes ``run.output_dir/`` ``config.json``, ``log.jsonl`` (one record per step),
    ``checkpoints/step-N`` (atomic, resumable), ``model/`` and ``summary.json``.

    Args:
        cfg: the run config.
        resume_from: a complete checkpoint folder (:func:`t3d_train.checkpoint.resolve_resume`).
        generator: a prebuilt generator (default: :func:`build_generator`).
        features: cached ``(tokens, positions)`` of the training studies (frozen encoder).
        progress: tqdm bars.
        command: the command line, for ``summary.json``.
    """
    check_report_inputs(cfg)
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from t3d_data import VolumeDataset
    from t3d_models.report import pad_studies
    from tqdm.auto import tqdm

    from t3d_train import loop
    from t3d_train.checkpoint import trim_log
    from t3d_train.eval_common import set_threads, subset
    from t3d_train.files import write_json_atomic, write_text_atomic
    from t3d_train.schedule import warmup_cosine_schedule

    set_threads(cfg.run.threads)
    run_dir = Path(cfg.run.output_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), project_dir=str(run_dir),
                              mixed_precision=cfg.run.mixed_precision,
                              log_with="tensorboard" if cfg.run.tensorboard else None)
    set_seed(cfg.run.seed)
    if generator is None:
        generator = build_generator(cfg)
    generator = generator.to(accelerator.device)
    prep = generator.config.preprocessing
    train = VolumeDataset(cfg.data.store, split=cfg.data.train_split, hu_window=prep.hu_window)
    idx = subset(train, cfg.data.max_train)
    if len(idx) < 1:
        raise ConfigError(f"data.train_split {cfg.data.train_split!r} has no studies")
    reports = [train.store.records[train.indices[i]].report for i in idx]
    names = list(generator.config.findings)
    targets = finding_targets(reports, cfg.labeller, names) if names else None
    frozen = generator.encoder_frozen
    if frozen and features is None:
        features = study_features(generator, train, idx, overlap=cfg.data.overlap,
                                  crop_batch=cfg.data.crop_batch, progress=progress,
                                  desc=f"crop tokens {cfg.data.train_split}")
    if generator.config.resampler.location_grid and resume_from is None:
        # per-location token statistics of the training studies (a resumed run restores them)
        fit = features if frozen else study_features(
            generator, train, idx[:LOCATION_FIT_STUDIES], overlap=cfg.data.overlap,
            crop_batch=cfg.data.crop_batch, progress=progress, desc="location statistics")
        info = generator.resampler.fit_location_stats([f[0] for f in fit], [f[1] for f in fit])
        log.info("location statistics: %d cells from %d tokens of %d studies", info["cells"],
                 info["tokens"], len(fit))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", cfg.model_dump_json(indent=2))
    module = _report_module(generator)
    optimizer = torch.optim.AdamW(_param_groups(generator, cfg.optim), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, cfg.optim.warmup_steps, cfg.optim.max_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    loop.store_weights_once(accelerator)
    state = loop.new_state()
    if resume_from is not None:
        loop.resume(accelerator, module, Path(resume_from), state)
    if cfg.run.tensorboard:
        accelerator.init_trackers("tensorboard")
    log_path = run_dir / "log.jsonl"
    if accelerator.is_main_process:
        trim_log(log_path, state["step"])
    stop = loop.StopFlag()
    resolved = json.loads(cfg.model_dump_json())
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.optim.batch_size * world
    if len(idx) < per_step:
        raise ConfigError(f"data: split {cfg.data.train_split!r} has {len(idx)} studies, fewer than "
                          f"one global batch (optim.batch_size={cfg.optim.batch_size} x {world} "
                          "processes); lower optim.batch_size")
    batches_per_epoch = len(idx) // per_step
    unwrapped = accelerator.unwrap_model(module)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], desc="finetune report",
               disable=not (progress and accelerator.is_local_main_process), dynamic_ncols=True)
    stopped = False
    module.train()
    if frozen:
        generator.vision.eval()
    while state["step"] < cfg.optim.max_steps and not stopped:
        order = np.random.default_rng([cfg.run.seed, state["epoch"]]).permutation(len(idx))
        while state["batch_in_epoch"] < batches_per_epoch and state["step"] < cfg.optim.max_steps:
            b = state["batch_in_epoch"]
            mine = order[b * per_step : (b + 1) * per_step][rank::world].tolist()
            torch.manual_seed(hash((cfg.run.seed, state["step"], rank)) % 2**62)
            if frozen:
                parts = [features[j] for j in mine]
            else:
                parts = study_features(unwrapped.model, train, [idx[j] for j in mine],
                                       overlap=cfg.data.overlap, crop_batch=cfg.data.crop_batch,
                                       grad=True)
            tokens, pos, mask = pad_studies([p[0] for p in parts], [p[1] for p in parts])
            dev = accelerator.device
            with accelerator.accumulate(module):
                out = module(tokens.to(dev), pos.to(dev), mask.to(dev), [reports[j] for j in mine],
                             None if targets is None else targets[mine].to(dev))
                loss = out["loss"]
                finite = bool(torch.isfinite(loss.detach()))
                grad_norm = math.nan
                if finite:
                    accelerator.backward(loss)
                    grad_norm = float(accelerator.clip_grad_norm_(module.parameters(),
                                                                  cfg.optim.grad_clip))
                    if math.isfinite(grad_norm):
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["skipped_steps"] += not (finite and math.isfinite(grad_norm))
            # the logged losses, averaged over processes in one all-reduce
            logged = [k for k in ("loss", "lm_loss", "finding_loss") if k in out]
            means = accelerator.reduce(torch.stack([out[k].detach().float() for k in logged]),
                                       "mean").tolist()
            value = means[0]
            record = {"step": state["step"], "epoch": state["epoch"], "loss": value,
                      "lm_loss": means[1], "lr": lr, "grad_norm": grad_norm,
                      "skipped": not finite, "time": time.perf_counter() - t0,
                      **dict(zip(logged[2:], means[2:], strict=True))}
            if accelerator.is_main_process:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            accelerator.log({"loss": value, "lr": lr}, step=state["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if stop.agreed(accelerator):
                log.warning("SIGTERM: saving at step %d and exiting", state["step"])
                loop.save_checkpoint(accelerator, module, run_dir / "checkpoints", state,
                                     resolved, cfg.run.keep_last)
                stopped = True
                break
            if state["step"] % cfg.run.checkpoint_every == 0 or state["step"] == cfg.optim.max_steps:
                loop.save_checkpoint(accelerator, module, run_dir / "checkpoints", state,
                                     resolved, cfg.run.keep_last)
        if state["batch_in_epoch"] >= batches_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()
               if line.strip()] if log_path.is_file() else []
    finite_losses = [r["loss"] for r in records if not r["skipped"]]
    window = max(1, min(10, len(finite_losses) // 4))
    summary: dict[str, Any] = {
        "steps": state["step"], "epochs": state["epoch"], "train_studies": len(idx),
        "loss_start": float(np.mean(finite_losses[:window])) if finite_losses else None,
        "loss_end": float(np.mean(finite_losses[-window:])) if finite_losses else None,
        "seconds": time.perf_counter() - t0, "encoder": generator.config.encoder,
        "encoder_source": generator.config.encoder_source, "stopped_by_signal": stopped,
        "command": command}
    if not stopped and accelerator.is_main_process:
        unwrapped.model.save_pretrained(run_dir / "model", card={
            "steps": state["step"], "data": str(cfg.data.store), "loss_end": summary["loss_end"]})
        write_json_atomic(run_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary["text"] = (f"Report generator: {state['step']} steps on {len(idx)} "
                       f"'{cfg.data.train_split}' studies in {summary['seconds']:.0f} s; "
                       f"token loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f} "
                       f"(means of the first/last {window} steps); encoder "
                       f"{generator.config.encoder} ({generator.config.encoder_source}); "
                       f"model in {run_dir / 'model'}")
    return summary


# --------------------------------------------------------------------------- generate + score
def generate_for(generator: Any, features: list[tuple[Any, Any]], gen: GenerateSection,
                 progress: bool = False) -> list[str]:
    """Generated reports of studies given their cached ``(tokens, positions)``."""
    from t3d_models.report import pad_studies
    from tqdm.auto import tqdm

    out: list[str] = []
    steps = range(0, len(features), gen.batch_size)
    for k in tqdm(steps, desc="generate", unit="batch", disable=not progress):
        part = features[k : k + gen.batch_size]
        tokens, pos, mask = pad_studies([p[0] for p in part], [p[1] for p in part])
        dev = generator.device
        out += generator.generate(tokens.to(dev), pos.to(dev), mask.to(dev),
                                  max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams,
                                  repetition_penalty=gen.repetition_penalty,
                                  length_penalty=gen.length_penalty)
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """``rows`` as JSON lines, atomically."""
    from t3d_train.files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a generated-reports JSONL; each needs ``study_id``, ``generated``, ``reference``.

    Raises:
        ConfigError: a line that is not JSON or lacks a field (names file, line and field).
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{n}: not a JSON object; each line needs study_id, "
                              "generated and reference") from None
        for key in ("study_id", "generated", "reference"):
            if not isinstance(row.get(key), str):
                raise ConfigError(f"{path}:{n}: field '{key}' missing or not a string; each line "
                                  "needs study_id, generated and reference")
        rows.append(row)
    return rows


def score_rows(rows: list[dict[str, Any]], labeller: str = "phantom", n_resamples: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """:func:`t3d_eval.report_metrics.score_reports` of generated-report rows."""
    from t3d_eval.report_labeller import vocabulary
    from t3d_eval.report_metrics import score_reports

    return score_reports([r["generated"] for r in rows], [r["reference"] for r in rows],
                         vocabulary(labeller), n_resamples=n_resamples, seed=seed)


def generate_reports(cfg: GenerateConfig, progress: bool = False) -> dict[str, Any]:
    """Generate a report per study of ``cfg.split``, write the JSONL (``study_id``,
    ``generated``, ``reference``), score it (unless ``labeller`` is null).

    Returns:
        ``{"rows": [...], "out": path, "scores": {...} | None, "seconds": float}``.
    """
    check_generate_inputs(cfg)
    import torch
    from t3d_data import VolumeDataset
    from t3d_models.report import ReportGenerator

    from t3d_train.eval_common import set_threads, subset

    set_threads(cfg.runtime.threads)
    t0 = time.perf_counter()
    try:
        gen = ReportGenerator.from_pretrained(cfg.checkpoint)
    except ValueError as err:
        raise ConfigError(f"checkpoint: {err}") from None
    gen = gen.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()
    ds = VolumeDataset(cfg.store, split=cfg.split, hu_window=gen.config.preprocessing.hu_window)
    idx = subset(ds, cfg.max_studies)
    if not idx:
        raise ConfigError(f"split: {cfg.split!r} has no studies in {cfg.store}")
    overlap = cfg.overlap if cfg.overlap is not None else gen.config.overlap
    feats = study_features(gen, ds, idx, overlap=overlap, progress=progress,
                           desc=f"crop tokens {cfg.split}")
    texts = generate_for(gen, feats, cfg.generate, progress)
    rows = [{"study_id": ds.store.records[ds.indices[i]].study_id, "generated": g,
             "reference": ds.store.records[ds.indices[i]].report} for i, g in zip(idx, texts,
                                                                                   strict=True)]
    write_jsonl(rows, cfg.out)
    scores = score_rows(rows, cfg.labeller) if cfg.labeller is not None else None
    return {"rows": rows, "out": str(cfg.out), "scores": scores,
            "seconds": time.perf_counter() - t0}


def score_line(name: str, s: dict[str, Any]) -> str:
    """One line: clinical macro F1 [CI], BLEU-1..4, ROUGE-L of a scored system."""
    c = s["clinical"]
    return (f"{name}: clinical macro F1 {c['macro_f1']:.3f} [{c['macro_f1_ci'][0]:.3f}, "
            f"{c['macro_f1_ci'][1]:.3f}], BLEU-1/2/3/4 {s['bleu1']:.3f}/{s['bleu2']:.3f}/"
            f"{s['bleu3']:.3f}/{s['bleu4']:.3f}, ROUGE-L {s['rougeL']:.3f} on {s['studies']} studies")


# --------------------------------------------------------------------------- baselines
def most_frequent_report(reports: list[str]) -> str:
    """Baseline (a): the most frequent training report (ties: the first seen)."""
    if not reports:
        raise ValueError("no training reports")
    counts = Counter(reports)
    best = max(counts.values())
    return next(r for r in reports if counts[r] == best)


def volume_embeddings_from_tokens(t3d_model: Any, features: list[tuple[Any, Any]],
                                  tokens_per_crop: int) -> Any:
    """T3D volume embeddings (mean over crops of ``proj_v`` of each crop's mean token) from
    cached crop tokens: what ``t3d_eval.embed_volumes(mode="sliding")`` computes, without a
    second encoder pass."""
    import torch

    flags = [(m, m.training) for m in t3d_model.modules()]
    t3d_model.eval()
    try:
        with torch.no_grad():
            rows = []
            for tokens, _ in features:
                per_crop = tokens.reshape(-1, tokens_per_crop, tokens.shape[-1]).mean(1)
                rows.append(t3d_model.proj_v(per_crop.to(t3d_model.device)).float().mean(0).cpu())
    finally:
        for m, flag in flags:
            m.training = flag
    return torch.stack(rows)


def nearest_report(t3d_model: Any, test_emb: Any, train_reports: list[str]) -> list[str]:
    """Baseline (b): per test volume, the training report nearest by T3D volume→report cosine."""
    import torch
    from t3d_eval import cosine_similarity_matrix, text_encoder

    enc = text_encoder(t3d_model)
    flags = [(m, m.training) for m in t3d_model.modules()]
    t3d_model.eval()
    try:
        text = torch.cat([enc(train_reports[i : i + 32]) for i in range(0, len(train_reports), 32)])
    finally:
        for m, flag in flags:
            m.training = flag
    sim = cosine_similarity_matrix(test_emb.float(), text.float())
    return [train_reports[j] for j in sim.argmax(1).tolist()]


# --------------------------------------------------------------------------- evidence
def _paired_difference(truth: Any, pred_a: Any, pred_b: Any, n_resamples: int, seed: int) -> Any:
    import numpy as np
    from t3d_eval.bootstrap import bootstrap_ci
    from t3d_eval.report_metrics import macro_f1_statistic

    sa, sb = macro_f1_statistic(truth, pred_a), macro_f1_statistic(truth, pred_b)
    return bootstrap_ci(np.arange(len(truth)), lambda i: sa(i) - sb(i),
                        n_resamples=n_resamples, seed=seed)


def _verdict(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any], diff: Any) -> str:
    ca, cb = a["clinical"], b["clinical"]
    lo_a, hi_a = ca["macro_f1_ci"]
    lo_b, hi_b = cb["macro_f1_ci"]
    if ca["macro_f1"] > cb["macro_f1"]:
        how = ("higher, non-overlapping intervals" if lo_a > hi_b else
               "higher, overlapping intervals: not evidence")
    else:
        how = "NOT higher"
    return (f"- {name_a} vs {name_b}, clinical macro F1: {ca['macro_f1']:.3f} [{lo_a:.3f}, "
            f"{hi_a:.3f}] vs {cb['macro_f1']:.3f} [{lo_b:.3f}, {hi_b:.3f}]; paired difference "
            f"{diff.estimate:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] → {how}.")


def _fmt_ci(x: float, ci: list[float]) -> str:
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def evidence_markdown(result: dict[str, Any]) -> str:
    """The "Report generation" section of docs/results.md from :func:`report_evidence`'s result."""
    s, t = result["systems"], result["timing"]
    names = list(s)
    lines = [SECTION_START, "", "### Measured run", "", "```", result["command"], "```", "",
             f"{result['train_studies']} training and {result['test_studies']} test phantom studies "
             f"of `{result['store']}`; encoder checkpoint `{result['checkpoint']}`; generator: "
             f"{result['generator']}; {result['steps']} fine-tuning steps of "
             f"{result['batch_size']} studies per arm; decoding: {result['decoding']}. "
             f"Wall clock {t['total'] / 60:.1f} min on {result['machine']} (crop tokens "
             f"{t['features'] / 60:.1f} min, fine-tuning {t['finetune'] / 60:.1f} min, generation "
             f"{t['generate'] / 60:.1f} min, scoring {t['score'] / 60:.1f} min); budget "
             f"{result['budget_minutes']} min.", "",
             "| system | clinical macro F1 [95% CI] | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | "
             "ROUGE-L [95% CI] | side agreement (pairs) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        x, c = s[n], s[n]["clinical"]
        side = "–" if c["side_accuracy"] is None else f"{c['side_accuracy']:.2f} ({c['side_pairs']})"
        lines.append(f"| {n} | {_fmt_ci(c['macro_f1'], c['macro_f1_ci'])} | {x['bleu1']:.3f} | "
                     f"{x['bleu2']:.3f} | {x['bleu3']:.3f} | {x['bleu4']:.3f} | "
                     f"{_fmt_ci(x['rougeL'], x['rougeL_ci'])} | {side} |")
    findings = s[names[0]]["clinical"]["names"]
    lines += ["", "Per-finding F1 (support = test studies whose reference states the finding; "
              "– = no positive reference):", "",
              "| finding | support | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for f in findings:
        per = [s[n]["clinical"]["per_finding"][f] for n in names]
        cells = ["–" if p["f1"] is None else f"{p['f1']:.2f}" for p in per]
        lines.append(f"| {f} | {per[0]['support']} | " + " | ".join(cells) + " |")
    for n, path in result.get("files", {}).items():
        if n.startswith(("(a)", "(b)")) or not Path(path).is_file():
            continue
        texts = [json.loads(line)["generated"] for line in
                 Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        distinct = len(set(texts))
        if distinct <= max(1, len(texts) // 10):
            lines += ["", f"**WARNING: {n} wrote {distinct} distinct report(s) for "
                      f"{len(texts)} test studies: it does not use the image, and its clinical "
                      "F1 is that of a constant report (here: the findings its garbled text "
                      "happens to state), not evidence of image understanding.**"]
    lines += ["", "95% intervals: percentile bootstrap over the test studies, "
              f"{result['n_resamples']} resamples, the same resamples for every system (paired).",
              "", "Comparisons, as measured by this run:", *result["verdicts"], "",
              "First test study, generated (T3D encoder) and reference:", "", "```",
              result["example"]["generated"], "```", "", "```", result["example"]["reference"],
              "```", "", SECTION_END]
    return "\n".join(lines)


def update_docs_section(path: Path, section: str) -> None:
    """Replace the text between the report-generation markers of ``path`` (appended under a
    ``## Report generation`` heading when the markers are missing); atomic."""
    from t3d_train.files import write_text_atomic

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Report generation\n\n" + section + "\n"
    write_text_atomic(path, text)


def _cached(path: Path, compute: Any, key: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Crop tokens from ``path`` when it was written for the same ``key`` (store, split, study
    ids, encoder weights, crop settings), else computed and saved there (safetensors with the
    key as metadata, atomic): a rerun of the evidence skips the encoder passes, and a changed
    store or checkpoint never reuses stale tokens."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == digest:
                log.info("crop tokens from %s", path)
                return [(fh.get_tensor(f"{i}.tokens"), fh.get_tensor(f"{i}.positions"))
                        for i in range(len(fh.keys()) // 2)]
        log.info("%s was computed for other inputs; recomputing", path)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({**{f"{i}.tokens": t.contiguous() for i, (t, _) in enumerate(feats)},
               **{f"{i}.positions": p.contiguous() for i, (_, p) in enumerate(feats)}}, str(tmp),
              metadata={"key": digest})
    tmp.replace(path)
    return feats


#: The chance-level row of the evidence table: a training report drawn at random per test study.
RANDOM_REPORT = "(d) a random training report (chance level)"


def random_reports(train_reports: list[str], n: int, seed: int) -> list[str]:
    """Baseline (d): for each of ``n`` test studies a training report drawn uniformly at random
    (seeded). Its clinical F1 is what matching the findings' prevalence alone gives (about the
    prevalence for each finding), the level a generator must clear to be reading the image."""
    import numpy as np

    if not train_reports:
        raise ValueError("random_reports needs training reports")
    pick = np.random.default_rng([seed, 4]).integers(0, len(train_reports), size=n)
    return [train_reports[int(i)] for i in pick]


#: The ``ablations`` arms of :func:`report_evidence`: name → (file stem, ``--set`` overrides).
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "ablation: T3D encoder, no location standardisation": (
        "ablation_no_location", ["generator.resampler.location_grid=0"]),
    "ablation: T3D encoder, no finding loss": (
        "ablation_no_finding_loss", ["generator.finding_loss_weight=0"]),
}


def _weights_digest(cfg: ReportConfig) -> str:
    """sha256 of the checkpoint's weights file (names the encoder in the token cache key)."""
    from t3d_train.suite import checkpoint_record

    return checkpoint_record(Path(cfg.model.checkpoint))["sha256"]


def report_evidence(cfg: ReportConfig, *, budget_minutes: int = 30, n_resamples: int = 1000,
                    docs: Path | None = None, command: str = "", machine: str = "this machine",
                    progress: bool = False, ablations: bool = False) -> dict[str, Any]:
    """Generator on the T3D encoder of ``cfg.model.checkpoint`` vs the baselines, one table.

    Arms, all fine-tuned with ``cfg`` on ``data.train_split`` and scored on ``data.test_split``:
    the generator on the pre-trained encoder; (a) the most frequent training report for every
    study; (b) the training report nearest to each test volume by T3D volume→report
    retrieval; (c) the generator on a randomly initialised encoder of the same architecture.
    The encoder must be frozen (crop tokens are computed once per arm and kept in
    ``run.output_dir/features/``, so a rerun skips the encoder passes). Writes
    ``run.output_dir/`` ``report_evidence.json``, ``report_evidence.md``, one JSONL per system
    and each arm's run folder; with ``docs``, the "Report generation" section of that file.
    ``ablations`` adds two more generators on the T3D encoder's tokens, each without one of
    the parts that make the prefix informative (:data:`ABLATIONS`), scored in the same table.
    """
    check_report_inputs(cfg)
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: the evidence compares a pre-trained encoder with a "
                          "random one; pass the T3D checkpoint (e.g. runs/demo/model)")
    if cfg.generator.encoder != "frozen":
        raise ConfigError("generator.encoder: the evidence run caches crop tokens; use frozen")
    import torch
    from t3d_data import VolumeDataset
    from t3d_models import T3DModel

    from t3d_train.eval_common import load_model, set_threads, subset

    set_threads(cfg.run.threads)
    t_start = time.perf_counter()
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t3d = load_model(cfg.model, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    random_enc = T3DModel(t3d.config).eval()  # same architecture and text tower, random vision
    arms = {"t3d": (cfg, t3d),
            "random": (cfg.model_copy(deep=True, update={"model": ModelSection(
                checkpoint=None, preset=cfg.model.preset)}), random_enc)}
    prep = t3d.config.preprocessing
    train = VolumeDataset(cfg.data.store, split=cfg.data.train_split, hu_window=prep.hu_window)
    test = VolumeDataset(cfg.data.store, split=cfg.data.test_split, hu_window=prep.hu_window)
    tr, te = subset(train, cfg.data.max_train), subset(test, cfg.data.max_test)
    train_reports = [train.store.records[train.indices[i]].report for i in tr]
    refs = [test.store.records[test.indices[i]].report for i in te]
    ids = [test.store.records[test.indices[i]].study_id for i in te]
    train_ids = [train.store.records[train.indices[i]].study_id for i in tr]
    timing = {"features": 0.0, "finetune": 0.0, "generate": 0.0, "score": 0.0}
    generated: dict[str, list[str]] = {}
    test_feats: dict[str, Any] = {}
    for arm, (arm_cfg, enc) in arms.items():
        arm_cfg = arm_cfg.model_copy(deep=True)
        arm_cfg.run.output_dir = out / arm
        arm_cfg.model.checkpoint = cfg.model.checkpoint if arm == "t3d" else None
        gen = build_generator(arm_cfg, encoder_model=enc)
        t0 = time.perf_counter()
        key = {"store": str(Path(cfg.data.store).resolve()), "overlap": cfg.data.overlap,
               "encoder": (f"{Path(cfg.model.checkpoint).resolve()}:{_weights_digest(cfg)}"
                           if arm == "t3d" else f"random:{cfg.model.preset}:{cfg.run.seed}"),
               "vision": t3d.config.vision.model_dump(), "preprocessing": prep.model_dump()}
        f_tr = _cached(out / "features" / f"{arm}-{cfg.data.train_split}.safetensors",
                       lambda gen=gen, arm=arm: study_features(
                           gen, train, tr, overlap=cfg.data.overlap,
                           crop_batch=cfg.data.crop_batch, progress=progress,
                           desc=f"{arm} crop tokens train"), {**key, "studies": train_ids})
        test_feats[arm] = _cached(out / "features" / f"{arm}-{cfg.data.test_split}.safetensors",
                                  lambda gen=gen, arm=arm: study_features(
                                      gen, test, te, overlap=cfg.data.overlap,
                                      crop_batch=cfg.data.crop_batch, progress=progress,
                                      desc=f"{arm} crop tokens test"), {**key, "studies": ids})
        timing["features"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = finetune(arm_cfg, generator=gen, features=f_tr, progress=progress)
        timing["finetune"] += time.perf_counter() - t0
        log.info("%s", summary["text"])
        t0 = time.perf_counter()
        generated[arm] = generate_for(gen, test_feats[arm], cfg.generate, progress)
        timing["generate"] += time.perf_counter() - t0
        if arm == "t3d":
            t3d_train_feats = f_tr
    ablated: dict[str, list[str]] = {}
    for name, (slug, overrides) in (ABLATIONS.items() if ablations else ()):
        arm_cfg = ReportConfig.model_validate(apply_overrides(json.loads(cfg.model_dump_json()),
                                                              list(overrides)))
        arm_cfg.run.output_dir = out / slug
        gen = build_generator(arm_cfg, encoder_model=t3d)
        t0 = time.perf_counter()
        summary = finetune(arm_cfg, generator=gen, features=t3d_train_feats, progress=progress)
        timing["finetune"] += time.perf_counter() - t0
        log.info("%s: %s", name, summary["text"])
        t0 = time.perf_counter()
        ablated[name] = generate_for(gen, test_feats["t3d"], cfg.generate, progress)
        timing["generate"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = 1
    for c in t3d.config.vision.crop_size:
        grid *= c // 32
    vol_emb = volume_embeddings_from_tokens(t3d, test_feats["t3d"], grid)
    systems_text = {
        "(a) most frequent training report": [most_frequent_report(train_reports)] * len(te),
        "(b) nearest training report (T3D retrieval)": nearest_report(t3d, vol_emb, train_reports),
        "generator, T3D encoder": generated["t3d"],
        "(c) generator, random encoder": generated["random"],
        RANDOM_REPORT: random_reports(train_reports, len(te), cfg.run.seed),
        **ablated,
    }
    systems, files = {}, {}
    stems = {"(a)": "baseline_a", "(b)": "baseline_b", "(c)": "generator_random",
             "(d)": "baseline_d"}
    for name, texts in systems_text.items():
        rows = [{"study_id": i, "generated": g, "reference": r}
                for i, g, r in zip(ids, texts, refs, strict=True)]
        stem = stems.get(name[:3]) or ABLATIONS.get(name, ("generator_t3d",))[0]
        files[name] = str(write_jsonl(rows, out / f"{stem}.jsonl"))
        systems[name] = score_rows(rows, cfg.labeller, n_resamples=n_resamples, seed=0)
    truth = systems["generator, T3D encoder"]["clinical"]["truth"]
    import numpy as np

    truth = np.asarray(truth, bool)
    pred = {n: np.asarray(s["clinical"]["pred"], bool) for n, s in systems.items()}
    main = "generator, T3D encoder"
    verdicts = [_verdict(main, systems[main], other, systems[other],
                         _paired_difference(truth, pred[main], pred[other], n_resamples, 0))
                for other in systems if other != main]
    timing["score"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    d = cfg.generator.decoder
    result = {
        "command": command, "store": str(cfg.data.store), "checkpoint": str(cfg.model.checkpoint),
        "train_studies": len(tr), "test_studies": len(te), "steps": cfg.optim.max_steps,
        "batch_size": cfg.optim.batch_size,
        "generator": (f"frozen encoder, {cfg.generator.resampler.num_queries} learned queries x "
                      f"{cfg.generator.resampler.depth} cross-attention layers (tokens "
                      f"standardised per cell of a {cfg.generator.resampler.location_grid}³ "
                      f"location grid), auxiliary finding loss weight "
                      f"{cfg.generator.finding_loss_weight}, decoder "
                      f"{d.model_name_or_path or d.model_type} {json.dumps(d.config)} "
                      f"(tokenizer {d.tokenizer or 'the decoder'}), prefix conditioning"),
        "decoding": (f"{'greedy' if cfg.generate.num_beams == 1 else f'beam {cfg.generate.num_beams}'}"
                     f", at most {cfg.generate.max_new_tokens} new tokens, repetition penalty "
                     f"{cfg.generate.repetition_penalty}"),
        "machine": machine, "budget_minutes": budget_minutes, "timing": timing,
        "n_resamples": n_resamples, "systems": systems, "files": files, "verdicts": verdicts,
        "example": {"generated": generated["t3d"][0], "reference": refs[0]},
    }
    from t3d_train.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "report_evidence.json", result)
    section = evidence_markdown(result)
    write_text_atomic(out / "report_evidence.md", section + "\n")
    if docs is not None:
        update_docs_section(Path(docs), section)
    return result


def report_config_from_args(model: type[BaseModel], args: Any, shortcuts: dict[str, str]) -> Any:
    """The validated config of a parsed ``eval_parser`` command line (``--config``, ``--set``,
    shortcut flags), as :func:`t3d_train.eval_common.parse_config` builds it."""
    from t3d_train.config import load_config

    overrides = list(args.overrides)
    for flag, field in shortcuts.items():
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            overrides.append(f"{field}={value}")
    return load_config(model, args.config, overrides, defaults={})
