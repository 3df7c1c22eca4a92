"""Launch recipes: accelerate configs, two machines on localhost, and the Slurm sbatch script, both
as a dry run (fake srun/scontrol: the per-node command lines) and under a real two-node Slurm
started on this machine by launch/slurm_localhost.sh."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import timm.models.vision_transformer
from accelerate.commands.config.config_args import load_config_from_file
from helpers import PYTHON, ROOT, free_port, python_env

from pretrain.checkpoint import list_checkpoints

LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm.sbatch"


@pytest.mark.parametrize(
    "name, kind, processes",
    [
        ("accelerate_1gpu", "NO", 1),
        ("accelerate_1node_8gpu", "MULTI_GPU", 8),
        ("accelerate_multinode", "MULTI_GPU", 16),
        ("accelerate_fsdp_vit_large", "FSDP", 8),
    ],
)
def test_accelerate_configs_load(name, kind, processes):
    config = load_config_from_file(str(LAUNCH / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == processes


def test_fsdp_config_wraps_and_checkpoints_the_timm_blocks():
    fsdp = load_config_from_file(str(LAUNCH / "accelerate_fsdp_vit_large.yaml")).fsdp_config
    assert fsdp["fsdp_activation_checkpointing"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # The wrap policy matches classes by name: it must be the class timm's ViT blocks have.
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    block_classes = {type(block).__name__ for block in vit.blocks}
    assert block_classes == {fsdp["fsdp_transformer_layer_cls_to_wrap"]}
    assert timm.models.vision_transformer.Block.__name__ in block_classes


@pytest.mark.distributed
def test_two_machines_on_localhost_train_a_few_steps(tiny_run, tmp_path):
    """accelerate's multi-node mode: 2 "machines" (ranks 0 and 1) x 1 process, static rendezvous
    on 127.0.0.1, started as two independent launchers as two nodes would."""
    port = free_port()
    launchers = []
    for machine_rank in (0, 1):
        command = [
            PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_machines", "2", "--machine_rank", str(machine_rank), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "pretrain", *tiny_run, "train.run_name=two-machines", "train.steps=3",
        ]  # fmt: skip
        log = open(tmp_path / f"machine{machine_rank}.log", "w")
        launchers.append(
            subprocess.Popen(command, env=python_env(), stdout=log, stderr=subprocess.STDOUT)
        )
    try:
        codes = [launcher.wait(timeout=300) for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    logs = [(tmp_path / f"machine{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 process(es)" in logs[0]
    summary = json.loads(logs[0].strip().splitlines()[-1])
    assert summary["steps"] == 3 and len(summary["skipped_samples_per_rank"]) == 2
    metrics = (tmp_path / "runs" / "two-machines" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 3


# --- the sbatch script as a dry run -----------------------------------------------------------

FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames n[1-2] / scontrol show node NAME, as a 2-node cluster answers them
case "$2" in
    hostnames) printf 'gpu-node-a\\ngpu-node-b\\n' ;;
    node) echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.${3: -1} NodeHostName=$3" ;;
esac
"""
FAKE_SRUN = """#!/bin/bash
# runs the step's command once per node, as srun --ntasks-per-node=1 does
while [[ "$1" == --* ]]; do shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node SLURM_PROCID=$node "$@"; done
"""


