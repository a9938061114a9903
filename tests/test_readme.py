"""The README's commands work as written, from a fresh clone.

Every command of the README's ```bash blocks is either run here -- verbatim, in README order, in
a scratch folder that holds only links to ``tools/`` and ``packages/`` (so nothing is written
into the checkout), with small size flags appended to the data builds marked below -- or listed in
``NOT_RUN`` with the test that covers it or the reason it cannot run here. A new README command
that is in neither list fails ``test_every_readme_command_is_accounted_for``, so it cannot go
untested silently. For the commands that are not run, the cheap parts are still checked: the
scripts answer ``--help``, the files they name exist, their ``--config``/``--set`` arguments
validate, and the paths they read are the ones the earlier commands write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# Commands run here, in README order. Value: arguments appended to the README's (argparse keeps
# the last value of a repeated flag): the two demo data builds are made small (6 studies of 64^3
# instead of 24 native-size or 96 of 96^3; the same code as the verbatim phantom + prepare lines).
SMALL_DEMO = ["--studies", "6", "--shape", "64", "64", "64"]
RUN: dict[str, list[str]] = {
    "uv run t3d-data phantom data/phantom --studies 24": [],  # ~7 s
    "uv run t3d-data validate data/phantom/manifest.jsonl": [],
    "uv run t3d-data prepare data/phantom/manifest.jsonl data/store": [],
    "uv run t3d-data demo data/demo": SMALL_DEMO,
    "uv run t3d-data prepare data/phantom/manifest.jsonl data/store-pool --workers 2": [],
    "uv run t3d-data prepare data/phantom/manifest.jsonl data/store-sharded --shard 0/2": [],
    "uv run t3d-data prepare data/phantom/manifest.jsonl data/store-sharded --shard 1/2": [],
    "uv run t3d-data index data/store-sharded": [],
    "uv run t3d-data demo runs/demo-data --studies 96 --shape 96 96 96": SMALL_DEMO,
    "uv run t3d-data validate my_ct/studies.jsonl": [],  # on the README's own example manifest
    "uv run t3d-data prepare my_ct/studies.jsonl my_ct/store": [],
    # on a synthetic replica of CT-RATE's layout (t3d_data.sources.replica), written first
    "uv run t3d-data import ct-rate downloads/CT-RATE -o data/ct-rate/manifest.jsonl": [],
    "uv run t3d-data prepare data/ct-rate/manifest.jsonl data/ct-rate/store": [],
    # on a synthetic BraTS 2023 replica (4 MRI channels per case), written first
    "uv run t3d-data import brats downloads/BraTS2023 -o data/brats/manifest.jsonl": [],
    "uv run t3d-data prepare data/brats/manifest.jsonl data/brats/store": [],
    "uv run python tools/benchmark.py --list": [],  # ~2 s, no torch
}

# Commands not run here (regular expressions matched against the whole command), and why.
NOT_RUN: dict[str, str] = {
    r"python3 -m pip install -q uv": "installs uv from PyPI (network)",
    r"uv run --locked python tools/pretrain\.py":
        "the ~8 min demo: tests/test_pretrain.py::test_default_demo_runs_a_few_steps runs it for 2 steps",
    r"HF_HUB_OFFLINE=1 uv run --locked pytest -q": "the suite this test belongs to",
    r"python3 -m venv \.venv-cpu": "CPU-only install (network); test_pip_install_names_every_dependency",
    r"\. \.venv-cpu/bin/activate": "CPU-only install (network)",
    r"pip install torch --index-url https://download\.pytorch\.org/whl/cpu": "CPU-only install (network)",
    r"pip install \./packages/.*": "network; test_pip_install_names_every_dependency checks the list",
    r"python tools/pretrain\.py": "the demo in the pip environment: as `uv run --locked python tools/pretrain.py`",
    r"uv run python tools/pretrain\.py --config tools/configs/pretrain/cpu-demo\.yaml --set optim\.max_steps=20":
        "long: tests/test_pretrain.py trains cpu-demo-sized runs; its store and config are checked here",
    r"uv run python tools/pretrain\.py --config tools/configs/pretrain/cpu-demo\.yaml --set data\.store=my_ct/store .*":
        "long: tests/test_pretrain.py; the store it reads is built here from the README's manifest",
    r"accelerate launch --config_file tools/accelerate/multi_gpu\.yaml tools/pretrain\.py .*":
        "needs GPUs and a store; config validated here; resume: tests/test_pretrain.py::test_resume_after_sigkill_is_bit_exact",
    r"uv run accelerate launch --config_file tools/accelerate/cpu_2proc\.yaml tools/pretrain\.py .*":
        "long: tests/test_pretrain.py::test_two_processes_match_one",
    r"uv run python tools/learning_check\.py": "long: tests/test_learning.py::test_defaults_learn_below_chance_without_collapse",
    r"uv run python tools/learning_check\.py --compare": "~10 min ablation of the defaults (docs/pretraining.md); --help run here",
    r"uv run python tools/evaluate\.py --checkpoint .*":
        "long: tests/test_eval_tools.py::test_evaluate_cli_on_the_smoke_checkpoint; arguments validated here",
    r"uv run python tools/finetune_(cls|seg)\.py --checkpoint .*":
        "long: tests/test_eval_tools.py::test_smoke_benchmark_writes_results runs both; arguments validated here",
    r"uv run python tools/finetune_seg\.py --dataset brats .*":
        "long: tests/test_mri_finetune.py::test_finetune_seg_brats_from_a_one_channel_ct_checkpoint "
        "runs it on a replica store; arguments validated here, the store is built here",
    r"uv run python tools/run_benchmark\.py --preset smoke\b.*": "long: tests/test_eval_tools.py::test_smoke_benchmark_writes_results",
    r"uv run python tools/run_benchmark\.py --preset (cpu|gpu)-evidence\b.*":
        "hours on CPU / a GPU; sizes: tests/test_eval_tools.py::test_evidence_presets_meet_the_issue_sizes",
    r"uv run python tools/bench_(data|models|pretrain)\.py.*": "benchmarks (minutes; numbers in docs/performance.md); --help run here",
    r"uv run python tools/benchmark\.py phantom-zeroshot --checkpoint .*":
        "long: tests/test_benchmark_suites.py::test_phantom_zeroshot_cli_writes_json_markdown_and_docs",
    r"tools/gpu_check\.sh": "needs a GPU (~8 min); its CPU path: "
        "tests/test_speed_knobs.py::test_gpu_check_smoke_writes_its_table_and_json",
    r"uv run python tools/finetune_report\.py --config .*":
        "long: tests/test_report_tools.py::test_finetune_resume_generate_and_score (tiny decoder, "
        "3 steps, resume); arguments: test_readme_report_commands_parse_into_valid_configs",
    r"uv run python tools/generate_reports\.py .*":
        "needs a fine-tuned generator: tests/test_report_tools.py::test_finetune_resume_generate_and_score "
        "runs both forms",
    r"uv run t3d-data demo runs/report-data/n600-64-s1 .*":
        "a 600-study store (~1.5 min): the code of `uv run t3d-data demo data/demo`, run here small",
    r"uv run python tools/report_evidence\.py .*":
        "~17 min: tests/test_report_tools.py::test_evidence_table_and_docs_section runs it (with "
        "--ablations) on a tiny store",
    r"MANIFEST=\S+ STORE=\S+ SHARDS=16 tools/slurm/prepare_store\.sh":
        "needs Slurm: tests/test_slurm_templates.py::test_sharded_prepare_array_then_dependent_index_job",
    r"sbatch --nodes=4 tools/slurm/pretrain_multinode\.sbatch":
        "needs Slurm and GPUs: tests/test_slurm_templates.py::test_multinode_pretrain_launches_one_process_per_gpu_with_slurm_rendezvous",
}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments dropped,
    ``a && b`` split, duplicates kept once (in order of first appearance)."""
    text = README.read_text(encoding="utf-8")
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n[ \t]*", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(" ".join(tokens[:cut]))
                tokens = tokens[cut + 1:]
    return list(dict.fromkeys(commands))


