"""Pieces of the pre-training run around the step: the model+objective module that DDP wraps, a
timed iterator, the collapse monitor, and the end-of-run summary (losses, throughput, retrieval,
the loss plot). The step itself is :class:`t3d_train.loop.TrainStep`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t3d_train.files import write_bytes_atomic

_INPUTS = ("crops", "study_index", "group", "corrupted", "corruption_mask")


#: The embeddings whose spread is logged (collapse monitor) and the statistics kept of each.
SPREAD_EMBEDDINGS = ("visual_emb", "text_informed_emb")
SPREAD_STATS = ("same_cos", "cross_cos", "std", "std_ratio")


class PretrainModule(nn.Module):
    """``objective(**model(**inputs))``: one module, so DDP syncs the model and the learnable
    temperatures together. Tokenisation happens here, on the training process.

    The returned dict holds the objective's losses and, detached, the spread of the crop
    embeddings (``visual_emb/same_cos`` ... , see :func:`t3d_objectives.embedding_spread`;
    same/cross = crops of the same / different studies of this process's batch)."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from t3d_objectives import embedding_spread

        device = batch["crops"].device
        tokens = {k: v.to(device) for k, v in self.model.tokenize(batch["reports"]).items()}
        inputs = {k: batch[k] for k in _INPUTS if k in batch}
        out = self.model(**inputs, **tokens)
        losses = self.objective(**out)
        for key in SPREAD_EMBEDDINGS:
            spread = embedding_spread(out[key], batch["study_index"])
            for stat in SPREAD_STATS:
                losses[f"{key}/{stat}"] = torch.tensor(spread[stat], device=device)
        return losses


def collapse_warning(record: dict[str, Any]) -> str | None:
    """A warning line when a logged step's spread says an embedding collapsed, else ``None``."""
    from t3d_objectives import is_collapsed

    bad = []
    for key in SPREAD_EMBEDDINGS:
        spread = {stat: record.get(f"{key}/{stat}", math.nan) for stat in SPREAD_STATS}
        if is_collapsed(spread):
            bad.append(f"{key} (cross-study cosine {spread['cross_cos']:.4f}, "
                       f"std*sqrt(E) {spread['std_ratio']:.3f})")
    if not bad:
        return None
    return (f"step {record['step']}: embedding collapse: {'; '.join(bad)}. The contrastive losses "
            "sit at chance when crops share one embedding; use model.head=bn_mlp and "
            "optim.vision_lr_mult<1 (the defaults), see docs/pretraining.md")


def timed(iterable: Iterable[Any], waits: list[float]) -> Iterator[Any]:
    """Yield from ``iterable``, adding the time spent waiting for each item to ``waits[0]``."""
    import time

    it = iter(iterable)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            waits[0] += time.perf_counter() - t0
            return
        waits[0] += time.perf_counter() - t0
        yield item


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chance_recall(groups: list[int], k: int) -> float:
    """Expected Recall@K of a random ranking when every member of a query's group is a hit
    (``t3d_eval.chance_retrieval``)."""
    from t3d_eval import chance_retrieval

    return chance_retrieval(groups, ks=(k,))[f"recall@{k}"]


@torch.no_grad()
def retrieval_check(model: nn.Module, store: Path, split: str | None, crop_config: Any,
                    num_crops: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float] | None:
    """Volume→report Recall@K on ``split`` (mean of ``num_crops`` crops per volume) vs chance,
    and the eval-mode spread of those crops' embeddings (``eval_spread``: BatchNorm heads keep
    the training-mode spread open even when the encoder collapses; eval mode shows it).

    Volumes are embedded by ``t3d_eval.embed_volumes`` (mode ``"crops"``: each study's own
    crops), reports by ``model.encode_text``; both in eval mode, each module's train/eval flag
    restored afterwards."""
    from t3d_data import CropDataset
    from t3d_eval import chance_retrieval, embed_volumes, retrieval_metrics
    from t3d_objectives import embedding_spread

    cfg = crop_config.model_copy(update={"num_crops": num_crops, "seed": crop_config.seed + 7})
    ds = CropDataset(store, cfg, split=split)
    if len(ds) < 2:
        return None
    out = embed_volumes(model, ds, mode="crops", batch_size=2, keep_crops=True)
    reports, groups = out["reports"], out["group"].tolist()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # the text tower too (dropout); embed_volumes restored the training flags
    try:
        text = torch.cat([model.encode_text(reports[i:i + 16]).float().cpu()
                          for i in range(0, len(reports), 16)])
    finally:
        for m, flag in flags:
            m.training = flag
    metrics = retrieval_metrics(out["volume_emb"], text, groups=groups, ks=ks)
    chance = chance_retrieval(groups, ks=ks)
    res = {"studies": len(ds)}
    for k in ks:
        res[f"v2r_recall@{k}"] = metrics[f"v2r_recall@{k}"]
        res[f"chance_recall@{k}"] = chance[f"recall@{k}"]
    res["v2r_median_rank"] = metrics["v2r_median_rank"]
    res["chance_median_rank"] = chance["median_rank"]
    res["eval_spread"] = embedding_spread(out["crop_emb"], out["crop_row"])
    return res


def retrieval_line(retrieval: dict[str, Any], split: str) -> str:
    """The summary line of :func:`retrieval_check`; every number as summary.json holds it
    (``:g``: a median rank of 4.5 prints as 4.5, not rounded to 4)."""
    return (f"  retrieval on {retrieval['studies']} held-out '{split}' studies: "
            + ", ".join(f"R@{k} {retrieval[f'v2r_recall@{k}']:.2f} (chance "
                        f"{retrieval[f'chance_recall@{k}']:.2f})" for k in (1, 5))
            + f", median rank {retrieval['v2r_median_rank']:g}"
            + (f" (chance {retrieval['chance_median_rank']:g})"
               if "chance_median_rank" in retrieval else ""))


def chance_losses(cfg: Any, num_processes: int) -> dict[str, tuple[str, float]]:
    """The losses of a constant embedding per enabled term that has one
    (:func:`t3d_objectives.chance_losses` of the run's resolved objective): TCL ``log(N-1)`` over
    the N crops that are scored together, InfoNCE alignment ``log B`` over the B studies (per
    process, or all processes with ``objective.gather_distributed``)."""
    from t3d_objectives import chance_losses as term_chances

    from t3d_train.pretrain_config import resolve_objective

    return term_chances(resolve_objective(cfg.objective), studies=cfg.data.batch_size,
                        crops_per_study=cfg.data.crop.num_crops, processes=num_processes)


def loss_keys(cfg: Any) -> list[str]:
    """The logged loss keys of a run: ``"loss"`` then each enabled term's key, in the order of
    the term registry (``t3d_objectives.term_names``)."""
    from t3d_objectives import term_names

    from t3d_train.pretrain_config import resolve_objective

    return ["loss", *term_names(resolve_objective(cfg.objective))]


def plot_losses(records: list[dict[str, Any]], path: Path,
                chance: dict[str, tuple[str, float]] | None = None) -> list[str]:
    """Loss per term against step, as a PNG, with a dashed line at each term's chance value
    (``chance``: :func:`chance_losses`) in the term's colour. The terms are those of the
    registry (``t3d_objectives.TERMS``) that the records hold. Returns the legend labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from t3d_objectives import TERMS

    keys = [k for k in ("loss", *(t.key for t in TERMS.values())) if k in records[0]]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in records]
    for k in keys:
        (line,) = ax.plot(steps, [r[k] for r in records], label=k)
        if chance and k in chance:
            formula, value = chance[k]
            ax.axhline(value, color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{k} chance {formula} = {value:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.set_title("T3D pre-training (dashed: chance, a constant embedding)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    write_bytes_atomic(Path(path), buf.getvalue())
    return [t.get_text() for t in ax.get_legend().get_texts()]


def summarise_run(accelerator: Any, model: nn.Module, cfg: Any, log_path: Path,
                  timing: dict[str, float]) -> dict[str, Any]:
    """Losses per term at start/end, throughput and the retrieval check; main process only."""
    if not accelerator.is_main_process:
        return {}
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    finite = [r for r in records if not r["skipped"]]
    window = max(1, min(5, len(finite) // 4))
    terms = [k for k in loss_keys(cfg) if finite and k in finite[0]]
    start = {k: sum(r[k] for r in finite[:window]) / window for k in terms}
    end = {k: sum(r[k] for r in finite[-window:]) / window for k in terms}
    retrieval = None
    if cfg.run.eval_split:
        retrieval = retrieval_check(model, cfg.data.store, cfg.run.eval_split, cfg.data.crop,
                                    cfg.run.eval_crops)
    steps = records[-1]["step"] if records else 0
    chance = chance_losses(cfg, accelerator.num_processes)
    if finite:
        plot_losses(finite, cfg.run.output_dir / "loss_curve.png", chance)
    spread_keys = [f"{e}/{s}" for e in SPREAD_EMBEDDINGS for s in SPREAD_STATS]
    spread = {k: sum(r[k] for r in finite[-window:]) / window for k in spread_keys
              if finite and k in finite[0]}
    from t3d_objectives import is_collapsed

    collapsed = [r["step"] for r in finite if collapse_warning(r)]
    summary = {"steps": steps, "skipped_steps": sum(r["skipped"] for r in records),
               "loss_start": start, "loss_end": end, "loss_chance": chance,
               "loss_ratio": {k: end[k] / start[k] for k in terms if start[k]},
               "spread_end": spread, "collapsed_steps": len(collapsed), **timing,
               "data_wait_fraction": timing["data_wait_seconds"]
               / max(timing["data_wait_seconds"] + timing["compute_seconds"], 1e-9),
               "retrieval": retrieval}
    lines = [f"T3D pre-training: {steps} steps in {timing['seconds']:.0f} s "
             f"({timing['crops_per_second']:.2f} crops/s, data wait "
             f"{100 * summary['data_wait_fraction']:.1f}%); loss terms are means of the "
             f"first/last {window} steps"]
    for k in terms:
        line = f"  {k:<11} {start[k]:.4f} -> {end[k]:.4f}"
        if start[k]:
            line += f"  ({end[k] / start[k]:.2f}x of start"
            if k in chance:
                where = "below" if end[k] < chance[k][1] else "NOT below"
                line += f"; chance {chance[k][0]} = {chance[k][1]:.4f}, {where} chance"
            line += ")"
        lines.append(line)
    for e in SPREAD_EMBEDDINGS:
        if f"{e}/cross_cos" in spread:
            lines.append(f"  {e:<17} spread: same-study cos {spread[f'{e}/same_cos']:.3f}, "
                         f"cross-study cos {spread[f'{e}/cross_cos']:.3f}, std*sqrt(E) "
                         f"{spread[f'{e}/std_ratio']:.3f} (collapsed: cross cos > 0.95 or "
                         "std*sqrt(E) < 0.1)")
    if collapsed:
        lines.append(f"  WARNING: embedding collapse in {len(collapsed)} of {len(finite)} steps "
                     f"(first at step {collapsed[0]}, last at {collapsed[-1]}); see docs/pretraining.md")
    if retrieval:
        lines.append(retrieval_line(retrieval, cfg.run.eval_split))
        es = retrieval["eval_spread"]
        lines.append(f"  held-out crops, eval mode: same-study cos {es['same_cos']:.3f}, cross-study cos "
                     f"{es['cross_cos']:.3f}, std*sqrt(E) {es['std_ratio']:.3f}")
        if is_collapsed(es):
            lines.append("  WARNING: the held-out crop embeddings (eval mode) have collapsed: the encoder "
                         "maps every crop alike; see docs/pretraining.md")
    lines.append(f"  run folder: {cfg.run.output_dir} (summary.json, log.jsonl, loss_curve.png, "
                 "model/, checkpoints/)")
    summary["text"] = "\n".join(lines)
    return summary
