"""Timing helpers for the speed knobs (``tools/bench_models.py --variants``, ``tools/gpu_check.py``).

A *variant* is a set of knobs applied to one model config: ``sdpa`` (``vision.attention``),
``channels_last`` (``vision.channels_last``), ``fused`` (AdamW), ``compile`` (``torch.compile``),
``checkpoint`` (``vision.use_checkpoint``), ``threads=N``. :func:`build_full_step` builds the
full T3D pre-training step (model, ``T3DObjective``, backward, clipping, AdamW) under a variant;
:func:`timed_step` times one; :func:`module_table` splits a step by module. torch, MONAI and
transformers are imported only when a step is built.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

__all__ = ["KNOBS", "REPORT", "build_full_step", "module_table", "parse_variant", "peak_memory",
           "reset_peak_memory", "sync", "timed_step"]

REPORT = (
    "CT chest with contrast. Findings: spiculated nodule of 14 mm in the right upper lobe "
    "abutting the pleura, suspicious for primary malignancy. Several subcentimetre mediastinal "
    "lymph nodes. No pleural effusion. Mild centrilobular emphysema in both upper lobes. "
    "Degenerative changes of the thoracic spine. Impression: right upper lobe nodule, "
    "recommend PET-CT and multidisciplinary review. "
)


def sync(device: Any) -> None:
    """Wait for the device (CUDA) to finish queued work; nothing on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Any) -> None:
    """Reset the CUDA peak-memory counter (nothing on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> float | None:
    """Peak CUDA memory allocated since the last reset, GiB; ``None`` on CPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


KNOBS = ("eager", "sdpa", "channels_last", "fused", "compile", "checkpoint", "threads")


def parse_variant(text: str) -> dict[str, Any]:
    """``"sdpa,channels_last,threads=1"`` -> ``{"sdpa": True, "channels_last": True, "threads": 1}``.

    Raises:
        ValueError: an unknown knob (names the valid ones).
    """
    knobs: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in KNOBS or (name == "threads") != bool(value):
            raise ValueError(f"unknown knob {part!r} in variant {text!r}; valid: eager, sdpa, "
                             "channels_last, fused, compile, checkpoint, threads=N")
        if name != "eager":
            knobs[name] = int(value) if name == "threads" else True
    return knobs