def _not_run_pattern(command: str) -> str | None:
    hits = [p for p in NOT_RUN if re.fullmatch(p, command)]
    assert len(hits) <= 1, f"{command!r} matches several NOT_RUN entries: {hits}"
    return hits[0] if hits else None


def _script_args(command: str, script: str) -> list[str]:
    """The arguments after ``tools/SCRIPT``, with ``~`` expanded as the shell would."""
    tokens = command.split()
    return [os.path.expanduser(t) for t in tokens[tokens.index(f"tools/{script}") + 1:]]


def test_every_readme_command_is_accounted_for():
    commands = readme_commands()
    assert len(commands) > 20, "found too few README commands: is the ```bash parsing broken?"
    missing = [c for c in commands if c not in RUN and _not_run_pattern(c) is None]
    assert not missing, ("README commands neither run nor listed in tests/test_readme.py (add each "
                         "to RUN, or to NOT_RUN with the test that covers it):\n" + "\n".join(missing))
    both = [c for c in commands if c in RUN and _not_run_pattern(c)]
    assert not both, f"in RUN and NOT_RUN: {both}"
    stale = [c for c in RUN if c not in commands]
    stale += [p for p in NOT_RUN if not any(re.fullmatch(p, c) for c in commands)]
    assert not stale, f"entries of tests/test_readme.py that match no README command: {stale}"


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                T3D_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="2")


