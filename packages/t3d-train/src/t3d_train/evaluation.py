"""Retrieval, report-twin accuracy and zero-shot AUC of a T3D encoder on one split.

The library side of ``tools/evaluate.py`` (and of the benchmark's scoring): each volume is
embedded as the mean of its crop embeddings (sliding window or random crops), studies are split
over processes and gathered with ``t3d_eval.gather_embeddings``. Heavy imports happen inside the
functions, so a config error is reported before torch is imported.
"""

from __future__ import annotations

from typing import Any

from t3d_train.config import ConfigError
from t3d_train.eval_common import (
    check_inputs,
    find_sidecar,
    load_model,
    read_sidecar,
    set_threads,
    subset,
)
from t3d_train.eval_config import EvaluateConfig
from t3d_train.preprocessing import resolve_crop_size, resolve_preprocessing


def twin_reports(study_ids: list[str], sidecar: dict[str, dict[str, Any]], per_study: int,
                 seed: int) -> tuple[list[int], list[str], list[str]]:
    """Counterfactual reports: ``(row of the study, twin text, changed attribute)`` per twin."""
    import numpy as np
    from t3d_data.phantom import render_report, twin_findings

    rows, texts, attrs = [], [], []
    for row, sid in enumerate(study_ids):
        rec = sidecar.get(sid)
        if rec is None:
            continue
        rng = np.random.default_rng([seed, row, 17])
        for _ in range(per_study):
            twin, change = twin_findings(rec["findings"], rng)
            texts.append(render_report(twin, seed=rec["report_seed"], reserved=rec["reserved"]))
            rows.append(row)
            attrs.append("size" if change["attribute"] == "size_mm" else change["attribute"])
    return rows, texts, attrs


def embed_split(model: Any, dataset: Any, indices: list[int], cfg: EvaluateConfig,
                accelerator: Any, crop_size: tuple[int, int, int],
                progress: bool = False) -> dict[str, Any]:
    """Volume embeddings, labels and dataset indices of ``indices``, gathered over processes."""
    import numpy as np
    import t3d_eval as ev
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    enc = ev.crop_encoder(model)
    emb_cfg = cfg.embedding
    loader = accelerator.prepare_data_loader(DataLoader(torch.tensor(indices), batch_size=1))
    vols, labels, idx = [], [], []
    show = progress and accelerator.is_main_process
    for batch in tqdm(loader, desc="embed", unit="study", disable=not show):
        i = int(batch[0])
        sample = dataset[i]
        image = sample["image"]
        if emb_cfg.mode == "sliding":
            v = ev.volume_embedding_sliding(enc, image, crop_size, emb_cfg.overlap,
                                            batch_size=emb_cfg.batch_size)
        else:
            rng = np.random.default_rng([cfg.runtime.seed, i])
            v = ev.volume_embedding_from_crops(enc, image, crop_size, emb_cfg.num_crops, rng,
                                               batch_size=emb_cfg.batch_size)
        dev = accelerator.device
        vols.append(ev.gather_embeddings(v[None].to(dev), accelerator=accelerator).cpu())
        labels.append(ev.gather_embeddings(sample["labels"][None].to(dev),
                                           accelerator=accelerator).cpu())
        idx.append(ev.gather_embeddings(batch.to(dev), accelerator=accelerator).cpu())
    return {"volume_emb": torch.cat(vols)[: len(indices)], "labels": torch.cat(labels)[: len(indices)],
            "index": torch.cat(idx)[: len(indices)]}