def dry_run(tmp_path, args, **env):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "pretrain",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "LAUNCH_DRY_RUN": "1",
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(SBATCH), *args],
        env={**os.environ, **slurm, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_sbatch_dry_run_gives_each_node_its_machine_rank(tmp_path):
    lines = dry_run(tmp_path, ["--config", "c.yaml", "data.batch_size=64"], SLURM_GPUS_ON_NODE="8")
    assert [line.split(":")[0] for line in lines] == ["node 0", "node 1"]
    for rank, line in enumerate(lines):
        assert "-m accelerate.commands.launch --num_machines 2" in line
        assert f"--machine_rank {rank} --num_processes 16" in line
        # The first node's address from `scontrol show node`, a port derived from the job id.
        assert "--main_process_ip 10.0.0.a --main_process_port 24242" in line
        assert line.endswith(
            "-m pretrain --config c.yaml data.batch_size=64 train.run_name=pretrain-4242"
        )


def test_sbatch_dry_run_torchrun_and_a_config_file(tmp_path):
    lines = dry_run(
        tmp_path, ["train.run_name=mine"], LAUNCHER="torchrun", NPROC_PER_NODE="4", PORT="29999"
    )
    assert "-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 4" in lines[1]
    assert "--master_addr 10.0.0.a --master_port 29999" in lines[1]
    assert lines[1].endswith("-m pretrain train.run_name=mine")  # the user's run name is kept
    fsdp = LAUNCH / "accelerate_fsdp_vit_large.yaml"
    lines = dry_run(tmp_path, [], ACCELERATE_CONFIG=str(fsdp))
    assert f"--config_file {fsdp}" in lines[0] and "--multi_gpu" not in lines[0]


# --- the sbatch script under a real Slurm on this machine ---------------------------------------


def _three_free_ports() -> int:
    """A port p with p, p+1 and p+2 free (slurmctld and the two slurmd daemons)."""
    for _ in range(50):
        base = free_port()
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node Slurm (nodes n1, n2 on 127.0.0.1), its SLURM_CONF environment for the commands."""
    missing = [
        name for name in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(name)
    ]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing; Debian: slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root")
    folder = tmp_path_factory.mktemp("slurm")
    script = str(LAUNCH / "slurm_localhost.sh")
    env = {**os.environ, "CTLD_PORT": str(_three_free_ports())}
    started = subprocess.run(
        ["bash", script, "start", str(folder)], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    yield {**python_env(), "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run(["bash", script, "stop", str(folder)], env=env, timeout=60)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _job_state(job: str, env: dict) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    return shown.split("JobState=")[1].split()[0] if "JobState=" in shown else "UNKNOWN"


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(slurm: dict, tmp_path, args: list[str], **env) -> tuple[str, object]:
    log = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", f"--output={log}", str(SBATCH), *args],
        env={**slurm, "PYTHON": PYTHON, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], log


@pytest.mark.distributed
def test_sbatch_trains_on_two_slurm_nodes(slurm, tiny_run, tmp_path):
    job, log = _submit(slurm, tmp_path, [*tiny_run, "train.steps=3"], LAUNCHER="torchrun")
    final = _wait_for(
        lambda: (s := _job_state(job, slurm)) in ENDED and s, timeout=300, what="the job to end"
    )
    text = log.read_text()
    assert final == "COMPLETED", text[-4000:]
    assert "2 process(es)" in text
    # The default run name is <job name>-<job id>.
    summary = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert summary["steps"] == 3 and summary["run_dir"].endswith(f"pretrain-{job}")


@pytest.mark.distributed
def test_sbatch_time_limit_warning_checkpoints_requeues_and_resumes(slurm, tiny_run, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@180 sends before the time limit): the
    2-node job checkpoints, requeues itself, and its second start resumes and finishes, with the
    same W&B run id."""
    run_dir = tmp_path / "runs" / "preempted"
    args = [*tiny_run, "train.steps=30", "logging.log_every=1", "train.run_name=preempted"]
    job, log = _submit(slurm, tmp_path, [*args, "logging.wandb=true"], WANDB_MODE="offline")
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text(), timeout=300, what="step 1")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True, timeout=30)
    _wait_for(lambda: "requeueing job" in log.read_text(), timeout=120, what="the requeue")

    # A requeued job waits 2 minutes before it may start again, so that the credential of its
    # first start, revoked at the requeue (1-second resolution), cannot match its next one.
    # Once the first start is gone, let it start after a few seconds instead.
    _wait_for(lambda: _job_state(job, slurm) == "PENDING", timeout=120, what="the job to pend")
    time.sleep(3)

    def started_again():
        if _job_state(job, slurm) == "PENDING":
            update = ["scontrol", "update", f"jobid={job}", "starttime=now"]
            subprocess.run(update, env=slurm, capture_output=True, timeout=30)
        return "resumed at step" in log.read_text() or _job_state(job, slurm) in ENDED

    _wait_for(started_again, timeout=300, what="the requeued job to start")
    final = _wait_for(
        lambda: (s := _job_state(job, slurm)) in ENDED and s,
        timeout=300,
        what="the requeued job to finish",
    )
    text = log.read_text()
    assert final == "COMPLETED", text[-4000:]
    stopped_at = int(text.split("stopped by SIGUSR1 after step ")[1].split()[0])
    assert 1 <= stopped_at < 30
    assert f"resumed at step {stopped_at}" in text
    assert list_checkpoints(run_dir)[-1].name == "step_0000030"
    # Both starts logged to the same W&B run (offline folders end with the run id).
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