def _argv(command: str) -> list[str]:
    """``uv run X ...`` -> the environment's own ``X`` (no uv subprocess per command)."""
    tokens = command.split()
    assert tokens[:2] == ["uv", "run"], command
    tokens = [t for t in tokens[2:] if t != "--locked"]
    if tokens[0] == "python":
        return [sys.executable, *tokens[1:]]
    exe = BIN / tokens[0]
    assert exe.exists(), f"{tokens[0]} is not installed next to {sys.executable}"
    return [str(exe), *tokens[1:]]


def _write_dicom_series(folder: Path, hu, spacing) -> None:
    """A CT series of axial slices (stored = HU + 1024, rescale intercept -1024)."""
    import numpy as np
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray((hu.astype(np.int32) + 1024).astype(np.int16).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(hu.shape[2]):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": uid + ".1", "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{p:.4f}" for p in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(spacing[2]),
            "0028|1052": "-1024", "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def _make_my_ct(work: Path) -> None:
    """The files the README's example manifest names, from phantom studies (one as DICOM)."""
    import nibabel as nib
    import numpy as np
    from t3d_data.phantom import generate_phantom_dataset

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Bring your own CT data"):]
    example = re.search(r"```json\n(.*?)```", section, flags=re.S).group(1)
    records = [json.loads(line) for line in example.splitlines() if line.strip()]
    manifest = generate_phantom_dataset(work / "phantom-src", n_studies=len(records), seed=5,
                                        shape=(64, 64, 64), progress=False)
    sources = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = work / "my_ct"
    for rec, src in zip(records, sources, strict=True):
        image = manifest.parent / src["image"]
        target = out / rec["image"]
        if rec["image"].endswith((".nii", ".nii.gz")):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
        else:  # a DICOM series folder
            nii = nib.load(image)
            _write_dicom_series(target, np.asarray(nii.dataobj), nii.header.get_zooms()[:3])
        if rec["report"].endswith(".txt"):
            report = src["report"]
            if report.endswith(".txt"):
                report = (manifest.parent / report).read_text(encoding="utf-8")
            (out / rec["report"]).parent.mkdir(parents=True, exist_ok=True)
            (out / rec["report"]).write_text(report, encoding="utf-8")
    (out / "studies.jsonl").write_text(example, encoding="utf-8")


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, object]:
    """Run the RUN commands in README order in a scratch clone-like folder."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("tools", "packages"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    _make_my_ct(work)
    from t3d_data.sources.replica import write_replica

    write_replica("ct-rate", work / "downloads" / "CT-RATE", n=3, shape=(32, 32, 24))
    write_replica("brats", work / "downloads" / "BraTS2023", n=3, shape=(24, 24, 16))
    commands = readme_commands()
    done, outputs, stores_before = [], {}, {}
    for command in commands:
        if "tools/pretrain.py" in command:  # what exists when the README reaches this line
            stores_before[command] = {p: (work / p).exists() for p in ("runs/demo-data/store/index.json",
                                                                     "my_ct/store/index.json")}
        if command not in RUN:
            continue
        res = subprocess.run([*_argv(command), *RUN[command]], cwd=work, env=_env(work),
                             capture_output=True, text=True, encoding="utf-8", errors="replace",
                             timeout=300)
        assert res.returncode == 0, f"README command failed: {command}\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
        done.append(command)
        outputs[command] = res.stdout + res.stderr
    return {"work": work, "done": done, "outputs": outputs, "stores_before": stores_before}


def test_cheap_commands_run_verbatim_in_readme_order(ran):
    assert ran["done"] == [c for c in readme_commands() if c in RUN]
    work = ran["work"]
    assert (work / "data" / "phantom" / "manifest.jsonl").is_file()
    for store in ("data/store", "data/demo/store", "runs/demo-data/store", "my_ct/store",
                  "data/ct-rate/store", "data/brats/store"):
        assert (work / store / "index.json").is_file(), store
    brats = json.loads((work / "data/brats/store/index.json").read_text(encoding="utf-8"))
    assert {(s["n_channels"], s["modality"]) for s in brats["studies"]} == {(4, "MR")}
    out = ran["outputs"]["uv run t3d-data prepare my_ct/studies.jsonl my_ct/store"]
    assert "0 quarantined" in out, out  # every study of the README's example manifest, DICOM too
    # the pool and the merged shards wrote the store one process wrote
    for store in ("data/store-pool", "data/store-sharded"):
        assert (work / store / "index.json").read_bytes() == (work / "data/store/index.json").read_bytes()
    out = ran["outputs"]["uv run t3d-data import ct-rate downloads/CT-RATE -o data/ct-rate/manifest.jsonl"]
    assert "0 bad rows" in out and (work / "data/ct-rate/manifest.prompts.json").is_file(), out
    # the README says data/ is gitignored: it is
    assert "/data/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_pretrain_commands_find_the_store_the_readme_built_before_them(ran):
    """cpu-demo.yaml reads runs/demo-data/store; the README builds it on an earlier line."""
    store = yaml.safe_load((ROOT / "tools/configs/pretrain/cpu-demo.yaml").read_text(encoding="utf-8"))["data"]["store"]
    cpu_demo = [c for c in ran["stores_before"] if "cpu-demo.yaml" in c]
    assert cpu_demo
    for command in cpu_demo:
        overrides = dict(a.split("=", 1) for a in re.findall(r"--set (\S+=\S+)", command))
        path = overrides.get("data.store", store)
        assert ran["stores_before"][command][f"{path}/index.json"], (command, path)


def _load_tool(script: str):
    spec = importlib.util.spec_from_file_location(f"readme_{script[:-3]}", ROOT / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_arguments_of_the_readme_validate():
    """Every README pre-training/evaluation command's --config/--set/shortcut flags parse into a
    valid config (no run), and the evaluation commands read the demo's own outputs."""
    from t3d_train import demo, eval_config
    from t3d_train.eval_common import parse_config

    pretrain = _load_tool("pretrain.py")
    commands = readme_commands()
    seen = 0
    for command in commands:
        if "tools/pretrain.py" in command:
            args = pretrain.parse_args(_script_args(command, "pretrain.py"))
            cfg = demo.load_pretrain_config(args.config, args.overrides)
            assert cfg.optim.max_steps >= 1, command
            seen += 1
    demo_store = (Path.home() / ".cache" / "t3d" / "phantom-n{}-{}-s0".format(
        demo.DEMO_STUDIES, "x".join(map(str, demo.DEMO_SHAPE))) / "store")
    demo_model = Path(demo.DEMO_DEFAULTS["run"]["output_dir"]) / "model"
    classes = {"evaluate.py": eval_config.EvaluateConfig, "finetune_cls.py": eval_config.ClassifyConfig,
               "finetune_seg.py": eval_config.SegmentationConfig}
    for script, model in classes.items():
        tool = _load_tool(script)
        for command in (c for c in commands if f"tools/{script}" in c):
            cfg = parse_config(model, _script_args(command, script), "", tool.SHORTCUTS)
            if "--dataset brats" in command:  # the store the README's BraTS lines prepare
                assert Path(str(cfg.model.checkpoint)) == demo_model, command
                assert str(cfg.store) == "data/brats/store" and cfg.dataset == "brats", command
            elif "my_ct" not in command:  # the quick-start demo's checkpoint and cached store
                assert Path(str(cfg.model.checkpoint)) == demo_model, command
                assert str(cfg.store) == str(demo_store), command
            seen += 1
    assert seen >= 8


