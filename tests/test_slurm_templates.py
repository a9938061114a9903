"""tools/slurm/ templates, rendered as Slurm would run them: bash with Slurm's variables set and
stub ``srun``/``scontrol``/``sbatch``/``uv`` on PATH that record the commands; the recorded
commands are parsed with accelerate's own ``launch`` parser, tools/pretrain.py's parser (and
config validation) and t3d-data's parser."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "tools" / "slurm"

# Stubs. Each appends its argv (as JSON) to $STUB_LOG.
_LOG = 'python3 -c \'import json, os, sys; open(os.environ["STUB_LOG"], "a").write(json.dumps([sys.argv[1].rsplit("/", 1)[-1], *sys.argv[2:]]) + "\\n")\' "$0" "$@"'
STUBS = {
    # `scontrol show hostnames LIST`: a 3-node list, as Slurm expands gpu[01-03]
    "scontrol": '[ "$1 $2" = "show hostnames" ] || exit 9\nprintf "gpu01\\ngpu02\\ngpu03\\n"',
    # srun: run the command once per node, with that task's SLURM_NODEID / SLURM_PROCID
    "srun": (_LOG + '\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
             'for ((n = 0; n < SLURM_NNODES; n++)); do\n'
             '    SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" || exit $?\ndone'),
    # sbatch --parsable: prints a job id (4242, then 4243, ...)
    "sbatch": _LOG + '\necho $((4242 + $(grep -c sbatch "$STUB_LOG") - 1))";cluster1"',
    "uv": _LOG,
}


@pytest.fixture
def slurm(tmp_path):
    """Runs a template with bash, Slurm variables and the stubs; returns the recorded argvs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"

    def run(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
        log.write_text("", encoding="utf-8")
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
                "STUB_LOG": str(log), **env}
        res = subprocess.run(["bash", str(SLURM / script), *args], cwd=ROOT, env=full,
                             capture_output=True, encoding="utf-8", timeout=60)
        assert res.returncode == 0, (script, res.stdout, res.stderr)
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]

    return run


def test_multinode_pretrain_launches_one_process_per_gpu_with_slurm_rendezvous(slurm):
    from accelerate.commands.launch import launch_command_parser
    from t3d_train import demo

    text = (SLURM / "pretrain_multinode.sbatch").read_text(encoding="utf-8")
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --signal=TERM@" in text
    env = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "gpu[01-03]",
           "SLURM_GPUS_ON_NODE": "4",
           "EXTRA_ARGS": "--set data.store=s3://bucket/t3d/store --set run.output_dir=runs/base"}
    calls = slurm("pretrain_multinode.sbatch", env)
    assert [c[0] for c in calls] == ["srun", "uv", "uv", "uv"]  # one launcher per node
    parser = launch_command_parser()
    pretrain = _load_pretrain_parser()
    ranks = []
    for call in calls[1:]:
        assert call[1:5] == ["run", "--locked", "accelerate", "launch"], call
        args = parser.parse_args(call[5:])
        assert args.multi_gpu and args.num_machines == 3
        assert args.num_processes == 3 * 4  # nodes x GPUs per node
        assert args.main_process_ip == "gpu01" and args.main_process_port == 29500 + 123456 % 1000
        assert args.rdzv_backend == "static" and args.same_network
        assert args.training_script == "tools/pretrain.py"
        ranks.append(args.machine_rank)
        script_args = pretrain.parse_args(args.training_script_args)
        assert script_args.resume is None
        assert Path(script_args.config) == Path("tools/configs/pretrain/t3d-base.yaml")
        cfg = demo.load_pretrain_config(script_args.config, script_args.overrides)  # validates
        assert cfg.data.store == "s3://bucket/t3d/store"  # object storage stays a URL
        assert str(cfg.run.output_dir) == "runs/base"
    assert ranks == [0, 1, 2]
    # a requeued job (pre-empted, or SIGTERM at the time limit) resumes from its checkpoint
    calls = slurm("pretrain_multinode.sbatch", {**env, "SLURM_RESTART_COUNT": "1",
                                                "GPUS_PER_NODE": "8"})
    assert len(calls) == 4
    for call in calls[1:]:
        args = parser.parse_args(call[5:])
        assert args.num_processes == 3 * 8
        assert pretrain.parse_args(args.training_script_args).resume == "latest"


def test_sharded_prepare_array_then_dependent_index_job(slurm):
    from t3d_data.cli import build_parser

    env = {"MANIFEST": "/data/ct/manifest.jsonl", "STORE": "/shared/t3d/store", "SHARDS": "3"}
    calls = slurm("prepare_store.sh", env, "--partition=cpu")
    assert [c[0] for c in calls] == ["sbatch", "sbatch"]
    array, index = calls
    assert "--array=0-2" in array and "--partition=cpu" in array
    assert array[-1] == str(SLURM / "prepare_shards.sbatch")
    assert "--dependency=afterok:4242" in index and index[-1] == str(SLURM / "index_store.sbatch")
    parser = build_parser()
    shards = []
    for task in range(3):  # what each array task runs
        task_env = {**env, "SLURM_ARRAY_TASK_ID": str(10 + task), "SLURM_ARRAY_TASK_MIN": "10",
                    "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_CPUS_PER_TASK": "16"}
        task_env.pop("SHARDS")  # the array's task count is the default
        (call,) = slurm("prepare_shards.sbatch", task_env)
        assert call[:4] == ["uv", "run", "--locked", "t3d-data"], call
        args = parser.parse_args(call[4:])
        assert args.command == "prepare" and args.workers == 16 and args.no_progress
        assert (str(args.manifest), str(args.out)) == (env["MANIFEST"], env["STORE"])
        shards.append(args.shard)
    assert shards == ["0/3", "1/3", "2/3"]
    (call,) = slurm("index_store.sbatch", {**env, "EXTRA_ARGS": "--max-bad-fraction 0.01"})
    args = parser.parse_args(call[4:])
    assert args.command == "index" and str(args.store) == env["STORE"]
    assert str(args.manifest) == env["MANIFEST"] and args.max_bad_fraction == 0.01
    # a missing variable stops before submitting anything, naming it
    res = subprocess.run(["bash", str(SLURM / "prepare_shards.sbatch")], cwd=ROOT,
                         env={"PATH": os.environ["PATH"]}, capture_output=True, encoding="utf-8")
    assert res.returncode != 0 and "set MANIFEST=" in res.stderr


def _load_pretrain_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_pretrain", ROOT / "tools" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_templates_are_valid_bash():
    for script in sorted(SLURM.iterdir()):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, encoding="utf-8")
        assert res.returncode == 0, (script.name, res.stderr)
        assert shlex.split(script.read_text(encoding="utf-8").splitlines()[0]) == ["#!/bin/bash"]
