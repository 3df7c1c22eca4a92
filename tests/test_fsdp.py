"""FSDP2 with real processes on CPU (torch's fully_shard over gloo: accelerate shards GPU process
groups only). Two sharded processes equal one unsharded process on the global batch, in float64,
with and without activation checkpointing; each holds about half the parameter and optimizer
bytes; and the shipped recipe
(launch/accelerate_fsdp_vit_large.yaml, 2 processes here) trains, draws pictures, checkpoints,
exports an encoder timm loads strictly, and, killed with SIGKILL mid-run and rerun, ends
bit-identical to an uninterrupted run.
"""

import json
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from helpers import (
    PYTHON,
    ROOT,
    WORKERS,
    free_port,
    kill_after_checkpoint,
    kill_tree,
    python_env,
)
from safetensors.torch import load_file

from pretrain.checkpoint import latest_checkpoint, load_checkpoint

EXACT = 1e-10  # relative to the largest magnitude compared
TIMEOUT = 300
STEPS = 6
RECIPE = ROOT / "launch" / "accelerate_fsdp_vit_large.yaml"


def torchrun(processes: int, script, *args, cwd) -> None:
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd
    )
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join(worker_lines)[-3000:] or result.stderr[-3000:]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """MAE optimizer steps (tests/workers/fsdp_step_worker.py) on 1 and on 2 processes, and on
    2 with activation checkpointing ("2ac")."""
    out = tmp_path_factory.mktemp("fsdp_steps")
    worker = WORKERS / "fsdp_step_worker.py"
    for processes in (1, 2):
        torchrun(processes, worker, out / f"{processes}.pt", cwd=out)
    torchrun(2, worker, out / "2ac.pt", "3", "--checkpointing", cwd=out)
    return {w: torch.load(out / f"{w}.pt", weights_only=False) for w in (1, 2, "2ac")}


def relative_difference(got, want) -> float:
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max(relative_difference(got[name], want[name]) for name in got)
    if not isinstance(got, torch.Tensor):
        return 0.0 if got == want else float("inf")
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


@pytest.mark.distributed
@pytest.mark.parametrize("sharded", [2, "2ac"])
def test_two_sharded_processes_equal_one_process_on_the_global_batch(steps, sharded):
    one, two = steps[1], steps[sharded]
    assert len(one["losses"]) == 3 and bool((one["grad_norms"] > 0.5).all()), "clipping active"
    for quantity in ("losses", "grad_norms", "params"):
        difference = relative_difference(two[quantity], one[quantity])
        assert difference <= EXACT, f"{quantity} off by {difference:.2e}"
    assert two["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    difference = relative_difference(two["optimizer"]["state"], one["optimizer"]["state"])
    assert difference <= EXACT, f"optimizer state off by {difference:.2e}"


@pytest.mark.distributed
def test_each_rank_holds_half_the_parameter_and_optimizer_bytes(steps):
    (unsharded,) = steps[1]["bytes"]
    total = unsharded["parameters"] + unsharded["optimizer"]
    shares = [(held["parameters"] + held["optimizer"]) / total for held in steps[2]["bytes"]]
    print(f"per-rank bytes: unsharded {unsharded}, sharded {steps[2]['bytes']}")
    assert all(0.45 <= share <= 0.55 for share in shares), shares
    assert sum(held["parameters"] for held in steps[2]["bytes"]) == unsharded["parameters"]


# --- the shipped recipe, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_args(demo_dir, tmp_path_factory):
    return [
        f"data.demo_dir={demo_dir}", "data.demo_train_samples=256", "data.demo_val_samples=64",
        "data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=32",
        "data.steps_per_epoch=4", "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
        "mae.decoder_dim=16", "mae.decoder_depth=1", f"train.steps={STEPS}",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "schedule.warmup_steps=2",
        "logging.log_every=1", f"logging.image_every={STEPS}", "logging.wandb=false",
        f"train.output_dir={tmp_path_factory.mktemp('recipe') / 'runs'}",
    ]  # fmt: skip


def launch_recipe(args, log_path) -> subprocess.Popen:
    """accelerate launch with the FSDP recipe, on 2 CPU processes."""
    command = [
        PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(RECIPE),
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        "-m", "pretrain", *args,
    ]  # fmt: skip
    log = open(log_path, "a")
    return subprocess.Popen(
        command, env=python_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(process, log_path) -> str:
    try:
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    return log_path.read_text()


def run_dir_of(args, name) -> Path:
    output_dir = next(a for a in args if a.startswith("train.output_dir=")).split("=", 1)[1]
    return Path(output_dir) / name


@pytest.fixture(scope="module")
def uninterrupted(recipe_args, tmp_path_factory):
    log = tmp_path_factory.mktemp("straight") / "log"
    output = finish(launch_recipe([*recipe_args, "train.run_name=straight"], log), log)
    assert "2 process(es)" in output and "| FSDP |" in output, output[-3000:]
    assert f'"steps": {STEPS}' in output, output[-3000:]
    return run_dir_of(recipe_args, "straight")


@pytest.mark.distributed
def test_the_recipe_trains_draws_checkpoints_and_exports_sharded(uninterrupted):
    run_dir = uninterrupted
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] > 0
    assert (run_dir / "images" / f"reconstruction_step{STEPS:07d}.png").is_file()
    model_state, optimizer_state, state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and not any("_checkpoint_wrapped" in k for k in model_state)
    assert "encoder.blocks.1.attn.qkv.weight" in model_state  # the unsharded layout
    assert sorted(optimizer_state["main"]["state"])[0] == 0  # numbered as Optimizer.state_dict
    card = json.loads((run_dir / "export" / "encoder.json").read_text())
    encoder = timm.create_model(card["timm_name"], **card["timm_kwargs"])
    exported = load_file(run_dir / "export" / "encoder.safetensors")
    encoder.load_state_dict(exported, strict=True)
    for name, tensor in exported.items():
        assert torch.equal(tensor, model_state[f"encoder.{name}"]), name


@pytest.mark.distributed
def test_sigkill_mid_run_then_the_same_command_ends_identically(
    recipe_args, uninterrupted, tmp_path
):
    args = [*recipe_args, "train.run_name=killed"]
    run_dir = run_dir_of(recipe_args, "killed")
    log = tmp_path / "log"
    process = launch_recipe(args, log)
    killed_at = kill_after_checkpoint(process, run_dir, 3)
    assert 3 <= killed_at < STEPS, "the run finished before it could be killed"

    output = finish(launch_recipe(args, log), log)  # the same command again
    assert f"resumed at step {killed_at}" in output, output[-3000:]
    expected = load_checkpoint(latest_checkpoint(uninterrupted))
    resumed = load_checkpoint(latest_checkpoint(run_dir))
    assert resumed[2]["step"] == expected[2]["step"] == STEPS
    for name, tensor in expected[0].items():
        assert torch.equal(tensor, resumed[0][name]), name
    for number, per_parameter in expected[1]["main"]["state"].items():
        for key, value in per_parameter.items():
            assert torch.equal(value, resumed[1]["main"]["state"][number][key]), (number, key)