def test_every_readme_script_answers_help_and_named_files_exist():
    commands = readme_commands()
    scripts = sorted({t for c in commands for t in c.split() if re.fullmatch(r"tools/\w+\.py", t)})
    assert len(scripts) >= 8, scripts
    for script in scripts:
        res = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT,
                             env=_env(ROOT), capture_output=True, text=True, encoding="utf-8",
                             errors="replace", timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, (script, res.stderr[-2000:])
    for command in commands:
        for token in command.split():
            if re.match(r"(tools|packages)/", token):
                path = ROOT / token.split("[")[0].rstrip("/")
                assert path.exists(), f"{command}: {token} does not exist"


def test_pip_install_names_every_dependency():
    """The README's pip route installs every workspace package and the root's other dependencies."""
    line = next(c for c in readme_commands() if c.startswith("pip install ./packages/"))
    named = {t.split("[")[0].rstrip("/") for t in line.split()[2:]}
    packages = {f"./packages/{p.name}" for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file()}
    assert packages <= named, packages - named
    root = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    workspace = {p.name for p in (ROOT / "packages").iterdir()}
    for dep in root["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        assert name in workspace or name in named, f"{name} (root dependency) missing from: {line}"
    assert "./packages/t3d-models[minilm]" in line.split(), "the demo's text model needs the minilm extra"
