"""Benchmark one T3D training step against a plain MONAI SwinUNETR step (same run, same sizes).

For each preset and gradient-checkpointing setting, times forward+backward of
``T3DModel(**batch)`` (with TIR restoration) and of ``SwinUNETR`` (same feature_size, window_size,
crop) with an L1 restoration loss; reports time per crop, peak step memory, FLOPs
(``torch.utils.flop_counter.FlopCounterMode``), achieved FLOP/s and the T3D / plain ratio.
Plain and T3D steps alternate (ABAB...) so the ratio survives load changes on a shared machine.
Peak memory is the growth above the pre-step level during a step (activations + gradients):
``torch.cuda.max_memory_allocated`` on GPU, RSS sampled every 2 ms from /proc on CPU.

    uv run python tools/bench_models.py --presets t3d-tiny-cpu --crops-per-step 2 --repeats 3
    uv run python tools/bench_models.py --device cuda --bf16 --presets t3d-tiny-cpu t3d-base \
        --text-model minilm --crops-per-step 8 --repeats 10 --json bench.json

With ``--variants`` it instead times the *full* T3D pre-training step (model, ``T3DObjective``,
backward, gradient clipping, AdamW) of one preset under each variant, the first being the
baseline, in one process and interleaved (A B C A B C ...), and reports medians of wall and
process CPU seconds and each variant's speed-up over the baseline; every variant starts from
the same weights. A variant is comma-separated knobs: ``eager`` (nothing), ``sdpa``
(``vision.attention``), ``channels_last`` (``vision.channels_last``), ``fused`` (AdamW),
``compile`` (``torch.compile``, its compilation time reported apart), ``threads=N``.
``--profile`` adds a per-module table of the baseline step (each module's forward + backward
timed on its own inputs, captured from a real step).

    uv run python tools/bench_models.py --presets t3d-tiny-cpu --crops-per-step 8 \
        --variants eager sdpa channels_last sdpa,channels_last,fused --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from t3d_train.speed import REPORT  # noqa: E402  (after the offline environment)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["t3d-tiny-cpu"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around forward + loss")
    p.add_argument("--crops-per-step", type=int, default=2, help="N crops per step")
    p.add_argument("--crops-per-study", type=int, default=2, help="K; studies B = ceil(N / K)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--checkpointing", choices=["both", "off", "on"], default="both")
    p.add_argument("--text-model", default=None,
                   help="override the preset's text model (e.g. 'minilm' where RadBERT is absent)")
    p.add_argument("--random-text-weights", action="store_true",
                   help="build the text model from its config only (timing is weight-independent;"
                        " lets a folder with config + tokenizer but no weights stand in)")
    p.add_argument("--report-words", type=int, default=200, help="words per synthetic report")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU; default: torch's choice)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--variants", nargs="+", default=None, metavar="KNOB[,KNOB...]",
                   help="full-step variants to compare (first = baseline): eager, sdpa, "
                        "channels_last, fused, compile, threads=N")
    p.add_argument("--profile", action="store_true",
                   help="with --variants: per-module forward+backward table of the baseline")
    return p.parse_args(argv)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RSSPeak:
    """Peak resident set size (MiB) during a block, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * self.page / 2**20
        except OSError:  # not Linux: fall back to the (monotonic) high-water mark
            scale = 1 / 1024 if platform.system() == "Linux" else 1 / 2**20
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def __enter__(self) -> _RSSPeak:
        import threading

        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _config(preset: str, checkpointing: bool, text_model: str | None,
            random_text: bool = False) -> Any:
    import t3d_models

    config = t3d_models.T3DModelConfig.from_preset(preset)
    vision = config.vision.model_copy(update={"use_checkpoint": checkpointing})
    text = config.text
    if text_model:
        text = text.model_copy(update={"model_name_or_path": text_model})
    if random_text:
        text = text.model_copy(update={"pretrained": False})
    return config.model_copy(update={"vision": vision, "text": text})


