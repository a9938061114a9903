"""Report generation end to end on a tiny phantom store: tools/finetune_report.py (with a resume)
→ tools/generate_reports.py → scores; tools/report_evidence.py's table and docs section; config
errors before torch; the README's report commands parse."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
CPU = str(ROOT / "tools/configs/report/cpu-phantom.yaml")
#: A smaller decoder and resampler than the CPU config, and a few steps.
TINY = ["--set", "model.checkpoint=null", "--set", "optim.batch_size=2", "--set",
        "optim.warmup_steps=1", "--set", "generator.decoder.config.n_embd=32", "--set",
        "generator.decoder.config.n_layer=1", "--set", "generator.decoder.config.n_head=2",
        "--set", "generator.resampler.num_queries=4", "--set", "generator.resampler.heads=2",
        "--set", "generator.resampler.depth=1", "--set", "run.threads=1"]


def _main(script):
    return runpy.run_path(str(TOOLS / script), run_name="not_main")["main"]


@pytest.fixture(scope="module")
def store(phantom_store):
    return phantom_store(10, shape=(64, 64, 64), seed=5)


def _log_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_finetune_resume_generate_and_score(store, tmp_path, capsys):
    from t3d_data import VolumeDataset

    run = tmp_path / "run"
    finetune = _main("finetune_report.py")
    args = ["--config", CPU, "--store", str(store), "--out", str(run), *TINY,
            "--set", "run.checkpoint_every=1"]
    assert finetune([*args, "--set", "optim.max_steps=2"]) == 0
    assert "Report generator: 2 steps" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001",
                                                                       "step-00000002"]
    first = json.loads((run / "log.jsonl").read_text(encoding="utf-8").splitlines()[1])
    # the logged loss is the token loss plus the weighted finding loss (weight 1 in the config)
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["finding_loss"], rel=1e-4)
    # resume from the newest checkpoint: the log holds each step once, step 2's record unchanged
    assert finetune([*args, "--set", "optim.max_steps=3", "--resume", "latest"]) == 0
    assert _log_steps(run) == [1, 2, 3]
    assert json.loads((run / "log.jsonl").read_text(encoding="utf-8").splitlines()[1]) == first
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 3 and summary["encoder"] == "frozen"
    assert summary["encoder_source"] == "random:t3d-tiny-cpu"

    from t3d_eval.report_labeller import vocabulary
    from t3d_models.report import ReportGenerator
    from t3d_train.report import finding_targets

    model = ReportGenerator.from_pretrained(run / "model")
    assert model.config.findings == [r.name for r in vocabulary("phantom")]
    assert bool(model.resampler.location_fitted)  # fitted on the training tokens, saved
    reports = [r.report for r in VolumeDataset(store, split="train").store.records
               if r.split == "train"]
    targets = finding_targets(reports, "phantom", model.config.findings)
    from t3d_eval.report_labeller import PHANTOM_RULES, ReportLabeller

    assert targets.tolist() == [[float(x) for x in row]
                                for row in ReportLabeller(PHANTOM_RULES).positives(reports)]
    with pytest.raises(Exception, match="not in the 'ct-rate' labeller"):
        finding_targets(reports, "ct-rate", ["kidney_cyst"])

    out = tmp_path / "gen.jsonl"
    gen = _main("generate_reports.py")
    assert gen(["--checkpoint", str(run / "model"), "--store", str(store), "--out", str(out),
                "--set", "generate.max_new_tokens=8", "--set", "generate.num_beams=2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    test = VolumeDataset(store, split="test")
    assert [r["study_id"] for r in rows] == [test.store.records[i].study_id for i in test.indices]
    assert [r["reference"] for r in rows] == [test.store.records[i].report for i in test.indices]
    assert all(isinstance(r["generated"], str) for r in rows)
    scores = json.loads(out.with_suffix(".scores.json").read_text(encoding="utf-8"))
    assert scores["studies"] == len(rows) and set(scores) >= {"bleu1", "bleu4", "rougeL", "clinical"}
    # scoring the JSONL alone gives the same numbers
    assert gen(["--score", str(out)]) == 0
    assert json.loads(out.with_suffix(".scores.json").read_text(encoding="utf-8")) == scores
    assert "clinical macro F1" in capsys.readouterr().out


def test_evidence_table_and_docs_section(store, tmp_path):
    import torch
    from t3d_models import T3DModel

    torch.manual_seed(0)
    ckpt = tmp_path / "t3d"
    T3DModel.from_preset("t3d-tiny-cpu").save_pretrained(ckpt)
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nearlier text\n", encoding="utf-8")
    evidence = _main("report_evidence.py")
    argv = ["--config", CPU, "--store", str(store), "--checkpoint", str(ckpt),
            "--out", str(tmp_path / "ev"), *TINY[2:], "--set", "optim.max_steps=1",
            "--set", "data.max_test=2", "--set", "generate.max_new_tokens=6", "--resamples", "50",
            "--update-docs", "--results-md", str(docs), "--ablations"]
    assert evidence(argv) == 0
    res = json.loads((tmp_path / "ev/report_evidence.json").read_text(encoding="utf-8"))
    names = list(res["systems"])
    assert names == ["(a) most frequent training report",
                     "(b) nearest training report (T3D retrieval)", "generator, T3D encoder",
                     "(c) generator, random encoder",
                     "(d) a random training report (chance level)",
                     "ablation: T3D encoder, no location standardisation",
                     "ablation: T3D encoder, no finding loss"]
    # each ablation arm really changed the one setting it names
    no_loc = json.loads((tmp_path / "ev/ablation_no_location/model/report_config.json")
                        .read_text(encoding="utf-8"))
    no_head = json.loads((tmp_path / "ev/ablation_no_finding_loss/model/report_config.json")
                         .read_text(encoding="utf-8"))
    full = json.loads((tmp_path / "ev/t3d/model/report_config.json").read_text(encoding="utf-8"))
    assert (full["resampler"]["location_grid"], len(full["findings"])) == (4, 7)
    assert (no_loc["resampler"]["location_grid"], len(no_loc["findings"])) == (0, 7)
    assert (no_head["resampler"]["location_grid"], no_head["findings"]) == (4, [])
    # a rerun reuses the cached crop tokens (same store, studies and weights)
    cache = tmp_path / "ev/features/t3d-test.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert evidence([*argv[:-1]]) == 0 and cache.stat().st_mtime_ns == stamp
    a = [json.loads(x) for x in (tmp_path / "ev/baseline_a.jsonl").read_text(encoding="utf-8").splitlines()]
    from collections import Counter

    from t3d_data import VolumeStore

    records = VolumeStore(store).records
    train = [r.report for r in records if r.split == "train"]

    top = max(Counter(train).values())
    assert len({r["generated"] for r in a}) == 1 and Counter(train)[a[0]["generated"]] == top
    d = [json.loads(x)["generated"] for x in
         (tmp_path / "ev/baseline_d.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(d) == 2 and set(d) <= set(train)
    assert len(res["verdicts"]) == 6 and all(" → " in v for v in res["verdicts"])
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nearlier text\n") and "## Report generation" in text
    assert text.count("<!-- report-generation:start -->") == 1
    assert "| generator, T3D encoder |" in text
    # a second write replaces the section between the markers
    from t3d_train.report import update_docs_section

    update_docs_section(docs, "<!-- report-generation:start -->\nnew\n<!-- report-generation:end -->")
    again = docs.read_text(encoding="utf-8")
    assert again.count("report-generation:start") == 1 and "new" in again and "| (a)" not in again


def test_readme_report_commands_parse_into_valid_configs():
    from t3d_train.eval_common import eval_parser
    from t3d_train.report import GenerateConfig, ReportConfig, report_config_from_args

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"uv run python tools/(finetune_report|generate_reports|report_evidence)"
                          r"\.py ([^\n]+)", readme)
    assert {c[0] for c in commands} == {"finetune_report", "generate_reports", "report_evidence"}
    for script, rest in commands:
        argv = rest.split("#")[0].split()
        tool = runpy.run_path(str(TOOLS / f"{script}.py"), run_name="not_main")
        parser = eval_parser("", tool["SHORTCUTS"])
        for extra in ("--resume", "--score", "--labeller", "--results-md", "--budget-minutes",
                      "--resamples"):
            parser.add_argument(extra)
        parser.add_argument("--update-docs", action="store_true")
        parser.add_argument("--ablations", action="store_true")
        args = parser.parse_args(argv)
        if getattr(args, "score", None):
            continue
        model = GenerateConfig if script == "generate_reports" else ReportConfig
        cfg = report_config_from_args(model, args, tool["SHORTCUTS"])
        if script == "finetune_report":
            assert cfg.model.checkpoint == Path("runs/demo/model")


def test_token_cache_is_reused_only_for_the_same_inputs(tmp_path):
    import torch
    from t3d_train.report import _cached

    calls = []

    def compute():
        calls.append(1)
        return [(torch.full((2, 3), float(len(calls))), torch.zeros(2, 3))]

    path = tmp_path / "t3d-test.safetensors"
    first = _cached(path, compute, {"store": "a", "studies": ["s1"]})
    again = _cached(path, compute, {"store": "a", "studies": ["s1"]})
    assert len(calls) == 1 and torch.equal(first[0][0], again[0][0])
    other = _cached(path, compute, {"store": "b", "studies": ["s1"]})  # another store: recomputed
    assert len(calls) == 2 and other[0][0].unique().tolist() == [2.0]