def evaluate(cfg: EvaluateConfig, model: Any = None, accelerator: Any = None,
             write: bool = True, per_study: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the evaluation; ``model`` (a T3DModel) skips loading ``cfg.model``.

    ``per_study=True`` adds ``"per_study": {"study_ids", "group", "v2r_rank", "r2v_rank"}``
    (report group id and the 1-based rank of each study's best correct answer, as in
    ``retrieval_metrics``), e.g. for a bootstrap over test studies. ``progress=True`` shows a
    tqdm bar of the embedded studies on the main process.
    """
    check_inputs(cfg)  # before torch / transformers are imported
    import t3d_eval as ev
    import torch
    from t3d_data import VolumeDataset
    from t3d_data.phantom import ZERO_SHOT_PROMPTS

    sidecar_path = find_sidecar(cfg.store, cfg.findings)
    set_threads(cfg.runtime.threads)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if model is None:
        model = load_model(cfg.model, cfg.runtime.seed)
    model = model.to(accelerator.device).eval()
    crop_size = resolve_crop_size(cfg.embedding.crop_size, model.config)
    prep = resolve_preprocessing(cfg.model, model.config)  # the window the model was trained on

    dataset = VolumeDataset(cfg.store, split=cfg.split, hu_window=prep.hu_window)
    indices = subset(dataset, cfg.max_studies)
    if len(indices) < 2:
        raise ConfigError(f"split {cfg.split!r} of {cfg.store} has {len(indices)} studies; "
                          "retrieval needs at least 2")
    emb = embed_split(model, dataset, indices, cfg, accelerator, crop_size, progress)
    order = [int(i) for i in emb["index"]]
    records = [dataset.store.records[dataset.indices[i]] for i in order]
    reports = [r.report for r in records]
    study_ids = [r.study_id for r in records]
    text = ev.text_encoder(model)
    report_emb = torch.cat([text(reports[i : i + 32]) for i in range(0, len(reports), 32)])

    results: dict[str, Any] = {
        "studies": len(order),
        "retrieval": ev.retrieval_metrics(emb["volume_emb"], report_emb, groups=reports),
        "chance": {"retrieval": ev.chance_retrieval(reports), "twin_accuracy": 0.5,
                   "zero_shot_auc": 0.5},
    }
    if per_study:
        sim = ev.cosine_similarity_matrix(emb["volume_emb"], report_emb)
        g = ev.group_ids(reports, len(reports))
        relevant = g[:, None] == g[None, :]
        results["per_study"] = {"study_ids": study_ids, "group": g.tolist(),
                                "v2r_rank": ev.retrieval_ranks(sim, relevant).tolist(),
                                "r2v_rank": ev.retrieval_ranks(sim.T, relevant.T).tolist()}
    if sidecar_path is not None and cfg.twins_per_study > 0:
        rows, texts, attrs = twin_reports(study_ids, read_sidecar(sidecar_path),
                                          cfg.twins_per_study, cfg.runtime.seed)
        if rows:
            twin_emb = torch.cat([text(texts[i : i + 32]) for i in range(0, len(texts), 32)])
            r = torch.tensor(rows)
            twins: dict[str, Any] = {
                "all": ev.twin_accuracy(emb["volume_emb"][r], report_emb[r], twin_emb),
                "count": len(rows)}
            counts = {}
            for attr in sorted(set(attrs)):
                sel = torch.tensor([a == attr for a in attrs])
                twins[attr] = ev.twin_accuracy(emb["volume_emb"][r][sel], report_emb[r][sel],
                                               twin_emb[sel])
                counts[attr] = int(sel.sum())
            twins["counts"] = counts
            results["twin_accuracy"] = twins
    names = list(ZERO_SHOT_PROMPTS)
    finding_index = [dataset.finding_names.index(n) for n in names if n in dataset.finding_names]
    names = [n for n in names if n in dataset.finding_names]
    if names:
        prompts = {n: ZERO_SHOT_PROMPTS[n] for n in names}
        scores = ev.zero_shot_scores(emb["volume_emb"], text, prompts,
                                     temperature=cfg.zero_shot_temperature)
        results["zero_shot_auc"] = ev.zero_shot_auc(scores, emb["labels"][:, finding_index], names)
    results["preprocessing"] = {**model.config.preprocessing_record(),
                                **prep.model_dump(mode="json")}
    results["config"] = {"checkpoint": str(cfg.model.checkpoint), "store": str(cfg.store),
                         "split": cfg.split, "embedding": cfg.embedding.mode,
                         "crop_size": list(crop_size), "sidecar": str(sidecar_path),
                         "processes": accelerator.num_processes}
    if write and accelerator.is_main_process:
        json_path, md_path = ev.write_results(results, cfg.out, cfg.name)
        print(f"wrote {json_path} and {md_path}")
    return results


def summary(cfg: EvaluateConfig, results: dict[str, Any]) -> str:
    """One paragraph: every measure next to its chance value, and the baseline to compare with."""
    r, c = results["retrieval"], results["chance"]["retrieval"]

    def pair(key: str, chance: str) -> str:
        return f"{r[key]:.3f} (chance {c[chance]:.3f})"

    text = (f"Retrieval on {results['studies']} '{cfg.split}' studies: volume→report R@1 "
            f"{pair('v2r_recall@1', 'recall@1')}, R@5 {pair('v2r_recall@5', 'recall@5')}, R@10 "
            f"{pair('v2r_recall@10', 'recall@10')}, median rank {r['v2r_median_rank']:g} (chance "
            f"{c['median_rank']:g}); report→volume R@1 {pair('r2v_recall@1', 'recall@1')}, median "
            f"rank {r['r2v_median_rank']:g} (chance {c['median_rank']:g}).")
    twins = results.get("twin_accuracy")
    if twins:
        per = ", ".join(f"{a} {twins[a]:.3f}" for a in twins.get("counts", {}))
        text += (f" Report twins: the true report beats its one-attribute twin in "
                 f"{twins['all']:.3f} of {twins['count']} pairs (chance 0.5; {per}).")
    auc = results.get("zero_shot_auc")
    if auc:
        text += (f" Zero-shot macro AUC {auc['macro']:.3f} (chance 0.5) over "
                 f"{sum(1 for k in auc if k not in ('macro', 'skipped'))} findings.")
    if cfg.model.checkpoint is None:
        text += (f" This is the no-pre-training baseline (random-init {cfg.model.preset} vision "
                 "encoder).")
    else:
        text += (" The no-pre-training baseline is the same command with --set "
                 "model.checkpoint=null.")
    return text