def _make_step(kind: str, config: Any, args: argparse.Namespace, device: Any) -> dict:
    """Build one model and its inputs; return {"step": callable, "model": ..., ...}."""
    import t3d_models
    import torch

    torch.manual_seed(0)
    n, k = args.crops_per_step, args.crops_per_study
    b = -(-n // k)
    size = tuple(config.vision.crop_size)
    crops = torch.rand(n, 1, *size, device=device)
    corrupted = crops.clone()
    corrupted[:, :, : size[0] // 4] = torch.rand_like(corrupted[:, :, : size[0] // 4])
    text_used = None
    if kind == "t3d":
        model = t3d_models.T3DModel(config).to(device).train()
        text_used = model.text.name_or_path + (" (random weights)" if args.random_text_weights
                                               else "")
        words = (REPORT * (args.report_words // len(REPORT.split()) + 1)).split()
        reports = [" ".join(words[i : i + args.report_words]) for i in range(b)]
        tok = {k_: v.to(device) for k_, v in model.tokenize(reports).items()}
        batch = {
            "crops": crops,
            "study_index": torch.arange(n, device=device) // k,
            "group": torch.arange(b, device=device),
            "corrupted": corrupted,
            **tok,
        }

        def loss_fn() -> torch.Tensor:
            out = model(**batch)
            tir = (out["restored"].float() - out["target"]).abs().mean()
            emb = sum(out[key].float().pow(2).mean() for key in
                      ("visual_emb", "text_informed_emb", "volume_emb", "text_emb"))
            return tir + 1e-3 * emb
    else:
        from monai.networks.nets import SwinUNETR

        model = SwinUNETR(out_channels=1, use_checkpoint=config.vision.use_checkpoint,
                          **t3d_models.swinunetr_kwargs(config)).to(device).train()

        def loss_fn() -> torch.Tensor:
            return (model(corrupted).float() - crops).abs().mean()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
               else contextlib.nullcontext())
        with ctx:
            loss = loss_fn()
        loss.backward()

    return {"step": step, "model": model, "text_model": text_used, "crops": n, "studies": b,
            "crop_size": list(size)}


def _measure(entry: dict, device: Any) -> tuple[float, float]:
    """Time one step and its peak memory growth (MiB)."""
    import torch

    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        entry["step"]()
        _sync(device)
        dt = time.perf_counter() - t0
        return dt, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _RSSPeak() as rss:
        t0 = time.perf_counter()
        entry["step"]()
        dt = time.perf_counter() - t0
    return dt, rss.growth


def run_preset(preset: str, checkpointing: bool, args: argparse.Namespace) -> list[dict]:
    """Benchmark plain SwinUNETR vs T3D for one preset/checkpointing setting."""
    import torch

    device = torch.device(args.device)
    config = _config(preset, checkpointing, args.text_model, args.random_text_weights)
    entries = {kind: _make_step(kind, config, args, device) for kind in ("plain", "t3d")}
    for kind, e in entries.items():
        for _ in range(args.warmup):
            e["step"]()
        e["flops"] = None
        if not args.no_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                e["step"]()
            e["flops"] = int(counter.get_total_flops())
        e["times"], e["mems"] = [], []
        print(f"[{preset} ckpt={checkpointing}] {kind} ready", file=sys.stderr, flush=True)
    for _ in range(args.repeats):  # interleaved: plain, t3d, plain, t3d, ...
        for e in entries.values():
            dt, mem = _measure(e, device)
            e["times"].append(dt)
            e["mems"].append(mem)
    rows = []
    for kind, e in entries.items():
        step_s = statistics.median(e["times"])
        rows.append({
            "preset": preset, "model": kind, "checkpointing": checkpointing,
            "device": args.device, "bf16": args.bf16, "crops": e["crops"],
            "studies": e["studies"], "crop_size": e["crop_size"],
            "feature_size": config.vision.feature_size,
            "window_size": config.vision.window_size,
            "text_model": e["text_model"],
            "params": sum(p.numel() for p in e["model"].parameters()),
            "step_s": step_s, "step_s_all": e["times"], "s_per_crop": step_s / e["crops"],
            "peak_mem_mib": max(e["mems"]),
            "peak_mem_kind": "cuda max_memory_allocated growth per step" if device.type == "cuda"
            else "RSS growth per step (sampled)",
            "flops_per_step": e["flops"],
            "achieved_flops_per_s": e["flops"] / step_s if e["flops"] else None,
            "threads": torch.get_num_threads(),
        })
    rows[1]["ratio"] = rows[1]["step_s"] / rows[0]["step_s"]
    del entries
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict]) -> str:
    head = ("| preset | model | ckpt | crops | step s | s/crop | peak MiB | GFLOP/step "
            "| GFLOP/s | T3D/plain |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['model']} | {r['checkpointing']} | "
                         f"FAILED: {r['error']} |||||||")
            continue
        gf = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "-"
        gfs = f"{r['achieved_flops_per_s'] / 1e9:.1f}" if r["achieved_flops_per_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else ""
        lines.append(
            f"| {r['preset']} | {r['model']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['crops']} | {r['step_s']:.3f} | {r['s_per_crop']:.3f} | "
            f"{r['peak_mem_mib']:.0f} | {gf} | {gfs} | {ratio} |"
        )
    return "\n".join(lines)


def run_variants(preset: str, args: argparse.Namespace) -> dict:
    """Full-step variants of one preset, interleaved; medians and speed-ups vs the first."""
    import torch
    from t3d_train.speed import build_full_step, module_table, parse_variant, timed_step

    device = torch.device(args.device)
    config = _config(preset, args.checkpointing == "on", args.text_model, args.random_text_weights)
    variants = [(v, parse_variant(v)) for v in args.variants]
    entries, state = [], None
    for name, knobs in variants:
        t0 = time.perf_counter()
        e = build_full_step(config, knobs, state, device, crops=args.crops_per_step,
                            crops_per_study=args.crops_per_study, report_words=args.report_words,
                            bf16=args.bf16)
        state = state or {k: v.clone() for k, v in e["model"].state_dict().items()}
        e["name"], e["times"], e["cpu"], e["losses"] = name, [], [], []
        first = timed_step(e, device)
        e["first_step_s"] = first[0]
        e["setup_s"] = time.perf_counter() - t0
        for _ in range(max(args.warmup - 1, 0)):
            timed_step(e, device)
        entries.append(e)
        print(f"[{preset}] variant {name} ready (first step {first[0]:.1f} s)", file=sys.stderr,
              flush=True)
    for _ in range(args.repeats):
        for e in entries:
            dt, cpu, loss = timed_step(e, device)
            e["times"].append(dt)
            e["cpu"].append(cpu)
            e["losses"].append(loss)
    base = entries[0]
    rows = []
    for e in entries:
        wall, cpu = statistics.median(e["times"]), statistics.median(e["cpu"])
        rows.append({"variant": e["name"], "knobs": e["knobs"], "crops": args.crops_per_step,
                     "step_s": wall, "step_s_all": e["times"], "cpu_s": cpu, "cpu_s_all": e["cpu"],
                     "s_per_crop": wall / args.crops_per_step,
                     "speedup": statistics.median(base["times"]) / wall,
                     "cpu_speedup": statistics.median(base["cpu"]) / cpu,
                     "first_step_s": e["first_step_s"], "losses": e["losses"]})
    result = {"preset": preset, "rows": rows}
    if args.profile:
        result["modules"] = module_table(entries[0], device)
    return result


def _variant_table(res: dict) -> str:
    lines = ["| variant | crops | step s | s/crop | CPU s | speed-up (wall) | speed-up (CPU) "
             "| first step s |", "|" + "---|" * 8]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['crops']} | {r['step_s']:.2f} | {r['s_per_crop']:.3f} "
                     f"| {r['cpu_s']:.2f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x "
                     f"| {r['first_step_s']:.1f} |")
    if "modules" in res:
        total = sum(m["fwd_s"] + m["bwd_s"] for m in res["modules"])
        lines += ["", f"Per module, baseline variant ({res['rows'][0]['variant']}), seconds per step:",
                  "", "| module | calls | forward s | backward s | total s | share |",
                  "|---|---|---|---|---|---|"]
        for m in sorted(res["modules"], key=lambda m: -(m["fwd_s"] + m["bwd_s"])):
            t = m["fwd_s"] + m["bwd_s"]
            lines.append(f"| {m['module']} | {m['calls']} | {m['fwd_s']:.3f} | {m['bwd_s']:.3f} "
                         f"| {t:.3f} | {100 * t / total:.1f} % |")
        lines.append(f"| sum | | | | {total:.3f} | 100 % |")
    return "\n".join(lines)


