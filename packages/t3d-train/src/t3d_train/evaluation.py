"""Retrieval, report-twin accuracy and zero-shot AUC of a T3D encoder on one split.

The library side of ``tools/evaluate.py`` (and of the benchmark's scoring): each volume is
embedded as the mean of its crop embeddings (sliding window or random crops) by
``t3d_eval.embed_volumes``, which splits the studies over the accelerator's processes and
gathers them back. Zero-shot prompts and report twins are the store's dataset tasks
(``t3d_data.tasks``). Heavy imports happen inside the functions, so a config error is reported
before torch is imported.
"""

from __future__ import annotations

from typing import Any

from t3d_train.config import ConfigError
from t3d_train.eval_common import (
    baseline_sentence,
    check_inputs,
    load_model,
    set_threads,
    store_tasks,
    subset,
)
from t3d_train.eval_config import EvaluateConfig
from t3d_train.preprocessing import resolve_crop_size, resolve_preprocessing


def why_not(tasks: Any, what: str) -> str:
    """Why a store's provider gives no ``what``: no provider at all, or one without it."""
    if tasks is None:
        return "the store has no dataset tasks; --set tasks=NAME names a provider"
    return f"tasks {tasks.name!r} provide no {what} for it"


def note(accelerator: Any, message: str) -> None:
    """One ``note:`` line on stderr, from the main process only."""
    import sys

    if accelerator.is_main_process:
        print(f"note: {message}", file=sys.stderr)


def evaluate(cfg: EvaluateConfig, model: Any = None, accelerator: Any = None,
             write: bool = True, per_study: bool = False, progress: bool = False,
             prompts: dict[str, dict[str, list[str]]] | None = None) -> dict[str, Any]:
    """Run the evaluation; ``model`` (a T3DModel) skips loading ``cfg.model``.

    ``per_study=True`` adds ``"per_study": {"study_ids", "group", "v2r_rank", "r2v_rank"}``
    (report group id and the 1-based rank of each study's best correct answer, as in
    ``retrieval_metrics``), e.g. for a bootstrap over test studies, and, when zero-shot is
    scored, ``"zero_shot": {"findings", "scores", "labels"}`` (``(M, F)``, NaN = unknown).
    ``progress=True`` shows a tqdm bar of the embedded studies on the main process.
    ``prompts`` (``{finding: {"positive": [...], "negative": [...]}}``, findings of the store)
    replaces the provider's zero-shot prompts (the benchmark suites' fixed prompt sets).
    """
    check_inputs(cfg)  # before torch / transformers are imported
    # the dataset's own tasks (prompts, report twins); a findings sidecar implies the phantom's
    tasks = store_tasks(cfg.store, cfg.tasks or ("phantom" if cfg.findings is not None else None))
    import t3d_eval as ev
    import torch
    from t3d_data import VolumeDataset
    from t3d_data.tasks import TasksError, twin_reports

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
    e = cfg.embedding
    emb = ev.embed_volumes(model, dataset, indices, crop_size=crop_size, mode=e.mode,
                           overlap=e.overlap, num_crops=e.num_crops, seed=cfg.runtime.seed,
                           batch_size=e.batch_size, accelerator=accelerator, progress=progress)
    reports, study_ids = emb["reports"], emb["study_ids"]
    text = ev.text_encoder(model)
    report_emb = torch.cat([text(reports[i : i + 32]) for i in range(0, len(reports), 32)])

    results: dict[str, Any] = {
        "studies": len(study_ids),
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
    twins = None
    if tasks is not None and cfg.twins_per_study > 0:
        try:
            twins = tasks.report_twins(cfg.store, cfg.findings)
        except TasksError as err:  # e.g. a sidecar line that is not a findings record
            raise ConfigError(str(err)) from None
    if twins is not None:
        rows, texts, attrs = twin_reports(twins, study_ids, cfg.twins_per_study, cfg.runtime.seed)
        if rows:
            twin_emb = torch.cat([text(texts[i : i + 32]) for i in range(0, len(texts), 32)])
            r = torch.tensor(rows)
            twin_acc: dict[str, Any] = {
                "all": ev.twin_accuracy(emb["volume_emb"][r], report_emb[r], twin_emb),
                "count": len(rows)}
            counts = {}
            for attr in sorted(set(attrs)):
                sel = torch.tensor([a == attr for a in attrs])
                twin_acc[attr] = ev.twin_accuracy(emb["volume_emb"][r][sel], report_emb[r][sel],
                                                  twin_emb[sel])
                counts[attr] = int(sel.sum())
            twin_acc["counts"] = counts
            results["twin_accuracy"] = twin_acc
    elif cfg.twins_per_study > 0:
        note(accelerator, f"no report twins for {cfg.store} ({why_not(tasks, 'twins')}); "
                          "twin accuracy skipped")
    if prompts is None:
        prompts = tasks.prompts_for(dataset.finding_names) if tasks is not None else {}
    if prompts:
        names = list(prompts)
        finding_index = [dataset.finding_names.index(n) for n in names]
        scores = ev.zero_shot_scores(emb["volume_emb"], text, prompts,
                                     temperature=cfg.zero_shot_temperature)
        results["zero_shot_auc"] = ev.zero_shot_auc(scores, emb["labels"][:, finding_index], names)
        if per_study:
            results["per_study"]["zero_shot"] = {
                "findings": names, "scores": scores.tolist(),
                "labels": emb["labels"][:, finding_index].tolist()}
    else:
        note(accelerator, f"no zero-shot prompts for the findings of {cfg.store} "
                          f"({why_not(tasks, 'zero_shot_prompts')}); zero-shot AUC skipped")
    results["preprocessing"] = {**model.config.preprocessing_record(),
                                **prep.model_dump(mode="json")}
    results["config"] = {"checkpoint": str(cfg.model.checkpoint), "store": str(cfg.store),
                         "split": cfg.split, "embedding": cfg.embedding.mode,
                         "crop_size": list(crop_size),
                         "tasks": tasks.name if tasks is not None else None,
                         "sidecar": str(getattr(twins, "path", None)),
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
    return text + baseline_sentence(cfg.model, "vision encoder")
