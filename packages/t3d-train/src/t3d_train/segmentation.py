"""Segmentation fine-tuning: MONAI SwinUNETR from a T3D checkpoint (or from scratch), Dice per class.

The library side of ``tools/finetune_seg.py`` (and of the benchmark's Dice). Heavy imports
happen inside the functions.

Multi-channel stores (e.g. BraTS, 4 MRI sequences, ``--dataset brats``): the network gets as
many input channels as the store's studies have; a 1-channel T3D checkpoint's input kernels
are adapted (``channel_adapt``, :func:`t3d_models.adapt_input_channels`), the from-scratch arm
is built with the same channels, and volumes are normalised with the intensity policy the
fine-tune records (``zscore_foreground`` for MRI, see :mod:`t3d_train.preprocessing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t3d_train.config import ConfigError
from t3d_train.eval_common import check_inputs, model_config, set_threads, store_tasks
from t3d_train.eval_config import SEG_DATASETS, SegmentationConfig
from t3d_train.preprocessing import resolve_crop_size, resolve_preprocessing


def seg_classes(cfg: SegmentationConfig) -> dict[str, list[int]]:
    """``cfg.classes``, or (``null``) the segmentation classes of the store's dataset tasks
    (``t3d_data.tasks``; :class:`ConfigError` when the store has none)."""
    if cfg.classes is not None:
        return dict(cfg.classes)
    try:
        return store_tasks(cfg.store, cfg.tasks, "segmentation").classes()
    except ConfigError as err:
        raise ConfigError(f"classes: {err}; or give them: --set 'classes={{NAME: [VALUE, ...]}}'"
                          ) from None


def label_lookup(classes: dict[str, list[int]]):
    """A lookup table: label value → class index (1..K; unlisted values → 0)."""
    import torch

    top = max(v for values in classes.values() for v in values)
    lut = torch.zeros(max(top + 1, 256), dtype=torch.long)
    for k, values in enumerate(classes.values(), start=1):
        lut[torch.tensor(values)] = k
    return lut


def labelled_studies(store: Path, split: str, lut: Any, limit: int | None = None,
                     progress: bool = False,
                     hu_window: tuple[float, float] = (-1000.0, 1000.0),
                     intensity: str = "hu_window_linear") -> list[dict]:
    """``{"image", "label", "study_id"}`` of the studies of ``split`` that have a mask
    (``image`` ``(C, X, Y, Z)`` under the ``intensity`` policy)."""
    from t3d_data import VolumeDataset
    from tqdm.auto import tqdm

    ds = VolumeDataset(store, split=split, hu_window=hu_window, intensity=intensity)
    out = []
    for i in tqdm(range(len(ds)), desc=f"load {split}", unit="study", disable=not progress):
        if not ds.store.records[ds.indices[i]].has_mask:
            continue
        s = ds[i]
        out.append({"image": s["image"], "label": lut[s["mask"].clamp(0, len(lut) - 1)],
                    "study_id": s["study_id"]})
        if limit is not None and len(out) >= limit:
            break
    return out


def build_network(cfg: SegmentationConfig, num_classes: int, source: Any = None,
                  in_channels: int | None = None):
    """SwinUNETR from ``source`` (a T3DModel) / ``cfg.model.checkpoint``, or from scratch;
    ``in_channels`` (default: the checkpoint's) adapts the input kernels (``cfg.channel_adapt``)."""
    import torch
    from monai.networks.nets import SwinUNETR
    from t3d_models import build_monai_swinunetr, swinunetr_kwargs

    torch.manual_seed(cfg.runtime.seed)
    config = source.config if source is not None else model_config(cfg.model)
    if cfg.scratch:
        kwargs = swinunetr_kwargs(config)
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        return SwinUNETR(out_channels=num_classes, **kwargs), config
    src = source if source is not None else cfg.model.checkpoint
    return build_monai_swinunetr(src, out_channels=num_classes, in_channels=in_channels,
                                 channel_adapt=cfg.channel_adapt), config


def store_channels(cfg: SegmentationConfig) -> tuple[int, str]:
    """``(channels, modality)`` of the store's studies in the train and test splits.

    Raises:
        ConfigError: the studies differ in channels or modality, or the store is not of the
            modality of ``cfg.dataset``'s preset.
    """
    from t3d_data import VolumeStore

    store = VolumeStore(cfg.store)
    kinds = {(r.n_channels, r.modality) for r in store.records
             if r.split in (cfg.train_split, cfg.test_split)}
    if len(kinds) > 1:
        raise ConfigError(f"store: {cfg.store} mixes studies of different channels/modalities "
                          f"{sorted(kinds)} in splits {cfg.train_split!r}/{cfg.test_split!r}; "
                          "prepare one store per kind of image")
    channels, modality = kinds.pop() if kinds else (1, "CT")
    want = SEG_DATASETS[cfg.dataset]["modality"] if cfg.dataset is not None else None
    if want is not None and modality != want:
        raise ConfigError(f"dataset: {cfg.dataset} expects {want} studies but {cfg.store} holds "
                          f"{modality} ({channels} channel(s)); prepare the manifest of "
                          f"`t3d-data import {cfg.dataset} ROOT -o MANIFEST`")
    return channels, modality


def segment(cfg: SegmentationConfig, source: Any = None, write: bool = True,
            per_study: bool = False, progress: bool = False) -> dict[str, Any]:
    """Fine-tune and evaluate; ``source`` (a T3DModel) replaces ``cfg.model.checkpoint``.

    ``per_study=True`` adds ``"per_study": {"study_ids", "dice"}``: each test study's Dice per
    class (NaN where the class is absent from its label), e.g. for a bootstrap.
    ``progress=True`` shows tqdm bars (loading, fine-tuning, testing, overlays) on stderr.
    """
    check_inputs(cfg)  # before torch / monai are imported
    classes = seg_classes(cfg)
    import t3d_eval as ev
    import torch
    from t3d_data.names import safe_filename, safe_join
    from t3d_eval.segmentation import AIR_THRESHOLD
    from tqdm.auto import tqdm

    set_threads(cfg.runtime.threads)
    lut = label_lookup(classes)
    num_classes = len(classes) + 1
    # the window the encoder was pre-trained on (scratch: the preset's default record); a
    # fine-tune may set a new intensity policy (MRI: zscore_foreground), which it records
    record = source.config if source is not None else model_config(cfg.model)
    channels, modality = store_channels(cfg)
    prep = resolve_preprocessing(cfg.model, record, modality=modality, finetune=True)
    train = labelled_studies(cfg.store, cfg.train_split, lut, progress=progress,
                             hu_window=prep.hu_window, intensity=prep.intensity)
    test = labelled_studies(cfg.store, cfg.test_split, lut, cfg.max_test, progress=progress,
                            hu_window=prep.hu_window, intensity=prep.intensity)
    if not train or not test:
        raise ConfigError(f"{len(train)} labelled studies in split {cfg.train_split!r} and "
                          f"{len(test)} in {cfg.test_split!r}; both need masks")
    net, config = build_network(cfg, num_classes, source, in_channels=channels)
    roi = resolve_crop_size(cfg.roi_size, config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    losses = ev.finetune_segmentation(net, train, roi, num_classes, steps=cfg.steps, lr=cfg.lr,
                                      label_fraction=cfg.label_fraction, seed=cfg.runtime.seed,
                                      batch_size=cfg.batch_size,
                                      samples_per_volume=cfg.samples_per_volume, device=device,
                                      progress=progress)
    names = list(classes)
    dice = ev.evaluate_segmentation(net, test, roi, num_classes, class_names=names,
                                    sw_batch_size=cfg.sw_batch_size, overlap=cfg.overlap,
                                    device=device, per_study=per_study, progress=progress)
    rows = dice.pop("per_study", None)
    results: dict[str, Any] = {
        "dice": dice,
        "train_studies_used": len(ev.label_fraction_subset(train, cfg.label_fraction,
                                                           cfg.runtime.seed)),
        "train_studies_labelled": len(train),
        "test_studies": len(test),
        "steps": cfg.steps,
        "label_fraction": cfg.label_fraction,
        "final_loss": losses[-1],
        "init": cfg.init,
        "preprocessing": {**record.preprocessing_record(), **prep.model_dump(mode="json")},
        "in_channels": channels,
        "modality": modality,
        "config": {"checkpoint": str(cfg.model.checkpoint), "store": str(cfg.store),
                   "seed": cfg.runtime.seed, "classes": classes, "dataset": cfg.dataset},
    }
    if channels != config.vision.in_channels and not cfg.scratch:
        results["channel_adapt"] = {"mode": cfg.channel_adapt,
                                    "from_channels": config.vision.in_channels}
    if per_study:
        results["per_study"] = {"study_ids": [s["study_id"] for s in test], "dice": rows}
    overlays = []
    if write:
        folder = Path(cfg.out) / "overlays"
        for s in tqdm(test[: cfg.overlays], desc="overlays", unit="png", disable=not progress):
            pred = ev.predict_segmentation(net, s["image"], roi, sw_batch_size=cfg.sw_batch_size,
                                           overlap=cfg.overlap, device=device)
            # study ids are user data: one safe, distinct file name each (t3d_data.names)
            path = safe_join(folder, f"{cfg.stem}_{safe_filename(str(s['study_id']))}.png")
            # MRI: z-scored brain voxels may be negative; background is exactly 0, not air
            air = None if prep.intensity == "zscore_foreground" else AIR_THRESHOLD
            overlays.append(ev.save_overlays(s["image"], s["label"], pred, path,
                                             class_names=names, air_threshold=air))
        results["overlays"] = [str(p) for p in overlays]
        json_path, md_path = ev.write_results(results, cfg.out, cfg.stem)
        print(f"wrote {json_path} and {md_path}")
    return results


def baseline_results(cfg: SegmentationConfig, results: dict[str, Any]) -> tuple[Path, dict] | None:
    """The other arm's results in ``cfg.out`` with the same budget, store and seed, if any."""
    import json

    other = "t3d" if results["init"] == "scratch" else "scratch"
    same = ("steps", "label_fraction", "test_studies", "train_studies_used")
    found = []
    for path in Path(cfg.out).glob("*.json"):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(res, dict) and res.get("init") == other
                and all(res.get(k) == results[k] for k in same)
                and res.get("config", {}).get("store") == results["config"]["store"]
                and res.get("config", {}).get("seed") == results["config"]["seed"]):
            found.append((path.stat().st_mtime, path, res))
    return max(found, key=lambda f: f[0])[1:] if found else None


def other_arm_command(cfg: SegmentationConfig, argv: list[str]) -> str:
    """This command line with ``--scratch`` added (T3D arm) or removed (scratch arm)."""
    import shlex

    args = list(argv)
    if cfg.scratch:
        drop = {i for i, a in enumerate(args) if a == "--scratch"}
        drop |= {i for i, a in enumerate(args)
                 if a.replace(" ", "") == "scratch=true" and i and args[i - 1] == "--set"}
        drop |= {i - 1 for i in drop if args[i] != "--scratch"}
        args = [a for i, a in enumerate(args) if i not in drop]
        if cfg.model.checkpoint is None:
            args += ["--checkpoint", "RUN/model"]
    else:
        args.append("--scratch")
    return "python tools/finetune_seg.py " + shlex.join(args)


def summary(cfg: SegmentationConfig, results: dict[str, Any],
            baseline: tuple[Path, dict] | None, command: str | None = None) -> str:
    """One paragraph: this arm's Dice per organ next to the other arm's (or ``command``, the
    command that runs it)."""

    def fmt(x: Any) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    this, that = (("T3D-initialised", "from-scratch") if results["init"] == "t3d"
                  else ("From-scratch", "T3D-initialised"))
    classes = list(seg_classes(cfg))
    dice = results["dice"]
    kind, per = ("organs", "Per organ") if cfg.dataset is None else ("classes", "Per class")
    text = (f"{this} SwinUNETR: mean Dice {fmt(dice['mean'])} over {len(classes)} {kind} on "
            f"{results['test_studies']} test studies, after {results['steps']} steps on "
            f"{results['train_studies_used']} of {results['train_studies_labelled']} labelled "
            f"training studies ({cfg.label_fraction:.0%} labels; final loss "
            f"{results['final_loss']:.4f}). ")
    if baseline is not None:
        path, base = baseline
        bd = base["dice"]
        a, b = dice.get("mean"), bd.get("mean")
        diff = "n/a" if None in (a, b) or a != a or b != b else f"{a - b:+.3f}"
        text += (f"The {that} arm with the same budget ({path}): mean Dice {fmt(b)}; this run "
                 f"minus that one: {diff}. {per}, this run vs the {that} arm: "
                 + ", ".join(f"{c} {fmt(dice.get(c))} vs {fmt(bd.get(c))}" for c in classes)
                 + ".")
    else:
        if command is None:
            flag = " --scratch" if results["init"] == "t3d" else ""
            command = (f"python tools/finetune_seg.py --checkpoint "
                       f"{cfg.model.checkpoint or 'RUN/model'} --store {cfg.store} --out {cfg.out} "
                       f"--fraction {cfg.label_fraction:g} --steps {cfg.steps}{flag}")
        text += (f"{per}: " + ", ".join(f"{c} {fmt(dice.get(c))}" for c in classes) + ". "
                 f"No {that} arm with this budget in {cfg.out} to compare with yet: `{command}` "
                 "runs it, and its summary puts the two side by side (predicting background "
                 "everywhere scores Dice 0).")
    return text