def build_full_step(config: Any, knobs: dict[str, Any], state: dict | None, device: Any,
                    crops: int = 8, crops_per_study: int = 2, report_words: int = 200,
                    bf16: bool = False) -> dict:
    """One model + objective + AdamW under ``knobs`` on a fixed synthetic batch.

    Args:
        config: the :class:`t3d_models.T3DModelConfig` (the knobs override its vision fields).
        knobs: from :func:`parse_variant`.
        state: model weights to start from (``None``: seed 0); variants compared from one state.
        device: where to run.
        crops: crops per step N; ``crops_per_study`` K gives B = ceil(N / K) studies.
        report_words: words per synthetic report.
        bf16: bf16 autocast around forward + objective.

    Returns:
        ``{"step": callable -> loss, "model", "objective", "optimizer", "batch", "knobs"}``.
    """
    import t3d_models
    import torch
    from t3d_objectives import T3DObjective

    vision = config.vision.model_copy(update={
        "attention": "sdpa" if knobs.get("sdpa") else "eager",
        "channels_last": bool(knobs.get("channels_last")),
        "use_checkpoint": bool(knobs.get("checkpoint", config.vision.use_checkpoint))})
    cfg = config.model_copy(update={"vision": vision})
    torch.manual_seed(0)
    model = t3d_models.T3DModel(cfg).to(device).train()
    if state is not None:
        model.load_state_dict(state)
    objective = T3DObjective().to(device)
    groups = model.param_groups(1e-4, extra=objective)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True if knobs.get("fused") else None)
    n, k = crops, crops_per_study
    b = -(-n // k)
    g = torch.Generator().manual_seed(1)
    size = tuple(cfg.vision.crop_size)
    crops = torch.rand(n, 1, *size, generator=g)
    corrupted = crops.clone()
    corrupted[:, :, : size[0] // 4] = torch.rand(n, 1, size[0] // 4, *size[1:], generator=g)
    words = (REPORT * (report_words // len(REPORT.split()) + 1)).split()
    reports = [" ".join(words[i : i + report_words]) + f" study {i}" for i in range(b)]
    batch = {"crops": crops.to(device), "corrupted": corrupted.to(device),
             "study_index": (torch.arange(n) // k).to(device),
             "group": torch.arange(b).to(device),
             **{k_: v.to(device) for k_, v in model.tokenize(reports).items()}}
    run = model
    if knobs.get("compile"):
        run = torch.compile(model)
    params = [p for grp in groups for p in grp["params"]]

    def step() -> float:
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
               else contextlib.nullcontext())
        with ctx:
            loss = objective(**run(**batch))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {"step": step, "model": model, "objective": objective, "optimizer": opt,
            "batch": batch, "knobs": knobs}


def timed_step(entry: dict, device: Any) -> tuple[float, float, float]:
    """(wall s, process CPU s, loss) of one step under the entry's thread setting."""
    import torch

    threads = entry["knobs"].get("threads")
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = entry["step"]()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0, loss
    finally:
        torch.set_num_threads(saved)


def module_table(entry: dict, device: Any, repeats: int = 1) -> list[dict]:
    """Seconds of forward + backward per module, each timed on its own captured inputs.

    One real forward records the inputs of the encoder stages, the decoder blocks, the text
    tower, the interactor and the heads (a module called twice, e.g. ``swinViT`` on corrupted
    and clean crops, is timed for each call); the objective is timed on the step's outputs and
    AdamW on the step's gradients. The sum is close to, not exactly, the step: the autograd
    bookkeeping between modules is not in any row.
    """
    import torch

    model, objective = entry["model"], entry["objective"]
    s = model.vision.swin
    named = {"swinViT.patch_embed": s.swinViT.patch_embed,
             **{f"swinViT.layers{i}": getattr(s.swinViT, f"layers{i}")[0] for i in range(1, 5)},
             **{n: getattr(s, n) for n in ("encoder1", "encoder2", "encoder3", "encoder4",
                                           "encoder10", "decoder5", "decoder4", "decoder3",
                                           "decoder2", "decoder1", "out")},
             "text tower": model.text.model, "interactor": model.interactor,
             "proj_v": model.proj_v, "proj_x": model.proj_x, "proj_t": model.proj_t}
    calls: list[tuple[str, Any, tuple, dict]] = []
    hooks = []
    for name, mod in named.items():
        def hook(m: Any, a: tuple, kw: dict, name: str = name) -> None:
            calls.append((name, m, a, kw))
        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = model(**entry["batch"])
    finally:
        for h in hooks:
            h.remove()

    def tensors(x: Any) -> list:
        if torch.is_tensor(x):
            return [x] if x.is_floating_point() else []
        if isinstance(x, dict) or hasattr(x, "values"):
            return [t for v in x.values() for t in tensors(v)]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in tensors(v)]
        return []

    def prep(x: Any) -> Any:
        if torch.is_tensor(x):
            return x.detach().clone().requires_grad_(x.is_floating_point())
        if isinstance(x, (list, tuple)):
            return type(x)(prep(v) for v in x)
        return x

    def time_call(fn: Any) -> tuple[float, float]:
        fwd = bwd = 0.0
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            res = fn()
            sync(device)
            t1 = time.perf_counter()
            outs = [t for t in tensors(res) if t.requires_grad]
            if outs:
                torch.autograd.backward([t.float().sum() for t in outs])
            sync(device)
            fwd += t1 - t0
            bwd += time.perf_counter() - t1
        return fwd / repeats, bwd / repeats

    rows: dict[str, dict] = {}
    for name, mod, a, kw in calls:
        a2, kw2 = prep(a), {k: prep(v) for k, v in kw.items()}
        fwd, bwd = time_call(lambda mod=mod, a2=a2, kw2=kw2: mod(*a2, **kw2))
        row = rows.setdefault(name, {"module": name, "calls": 0, "fwd_s": 0.0, "bwd_s": 0.0})
        row["calls"] += 1
        row["fwd_s"] += fwd
        row["bwd_s"] += bwd
    detached = {k: prep(v) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in out.items()}
    fwd, bwd = time_call(lambda: objective(**detached)["loss"])
    rows["objective (TCL + TIR + align)"] = {"module": "objective (TCL + TIR + align)", "calls": 1,
                                             "fwd_s": fwd, "bwd_s": bwd}
    model.zero_grad(set_to_none=True)
    objective(**model(**entry["batch"]))["loss"].backward()
    opt = entry["optimizer"]
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    rows["AdamW step"] = {"module": "AdamW step", "calls": 1, "fwd_s": time.perf_counter() - t0,
                          "bwd_s": 0.0}
    opt.zero_grad(set_to_none=True)
    return list(rows.values())
