"""Global BatchNorm (pretrain.models.global_batchnorm): 2 real gloo processes equal one process on
the global batch in float64 (loss, gradients, running statistics), per-process BatchNorm does
not; and in the engine (on by default with several processes) the running statistics are the
same on every rank, in the checkpoint and in the export.

tests/workers/batchnorm_worker.py: SimCLR with BatchNorm2d in the encoder (dcgan_encoder) and
BatchNorm1d in the projection head, two SGD steps.
"""

import subprocess

import pytest
import timm
import torch
import torch.nn as nn
from helpers import PYTHON, WORKERS, free_port, python_env, train_on_two_ranks
from safetensors.torch import load_file

from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.models.global_batchnorm import GlobalBatchNorm, use_global_batchnorm

EXACT = 1e-10  # relative to the largest magnitude compared
MATERIAL = 1e-3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("batchnorm")
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKERS / "batchnorm_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=300, cwd=out
    )
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join(worker_lines)[-3000:] or result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def relative_difference(got, want) -> float:
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max(relative_difference(got[name], want[name]) for name in got)
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


QUANTITIES = ["losses", "grads", "params", "buffers"]


@pytest.mark.distributed
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_two_processes_with_global_batchnorm_equal_one_process(ranks, quantity):
    assert ranks[0]["replaced_layers"] == 2  # the encoder's BatchNorm2d, the head's BatchNorm1d
    for rank in (0, 1):
        got, want = ranks[rank]["global"][quantity], ranks[rank]["reference"][quantity]
        difference = relative_difference(got, want)
        assert difference <= EXACT, f"rank {rank}: {quantity} off by {difference:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_per_process_batchnorm_is_a_different_model(ranks, quantity):
    got, want = ranks[0]["per_process"][quantity], ranks[0]["reference"][quantity]
    difference = relative_difference(got, want)
    assert difference > MATERIAL, f"per-process {quantity} only {difference:.2e} away"


@pytest.mark.distributed
def test_running_statistics_agree_across_ranks_only_when_global(ranks):
    for name, value in ranks[0]["global"]["buffers"].items():
        assert torch.equal(value, ranks[1]["global"]["buffers"][name]), name
    assert (
        relative_difference(ranks[0]["per_process"]["buffers"], ranks[1]["per_process"]["buffers"])
        > MATERIAL
    )


def test_conversion_keeps_parameters_buffers_and_keys():
    encoder = timm.create_model("resnet10t", num_classes=0)
    encoder.train()
    before = {name: tensor for name, tensor in encoder.state_dict().items()}
    parameters = {name: id(p) for name, p in encoder.named_parameters()}
    converted, replaced = use_global_batchnorm(encoder, torch.device("cpu"))
    assert (
        converted is encoder
        and replaced == sum(isinstance(m, GlobalBatchNorm) for m in encoder.modules()) > 0
    )
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in encoder.modules())
    assert {name: id(p) for name, p in encoder.named_parameters()} == parameters
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # same storage
    # timm loads the converted model's state into a plain one, strictly
    timm.create_model("resnet10t", num_classes=0).load_state_dict(after, strict=True)
    # one process: plain BatchNorm
    plain = timm.create_model("resnet10t", num_classes=0)
    plain.load_state_dict(after)
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(converted(images), plain.train()(images), atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("sync", [True, False])
def test_engine_running_statistics_are_the_same_on_every_rank(demo_dir, tmp_path, sync):
    """A 2-process SimCLR run of the engine, GradCache over 2 micro-batches included."""
    overrides = [
        "objective.name=simclr", f"data.demo_dir={demo_dir}", "data.demo_train_samples=256",
        "data.demo_val_samples=64", "data.batch_size=8", "data.num_workers=1",
        "data.shuffle_buffer=32", "data.steps_per_epoch=4", "model.name=dcgan_encoder",
        "model.kwargs={width: 8, depth: 3}", "simclr.projection_hidden_dim=32",
        "simclr.projection_dim=16", "train.steps=3", "train.grad_accum=2",
        "schedule.warmup_steps=1", "logging.log_every=1", "logging.image_every=0",
        "logging.wandb=false", f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=bn", f"train.sync_batchnorm={str(sync).lower()}",
    ]  # fmt: skip
    rank0, rank1, output = train_on_two_ranks(tmp_path, overrides)
    assert "GradCache over 2 micro-batches" in output, output[-2000:]
    statistics = [name for name in rank0 if "running_" in name]
    assert len(statistics) == 2 * 3  # mean and var of 3 BatchNorm layers
    differs = [name for name in statistics if not torch.equal(rank0[name], rank1[name])]
    assert differs == [] if sync else differs, differs
    saved = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "bn"))[0]
    export = load_file(tmp_path / "runs" / "bn" / "export" / "encoder.safetensors")
    for name in statistics:
        assert torch.equal(saved[name], rank0[name])
        if name.startswith("encoder."):
            assert torch.equal(export[name[len("encoder.") :]], rank0[name])
