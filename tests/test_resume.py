"""Resuming on another number of processes (pretrain.resume): the batch layout keeps the global
batch; real runs checkpointed on 2 processes (sharded) continue on 1, and on 1 continue on 2
(sharded), from the same step with the same weights and optimizer state, the same global batch
and lr schedule; and fp16's loss scale survives a checkpoint.
"""

import copy
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import PYTHON, WORKERS, free_port, python_env

from pretrain.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.optim import learning_rate
from pretrain.resume import BatchLayout, batch_layout, checkpoint_extras, restore_grad_scaler


def layout_after(saved: BatchLayout, processes: int) -> BatchLayout:
    config = load_config(None, ["data.batch_size=999", "train.grad_accum=7"])  # not used
    return batch_layout(config, processes, saved.as_state())[0]


@pytest.mark.parametrize(
    "saved, processes, expected",
    [
        (BatchLayout(2, 16, 1), 1, BatchLayout(1, 16, 2)),  # 2 -> 1: twice the micro-batches
        (BatchLayout(1, 16, 2), 2, BatchLayout(2, 16, 1)),  # and back
        (BatchLayout(1, 16, 1), 2, BatchLayout(2, 8, 1)),  # 1 -> 2: half the per-process batch
        (BatchLayout(4, 6, 1), 3, BatchLayout(3, 4, 2)),  # 24 samples: 8 each, as 4 x 2
        (BatchLayout(2, 8, 4), 2, BatchLayout(2, 8, 4)),  # the same world: the checkpoint's
    ],
)
def test_another_world_size_keeps_the_global_batch(saved, processes, expected):
    after = layout_after(saved, processes)
    assert after == expected and after.global_batch == saved.global_batch
    assert after.batch_size <= saved.batch_size  # never more memory per micro-batch


def test_a_global_batch_the_processes_cannot_share_is_refused_in_one_line():
    config = load_config(None, [])
    with pytest.raises(ConfigError) as error:
        batch_layout(config, 3, BatchLayout(2, 8, 1).as_state())
    assert "global batch of 16" in str(error.value) and "\n" not in str(error.value)


def test_the_same_world_keeps_the_checkpoint_layout_and_says_so_if_the_config_differs():
    config = load_config(None, ["data.batch_size=8", "train.grad_accum=1"])
    saved = BatchLayout(1, 8, 2).as_state()  # moved from 2 processes to 1 earlier
    layout, note = batch_layout(config, 1, saved)
    assert layout == BatchLayout(1, 8, 2) and "the config says 8 x 1" in note
    assert batch_layout(config, 1, BatchLayout(1, 8, 1).as_state()) == (BatchLayout(1, 8, 1), "")


def test_a_new_run_or_an_old_checkpoint_uses_the_config():
    config = load_config(None, ["data.batch_size=12", "train.grad_accum=2"])
    assert batch_layout(config, 4, None) == (BatchLayout(4, 12, 2), "")
    assert batch_layout(config, 4, {"step": 10}) == (BatchLayout(4, 12, 2), "")


# --- fp16's loss scale ---------------------------------------------------------------------------


