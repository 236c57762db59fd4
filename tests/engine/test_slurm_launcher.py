"""Tests of tools/run_dist_slurm.sh without slurm: fake ``srun`` and ``scontrol`` on the PATH and
fake SLURM_* variables; the commands are printed (DRY_RUN=1) and read back with train_net.py's
argument parser."""

import os
import shlex
import shutil
import subprocess

import pytest
from detectron2.engine import default_argument_parser
from helpers import TOOLS_DIR, TRAIN_NET

SCRIPT = os.path.join(TOOLS_DIR, "run_dist_slurm.sh")

# Runs its task once per node, in parallel, with the variables slurm would set (and DRY_RUN set to
# $FAKE_TASK_DRY_RUN); its arguments go to $FAKE_SRUN_LOG, the output of node i to $FAKE_SRUN_LOG.i.
FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$FAKE_SRUN_LOG"
nodes=1
while [[ $1 == -* ]]; do
    [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}
    shift
done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_JOB_NUM_NODES=$nodes SLURM_NNODES=$nodes \\
        SLURM_JOB_NODELIST="$FAKE_NODELIST" SLURM_JOB_ID=4242 DRY_RUN=${FAKE_TASK_DRY_RUN:-0} \\
        "$@" > "$FAKE_SRUN_LOG.$node" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
echo "$FAKE_FIRST_HOST"
echo other-node
"""


def _fake_bin(tmp_path, with_scontrol=True):
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tools = [("srun", FAKE_SRUN)] + ([("scontrol", FAKE_SCONTROL)] if with_scontrol else [])
    for name, text in tools:
        path = folder / name
        path.write_text(text)
        path.chmod(0o755)
    return str(folder)


def _run(args, env, check=True):
    result = subprocess.run(
        ["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr}")
    return result


def _env(tmp_path, path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("DRY_RUN", None)
    env.pop("DDETR_SLURM_TASK", None)
    env.update(PATH=path, FAKE_SRUN_LOG=str(tmp_path / "srun.log"), **extra)
    return env


def test_dry_run_prints_srun_command(tmp_path):
    env = _env(tmp_path, os.environ["PATH"], DRY_RUN="1", GPUS_PER_NODE="4", SRUN_ARGS="--mem=0")
    out = _run(["part", "ddetr", "8", "configs/r50.yaml", "--resume", "OUTPUT_DIR", "o d"], env)
    command = shlex.split(out.stdout)
    assert command == [
        "srun",
        "--partition=part",
        "--job-name=ddetr",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--gres=gpu:4",
        "--cpus-per-task=16",
        "--kill-on-bad-exit=1",
        "--mem=0",
        SCRIPT,
        "part",
        "ddetr",
        "8",
        "configs/r50.yaml",
        "--resume",
        "OUTPUT_DIR",
        "o d",
    ]
    # Fewer GPUs than GPUS_PER_NODE: one node with that many GPUs.
    out = _run(["part", "ddetr", "2", "configs/r50.yaml"], env)
    assert "--nodes=1" in out.stdout and "--gres=gpu:2" in out.stdout


@pytest.mark.parametrize("with_scontrol", [True, False])
def test_task_commands_per_node(tmp_path, with_scontrol):
    fake_bin = _fake_bin(tmp_path, with_scontrol)
    if not with_scontrol and shutil.which("scontrol"):
        pytest.skip("a real scontrol is installed")
    env = _env(
        tmp_path,
        fake_bin + os.pathsep + os.environ["PATH"],
        GPUS_PER_NODE="4",
        FAKE_NODELIST="gpu[07-08]",
        FAKE_FIRST_HOST="gpu07.cluster",
        PYTHON="python3",
    )
    # srun runs (the fake one); the tasks print their command.
    args = ["part", "ddetr", "8", "configs/r50.yaml", "SOLVER.IMS_PER_BATCH", "32"]
    _run(args, dict(env, FAKE_TASK_DRY_RUN="1"))
    srun_args = (tmp_path / "srun.log").read_text().split()
    assert "--nodes=2" in srun_args and "--ntasks-per-node=1" in srun_args
    commands = [shlex.split((tmp_path / f"srun.log.{node}").read_text()) for node in (0, 1)]
    host = "gpu07.cluster" if with_scontrol else "gpu07"
    for node, command in enumerate(commands):
        assert command == [
            "python3",
            TRAIN_NET,
            "--config-file",
            "configs/r50.yaml",
            "--num-gpus",
            "4",
            "--num-machines",
            "2",
            "--machine-rank",
            str(node),
            "--dist-url",
            f"tcp://{host}:{29500 + 4242}",
            "SOLVER.IMS_PER_BATCH",
            "32",
        ]
        args = default_argument_parser().parse_args(command[2:])
        assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, node)
        assert args.dist_url == f"tcp://{host}:{29500 + 4242}"
        assert args.opts == ["SOLVER.IMS_PER_BATCH", "32"]


def test_bad_input(tmp_path):
    env = _env(tmp_path, os.environ["PATH"], DRY_RUN="1", GPUS_PER_NODE="4")
    result = _run(["part", "ddetr"], env, check=False)
    assert result.returncode == 2 and "Usage" in result.stderr
    result = _run(["part", "ddetr", "6", "configs/r50.yaml"], env, check=False)
    assert result.returncode == 2 and "multiple of GPUS_PER_NODE" in result.stderr
    result = _run(["part", "ddetr", "two", "configs/r50.yaml"], env, check=False)
    assert result.returncode == 2 and "GPUS must be a positive integer" in result.stderr
    env["DDETR_SLURM_TASK"] = "1"
    result = _run(["part", "ddetr", "4", "configs/r50.yaml"], env, check=False)
    assert result.returncode == 2 and "SLURM_JOB_NODELIST" in result.stderr
    env.update(SLURM_JOB_NODELIST="n[1-3]", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="3")
    result = _run(["part", "ddetr", "8", "configs/r50.yaml"], env, check=False)
    assert result.returncode == 2 and "has 3 nodes" in result.stderr
