"""Multi-label finding classification from a T3D encoder: linear probe or full fine-tune.

The library side of ``tools/finetune_cls.py`` (and of the benchmark's linear probe). Heavy
imports happen inside the functions.
"""

from __future__ import annotations

from typing import Any

from t3d_train.config import ConfigError
from t3d_train.eval_common import baseline_sentence, check_inputs, load_model, set_threads, subset
from t3d_train.eval_config import ClassifyConfig
from t3d_train.preprocessing import resolve_crop_size, resolve_preprocessing


def volume_features(model: Any, dataset: Any, indices: list[int], cfg: ClassifyConfig,
                    crop_size: tuple[int, int, int], features: Any, device: Any,
                    progress: bool = False, desc: str = "features") -> tuple[Any, Any]:
    """``(features (M, C), labels (M, F))`` of ``indices``: ``t3d_eval.embed_volumes`` with
    ``cfg.embedding`` and ``features`` (a kind, e.g. ``cfg.features``, or a fine-tuned
    classifier: the mean logit per study)."""
    import t3d_eval as ev

    e = cfg.embedding
    out = ev.embed_volumes(model, dataset, indices, crop_size=crop_size, mode=e.mode,
                           overlap=e.overlap, num_crops=e.num_crops, seed=cfg.runtime.seed,
                           batch_size=e.batch_size, features=features, device=device,
                           progress=progress, desc=desc)
    return out["volume_emb"], out["labels"]


def random_crop_batches(dataset: Any, indices: list[int], crop_size: tuple[int, int, int],
                        per_study: int, batch_size: int, seed: int,
                        progress: bool = False) -> list[tuple[Any, Any]]:
    """``(crops, labels)`` batches: ``per_study`` random crops of each study with its labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in tqdm(indices, desc="crops train", unit="study", disable=not progress):
        s = dataset[i]
        vol = s["image"]
        need = [max(0, c - d) for c, d in zip(crop_size, vol.shape[1:], strict=True)]
        vol = F.pad(vol, (0, need[2], 0, need[1], 0, need[0]))
        for _ in range(per_study):
            x, y, z = (int(rng.integers(0, d - c + 1)) for d, c in
                       zip(vol.shape[1:], crop_size, strict=True))
            crops.append(vol[:, x : x + crop_size[0], y : y + crop_size[1], z : z + crop_size[2]])
            labels.append(s["labels"])
    order = rng.permutation(len(crops))
    return [(torch.stack([crops[j] for j in order[k : k + batch_size]]),
             torch.stack([labels[j] for j in order[k : k + batch_size]]))
            for k in range(0, len(order), batch_size)]


def classify(cfg: ClassifyConfig, model: Any = None, write: bool = True,
             per_study: bool = False, progress: bool = False) -> dict[str, Any]:
    """Linear probe (or full fine-tune) AUC; ``model`` (a T3DModel) skips loading ``cfg.model``.

    ``per_study=True`` adds ``"per_study": {"study_ids", "probs", "labels", "untrainable"}``:
    the test probabilities ``(M, F)`` and labels (NaN = unknown) in test-study order, and the
    findings left out for a single class in the training labels (e.g. for a bootstrap).
    ``progress=True`` shows tqdm bars (features / crops / fine-tuning) on stderr.
    """
    check_inputs(cfg)  # before torch / transformers are imported
    import t3d_eval as ev
    import torch
    from t3d_data import VolumeDataset

    set_threads(cfg.runtime.threads)
    if model is None:
        model = load_model(cfg.model, cfg.runtime.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    crop_size = resolve_crop_size(cfg.embedding.crop_size, model.config)
    prep = resolve_preprocessing(cfg.model, model.config)  # the window the model was trained on
    train = VolumeDataset(cfg.store, split=cfg.train_split, hu_window=prep.hu_window)
    test = VolumeDataset(cfg.store, split=cfg.test_split, hu_window=prep.hu_window)
    tr_idx, te_idx = subset(train, cfg.max_train), subset(test, cfg.max_test)
    if not tr_idx or not te_idx:
        raise ConfigError(f"train split {cfg.train_split!r} has {len(tr_idx)} studies and test split "
                          f"{cfg.test_split!r} {len(te_idx)}; both need at least one")
    names = list(train.finding_names)
    results: dict[str, Any] = {"train_studies": len(tr_idx), "test_studies": len(te_idx)}
    if not cfg.full:
        xtr, ytr = volume_features(model, train, tr_idx, cfg, crop_size, cfg.features, device,
                                   progress, f"features {cfg.train_split}")
        xte, yte = volume_features(model, test, te_idx, cfg, crop_size, cfg.features, device,
                                   progress, f"features {cfg.test_split}")
        probs, untrainable = ev.linear_probe_scores(xtr, ytr, xte, names, C=cfg.probe.C,
                                                    max_iter=cfg.probe.max_iter,
                                                    seed=cfg.runtime.seed)
        results["linear_probe_auc"] = ev.multilabel_auc(torch.from_numpy(probs), yte, names,
                                                        skip=untrainable)
    else:
        ft = cfg.finetune
        batches = random_crop_batches(train, tr_idx, crop_size, ft.crops_per_study,
                                      ft.batch_size, cfg.runtime.seed, progress)
        encoder = ev.CropFeatures(model, cfg.features)
        clf, losses = ev.finetune_classifier(encoder, encoder.dim, len(names), batches,
                                             epochs=ft.epochs, lr=ft.lr, head_lr=ft.head_lr,
                                             seed=cfg.runtime.seed, device=device,
                                             progress=progress)
        logits, yte = volume_features(clf, test, te_idx, cfg, crop_size, clf, device, progress,
                                      f"score {cfg.test_split}")  # mean logit per study
        probs, untrainable = torch.sigmoid(logits).numpy(), []
        results["finetune_auc"] = ev.multilabel_auc(probs, yte, names)
        results["finetune_final_loss"] = losses[-1]
    if per_study:
        results["per_study"] = {"study_ids": [test.store.records[test.indices[i]].study_id
                                              for i in te_idx],
                                "probs": probs.tolist(), "labels": yte.tolist(),
                                "untrainable": untrainable}
    results["preprocessing"] = {**model.config.preprocessing_record(),
                                **prep.model_dump(mode="json")}
    results["config"] = {"checkpoint": str(cfg.model.checkpoint), "store": str(cfg.store),
                         "features": cfg.features, "full": cfg.full}
    if write:
        json_path, md_path = ev.write_results(results, cfg.out, cfg.name)
        print(f"wrote {json_path} and {md_path}")
    return results


def summary(cfg: ClassifyConfig, results: dict[str, Any]) -> str:
    """One paragraph: the macro and per-finding AUC next to chance (0.5) and the baseline."""
    key = "finetune_auc" if cfg.full else "linear_probe_auc"
    auc = results[key]

    def fmt(x: Any) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    names = [n for n in auc if n not in ("macro", "skipped")]
    how = (f"Full fine-tune ({cfg.finetune.epochs} epochs, final loss "
           f"{results['finetune_final_loss']:.4f})" if cfg.full
           else f"Linear probe on frozen {cfg.features} features")
    text = (f"{how}: macro AUC {fmt(auc['macro'])} (chance 0.5) over "
            f"{len(names) - len(auc.get('skipped', []))} findings on {results['test_studies']} "
            f"test studies, trained on {results['train_studies']}; per finding: "
            + ", ".join(f"{n} {fmt(auc[n])}" for n in names) + ".")
    if auc.get("skipped"):
        text += f" No AUC (one class only): {', '.join(auc['skipped'])}."
    return text + baseline_sentence(cfg.model)