def fp16_steps(scaler, model, optimizer, count: int, overflow_at: int | None = None):
    """Real GradScaler steps on CPU (fp16 autocast); an Inf gradient at step `overflow_at`."""
    for index in range(count):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.ones(2, 4)).float().sum()
        scaler.scale(loss).backward()
        if index == overflow_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    """accelerate keeps fp16 (and its GradScaler) for GPUs; on this CPU the scaler object itself
    goes through the engine's save and restore functions."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = dict(init_scale=2.0**12, growth_interval=10)
    scaler = torch.amp.GradScaler("cpu", **options)
    fp16_steps(scaler, model, optimizer, 5, overflow_at=1)  # backs off once, then counts
    trained = scaler.state_dict()
    assert trained["scale"] == 2.0**11 and trained["_growth_tracker"] == 3

    extras = checkpoint_extras(BatchLayout(1, 2, 1), SimpleNamespace(scaler=scaler))
    saved = save_checkpoint(tmp_path, 5, model.state_dict(), optimizer.state_dict(), extras, 0)
    state = load_checkpoint(saved)[2]
    fresh = torch.amp.GradScaler("cpu", **options)
    assert fresh.state_dict() != trained  # what a resume without it would start from
    restore_grad_scaler(fresh, state)
    assert fresh.state_dict() == trained
    # and both continue alike
    fp16_steps(scaler, model, optimizer, 3, overflow_at=2)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    fp16_steps(fresh, twin, torch.optim.SGD(twin.parameters(), lr=0.1), 3, overflow_at=2)
    assert fresh.state_dict() == scaler.state_dict()


def test_without_a_scaler_nothing_is_saved_or_restored():
    assert "grad_scaler" not in checkpoint_extras(
        BatchLayout(1, 2, 1), SimpleNamespace(scaler=None)
    )
    restore_grad_scaler(None, {"grad_scaler": {"scale": 1.0}})  # fp16 off now: ignored


# --- real runs on 2 and 1 processes --------------------------------------------------------------


@pytest.fixture
def run_args(demo_dir, tmp_path):
    return [
        f"data.demo_dir={demo_dir}", "data.demo_train_samples=256", "data.demo_val_samples=64",
        "data.num_workers=1", "data.shuffle_buffer=32", "data.steps_per_epoch=4",
        "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "mae.decoder_dim=16",
        "mae.decoder_depth=1", "train.checkpoint_every=1", "train.keep_checkpoints=0",
        "schedule.warmup_steps=2", "logging.log_every=1", "logging.image_every=0",
        "logging.wandb=false", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=moved",
    ]  # fmt: skip


def run(processes: int, out: Path, args: list[str]) -> str:
    """tests/workers/restore_worker.py under torchrun; returns its output."""
    out.mkdir(exist_ok=True)
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKERS / "restore_worker.py"), str(out), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=300, cwd=out
    )
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join(worker_lines)[-3000:] or result.stderr[-3000:]
    return result.stdout + result.stderr


def plain(value):
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def assert_restored_exactly(started: dict, checkpoint: Path):
    model, optimizers, state = load_checkpoint(checkpoint)
    assert started["start_step"] == state["step"]
    assert started["model"].keys() == model.keys()
    for name, tensor in model.items():
        assert torch.equal(started["model"][name], tensor), name
    restored, saved = started["optimizers"]["main"], optimizers["main"]
    # (betas may come back as a list where a tuple was saved: the same values)
    assert plain(restored["param_groups"]) == plain(saved["param_groups"])
    assert restored["state"].keys() == saved["state"].keys()
    for number, per_parameter in saved["state"].items():
        for key, value in per_parameter.items():
            assert torch.equal(restored["state"][number][key], value), (number, key)


def assert_continues_the_schedule(run_dir: Path, global_batch: int, first: int, last: int):
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, last + 1))
    base_lr = 1.5e-4 * global_batch / 256  # the default blr
    for m in metrics[first:]:
        assert m["lr"] == pytest.approx(learning_rate(m["step"] - 1, base_lr, 2, last, 0.0))
    assert list_checkpoints(run_dir)[-1].name == f"step_{last:07d}"


@pytest.mark.distributed
def test_two_sharded_processes_continue_on_one(run_args, tmp_path):
    first = [*run_args, "data.batch_size=8", "train.steps=2", "train.fsdp=true"]
    run(2, tmp_path / "two", first)
    output = run(1, tmp_path / "one", [*run_args, "data.batch_size=8", "train.steps=4"])
    started = torch.load(tmp_path / "one" / "start.pt", weights_only=False)
    assert started["layout"] == {"world_size": 1, "batch_size": 8, "grad_accum": 2}
    assert not started["sharded"]
    assert "resumed at step 2" in output and "global batch 16" in output, output[-2000:]
    assert "checkpoint from 2 process(es): per process 8 x 1 micro-batch(es) -> 8 x 2" in output
    run_dir = tmp_path / "runs" / "moved"
    assert_restored_exactly(started, run_dir / "checkpoints" / "step_0000002")
    assert_continues_the_schedule(run_dir, 16, 2, 4)


@pytest.mark.distributed
def test_one_process_continues_on_two_sharded(run_args, tmp_path):
    run(1, tmp_path / "one", [*run_args, "data.batch_size=8", "train.steps=2"])
    later = [*run_args, "data.batch_size=8", "train.steps=4", "train.fsdp=true"]
    output = run(2, tmp_path / "two", later)
    started = torch.load(tmp_path / "two" / "start.pt", weights_only=False)
    assert started["layout"] == {"world_size": 2, "batch_size": 4, "grad_accum": 1}
    assert started["sharded"]
    assert "resumed at step 2" in output and "global batch 8" in output, output[-2000:]
    run_dir = tmp_path / "runs" / "moved"
    assert_restored_exactly(started, run_dir / "checkpoints" / "step_0000002")
    assert_continues_the_schedule(run_dir, 8, 2, 4)


def test_clip_checkpoints_with_0_dim_scalars_still_load_and_train():
    """CLIP's logit scale and SigLIP's bias are (1,) now (FSDP shards no 0-dim parameter);
    checkpoints that hold them as 0-dim, weights and AdamW state alike, load and step on."""
    from pretrain.objectives import build_objective
    from pretrain.optim import build_optimizer, optimizer_phases
    from pretrain.sharding import load_state

    overrides = [
        "objective.name=clip", "clip.loss=siglip", "data.image_size=16", "model.patch_size=8",
        "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}", "clip.embed_dim=8",
        "clip.context_length=8", "clip.text_width=16", "clip.text_layers=1", "clip.text_heads=2",
    ]  # fmt: skip
    config = load_config(None, overrides)

    def built():
        torch.manual_seed(0)
        objective = build_objective(config)[0]
        phases = optimizer_phases(objective)
        return objective, phases, [build_optimizer(phases["main"], set(), config.optimizer, 1e-3)]

    def train_step(objective, optimizer):
        batch = {"image": torch.randn(4, 3, 16, 16), "text": objective.tokenize(["a"] * 4)}
        objective(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    objective, phases, (optimizer,) = built()
    train_step(objective, optimizer)
    # copies, as from a file (a loaded optimizer would share these tensors otherwise)
    model_state = copy.deepcopy(objective.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scalars = {"log_logit_scale", "logit_bias"}
    old_model = {k: v.reshape(()) if k in scalars else v for k, v in model_state.items()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in phases["main"]}
    old_state = {
        number: {
            key: value.reshape(())
            if names[id(order[number])] in scalars and key != "step"
            else value
            for key, value in per_parameter.items()
        }
        for number, per_parameter in optimizer_state["state"].items()
    }
    assert any(v["exp_avg"].dim() == 0 for v in old_state.values())
    fresh, fresh_phases, (fresh_optimizer,) = built()
    load_state(fresh, [fresh_optimizer], fresh_phases, old_model,
               {"main": {**optimizer_state, "state": old_state}})  # fmt: skip
    assert fresh.log_logit_scale.shape == (1,) and fresh.logit_bias.shape == (1,)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model_state[name]), name
    torch.manual_seed(1)
    train_step(fresh, fresh_optimizer)
    torch.manual_seed(1)
    train_step(objective, optimizer)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, objective.state_dict()[name]), name
