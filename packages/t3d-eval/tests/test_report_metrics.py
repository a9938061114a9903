"""Report metrics against reference implementations: BLEU-1..4 against a direct implementation of
Papineni et al.'s corpus BLEU, ROUGE-L against an LCS, clinical P/R/F1 against scikit-learn,
the macro-F1 interval against a resampling loop."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support
from t3d_eval.bootstrap import _resample_indices
from t3d_eval.report_labeller import PHANTOM_RULES
from t3d_eval.report_metrics import (
    clinical_efficacy,
    clinical_labels,
    macro_f1_statistic,
    nlg_metrics,
    nlg_text,
    score_reports,
)

GEN = ["FINDINGS: The heart is enlarged. No pleural effusion. The spleen is normal in size.",
       "There is a small right pleural effusion. No pulmonary nodules.",
       "No acute abnormality.",
       "A 20 mm simple cyst in the left kidney. Fatty liver."]
REF = ["FINDINGS: Cardiomegaly is present. No pleural effusion. Splenomegaly.",
       "There is a small left pleural effusion. No pulmonary nodules.",
       "A 12 mm pulmonary nodule in the right lung. Hepatic steatosis.",
       "A 20 mm simple cyst in the left kidney. The liver is normal in size and attenuation."]


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def naive_corpus_bleu(cands, refs, max_n):
    """Corpus BLEU, uniform weights, one reference, no smoothing (Papineni et al. 2002)."""
    c_len = r_len = 0
    match, total = [0] * max_n, [0] * max_n
    for c, r in zip(cands, refs, strict=True):
        ct, rt = c.split(), r.split()
        c_len, r_len = c_len + len(ct), r_len + len(rt)
        for n in range(1, max_n + 1):
            cn, rn = _ngrams(ct, n), _ngrams(rt, n)
            match[n - 1] += sum(min(v, rn[g]) for g, v in cn.items())
            total[n - 1] += sum(cn.values())
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / max_n
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)


def naive_rouge_l(cand, ref):
    a = re.sub(r"[^a-z0-9]+", " ", cand.lower()).split()
    b = re.sub(r"[^a-z0-9]+", " ", ref.lower()).split()
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    lcs = dp[-1][-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def test_bleu_and_rouge_match_direct_implementations():
    got = nlg_metrics(GEN, REF)
    cands, refs = [nlg_text(g) for g in GEN], [nlg_text(r) for r in REF]
    for n in (1, 2, 3, 4):
        assert got[f"bleu{n}"] == pytest.approx(naive_corpus_bleu(cands, refs, n), abs=1e-6)
    assert 0 < got["bleu4"] < got["bleu1"] < 1
    per = [naive_rouge_l(c, r) for c, r in zip(cands, refs, strict=True)]
    assert got["rougeL_per_study"] == pytest.approx(per, abs=1e-6)
    assert got["rougeL"] == pytest.approx(np.mean(per), abs=1e-6)


def test_identical_reports_score_one_and_a_tokenizer_round_trip_changes_nothing():
    same = nlg_metrics(REF, REF)
    assert same["bleu4"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    round_trip = [" ".join(r.lower().replace(".", " . ").replace(":", " : ").split()) for r in REF]
    assert nlg_metrics(round_trip, REF)["bleu4"] == pytest.approx(1.0)


def test_clinical_efficacy_matches_sklearn_per_finding_and_macro():
    res = clinical_efficacy(GEN, REF, PHANTOM_RULES, n_resamples=200)
    truth, _ = clinical_labels(REF, PHANTOM_RULES)
    pred, _ = clinical_labels(GEN, PHANTOM_RULES)
    names = [r.name for r in PHANTOM_RULES]
    # the labels themselves, by hand
    assert truth[:, names.index("cardiomegaly")].tolist() == [1, 0, 0, 0]
    assert pred[:, names.index("fatty_liver")].tolist() == [0, 0, 0, 1]
    p, r, f, s = precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
    for j, n in enumerate(names):
        per = res["per_finding"][n]
        assert per["precision"] == pytest.approx(p[j])
        assert per["support"] == s[j]
        if s[j]:
            assert per["recall"] == pytest.approx(r[j]) and per["f1"] == pytest.approx(f[j])
        else:
            assert per["recall"] is None and per["f1"] is None
    assert res["macro_f1"] == pytest.approx(f[s > 0].mean())
    # effusion: found on the wrong side (right for left); kidney cyst: found, left as stated
    assert res["side_pairs"] == 2 and res["side_accuracy"] == pytest.approx(0.5)


def test_macro_f1_interval_is_the_percentile_of_a_resampling_loop():
    rng = np.random.default_rng(1)
    truth = rng.random((40, 3)) < 0.4
    pred = np.where(rng.random((40, 3)) < 0.7, truth, ~truth)
    from t3d_eval.bootstrap import bootstrap_ci

    ci = bootstrap_ci(np.arange(40), macro_f1_statistic(truth, pred), n_resamples=300, seed=4)
    vals = []
    for idx in _resample_indices(40, 300, 4):
        t, p = truth[idx], pred[idx]
        f1 = [2 * (t[:, j] & p[:, j]).sum() / (t[:, j].sum() + p[:, j].sum())
              for j in range(3) if t[:, j].any()]
        vals.append(np.mean(f1))
    assert ci.low == pytest.approx(np.quantile(vals, 0.025))
    assert ci.high == pytest.approx(np.quantile(vals, 0.975))


def test_score_reports_bundles_everything_and_checks_lengths():
    s = score_reports(GEN, REF, PHANTOM_RULES, n_resamples=100)
    assert s["studies"] == 4 and s["rougeL_ci"][0] <= s["rougeL"] <= s["rougeL_ci"][1]
    assert s["clinical"]["macro_f1_ci"][0] <= s["clinical"]["macro_f1"] <= \
        s["clinical"]["macro_f1_ci"][1]
    with pytest.raises(ValueError, match="one reference per generated report"):
        score_reports(GEN, REF[:2], PHANTOM_RULES)