def main_variants(args: argparse.Namespace) -> int:
    import torch

    results = [run_variants(p, args) for p in args.presets]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for res in results:
        print(f"## {res['preset']}: full T3D step, {args.crops_per_step} crops, "
              f"{torch.get_num_threads()} threads, load average {load}")
        print(_variant_table(res))
    if args.json:
        meta = {"command": "python tools/bench_models.py " + " ".join(sys.argv[1:]),
                "torch": torch.__version__, "device": args.device, "load_average": load,
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "variants": results}, fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.variants:
        return main_variants(args)
    ckpts = {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]
    rows: list[dict] = []
    for preset in args.presets:
        for ckpt in ckpts:
            t0 = time.perf_counter()
            try:
                new = run_preset(preset, ckpt, args)
            except Exception as err:  # report and go on with the other presets
                msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                print(f"[{preset} ckpt={ckpt}] FAILED: {msg}", file=sys.stderr, flush=True)
                new = [{"preset": preset, "model": m, "checkpointing": ckpt, "error": msg}
                       for m in ("plain", "t3d")]
            else:
                print(f"[{preset} ckpt={ckpt}] done in {time.perf_counter() - t0:.0f} s; "
                      f"text model: {new[1]['text_model']}", file=sys.stderr, flush=True)
            rows.extend(new)
    meta = {
        "command": "python tools/bench_models.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "bf16": args.bf16,
        "crops_per_step": args.crops_per_step,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    print(_table(rows))
    text_models = sorted({r["text_model"] for r in rows if r.get("text_model")})
    print(f"text model(s) used: {', '.join(text_models) or '-'}")
    for r in rows:
        if r.get("ratio"):
            verdict = "OK" if r["ratio"] <= 1.25 else "ABOVE TARGET"
            print(f"{r['preset']} ckpt={'on' if r['checkpointing'] else 'off'}: "
                  f"T3D/plain = {r['ratio']:.2f} (target <= 1.25: {verdict})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
