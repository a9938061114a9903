"""Report-generation metrics: BLEU-1..4 and ROUGE-L (torchmetrics) and clinical efficacy.

Clinical efficacy compares the findings a generated report states with those its reference
states, both read by the rule-based labeller (:mod:`t3d_eval.report_labeller`): per finding
precision, recall and F1 of "present" (an unmentioned finding counts as absent), their macro
mean over the findings with at least one positive reference, and, for findings with a side,
how often a correctly reported finding has the reference's side. Intervals are percentile
bootstraps over the test studies (:func:`t3d_eval.bootstrap.bootstrap_ci`); the same
``(n, n_resamples, seed)`` resamples the same studies for every system, so intervals are paired.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from t3d_eval.bootstrap import bootstrap_ci
from t3d_eval.report_labeller import FindingRule, ReportLabeller, normalise_report

__all__ = [
    "clinical_efficacy",
    "clinical_labels",
    "macro_f1_statistic",
    "nlg_metrics",
    "nlg_text",
    "score_reports",
]


def nlg_text(report: str) -> str:
    """The text the NLG metrics compare: :func:`normalise_report` on one line (lower case,
    punctuation as separate tokens), so a tokenizer's round trip does not change the score."""
    return re.sub(r"\s+", " ", normalise_report(report)).strip()


def nlg_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU-1..4 (``torchmetrics.text.BLEUScore``, one reference per study) and ROUGE-L F
    (``torchmetrics.text.ROUGEScore``), on :func:`nlg_text`; also the per-study ROUGE-L F.

    Returns:
        ``{"bleu1".."bleu4": float, "rougeL": float, "rougeL_per_study": list[float]}``.
    """
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(generated) != len(references) or not generated:
        raise ValueError(f"need one reference per generated report; got {len(generated)} "
                         f"generated and {len(references)} references")
    gen = [nlg_text(g) for g in generated]
    ref = [nlg_text(r) for r in references]
    out: dict[str, Any] = {}
    for n in (1, 2, 3, 4):
        out[f"bleu{n}"] = float(BLEUScore(n_gram=n)(gen, [[r] for r in ref]))
    rouge = ROUGEScore(rouge_keys=("rougeL",), accumulate="best")
    per = [float(rouge(g, r)["rougeL_fmeasure"]) for g, r in zip(gen, ref, strict=True)]
    out["rougeL"] = float(np.mean(per))
    out["rougeL_per_study"] = per
    return out


def clinical_labels(reports: Sequence[str], rules: Sequence[FindingRule]
                    ) -> tuple[np.ndarray, list[list[str | None]]]:
    """``(present (n, F) bool, sides [n][F])`` of ``reports`` by :class:`ReportLabeller`."""
    lab = ReportLabeller(rules)
    rows = [lab.label(r) for r in reports]
    present = np.array([[row[n].present is True for n in lab.names] for row in rows], dtype=bool)
    sides = [[row[n].side for n in lab.names] for row in rows]
    return present.reshape(len(rows), len(lab.names)), sides


def _prf(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = (truth & pred).sum(0).astype(float)
    fp = (~truth & pred).sum(0).astype(float)
    fn = (truth & ~pred).sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return precision, recall, f1, tp + fn


def macro_f1_statistic(truth: np.ndarray, pred: np.ndarray):
    """``idx -> macro F1`` over the findings with a positive reference in the resample (NaN when
    none has), for :func:`bootstrap_ci` over ``np.arange(n)``."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)

    def stat(idx: np.ndarray) -> float:
        _, _, f1, support = _prf(truth[idx], pred[idx])
        ok = support > 0
        return float(np.mean(f1[ok])) if ok.any() else float("nan")

    return stat


def clinical_efficacy(generated: Sequence[str], references: Sequence[str],
                      rules: Sequence[FindingRule], *, n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Per-finding P/R/F1, macro F1 with its bootstrap 95% interval, and side agreement.

    Per finding, F1 = 2TP / (2TP + FP + FN) of "present" in the generated report against the
    reference; a finding with no positive reference has no recall or F1 (``None``) and is left
    out of the macro mean (it still counts its false positives in the precision).

    Returns:
        ``{"per_finding": {name: {"precision", "recall", "f1", "support", "predicted"}},
        "macro_f1": float, "macro_f1_ci": [low, high], "side_accuracy": float | None,
        "side_pairs": int, "truth": (n, F) list, "pred": (n, F) list, "names": list}``.
    """
    if len(generated) != len(references) or not generated:
        raise ValueError(f"need one reference per generated report; got {len(generated)} "
                         f"generated and {len(references)} references")
    truth, t_side = clinical_labels(references, rules)
    pred, p_side = clinical_labels(generated, rules)
    names = [r.name for r in rules]
    precision, recall, f1, support = _prf(truth, pred)
    per = {}
    for j, name in enumerate(names):
        per[name] = {"precision": float(precision[j]),
                     "recall": None if np.isnan(recall[j]) else float(recall[j]),
                     "f1": None if np.isnan(f1[j]) else float(f1[j]),
                     "support": int(support[j]), "predicted": int(pred[:, j].sum())}
    stat = macro_f1_statistic(truth, pred)
    ci = bootstrap_ci(np.arange(len(truth)), stat, n_resamples=n_resamples, seed=seed)
    pairs = [(t_side[i][j], p_side[i][j]) for i in range(len(truth)) for j in range(len(names))
             if truth[i, j] and pred[i, j] and t_side[i][j] is not None]
    return {"per_finding": per, "macro_f1": ci.estimate, "macro_f1_ci": [ci.low, ci.high],
            "side_accuracy": (float(np.mean([a == b for a, b in pairs])) if pairs else None),
            "side_pairs": len(pairs), "names": names,
            "truth": truth.astype(int).tolist(), "pred": pred.astype(int).tolist()}


def score_reports(generated: Sequence[str], references: Sequence[str],
                  rules: Sequence[FindingRule], *, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """:func:`nlg_metrics` and :func:`clinical_efficacy` of one system, with a bootstrap 95%
    interval of the mean per-study ROUGE-L too (``rougeL_ci``)."""
    nlg = nlg_metrics(generated, references)
    per = np.asarray(nlg.pop("rougeL_per_study"))
    ci = bootstrap_ci(per, n_resamples=n_resamples, seed=seed)
    clinical = clinical_efficacy(generated, references, rules, n_resamples=n_resamples, seed=seed)
    return {**nlg, "rougeL_ci": [ci.low, ci.high], "studies": len(generated),
            "clinical": clinical}
