"""Exact global negatives: 2 real gloo processes match one process on the global batch.

tests/contrastive_worker.py does one float64 training step per loss on each process's half of a
fixed batch; here the DDP results are compared with the single-process reference: the mean of
the process losses, the DDP-averaged gradients, and the parameters after one SGD step must agree
to 1e-10. Two wrong variants run alongside and must NOT agree, proving the check can fail:
local negatives only, and a plain dist.all_gather (right loss values, no gradient path).
"""

import subprocess

import pytest
import torch
from helpers import PYTHON, WORKERS, free_port, python_env

from pretrain.distributed import gather_with_grad, world_info

LOSSES = ["nt_xent", "clip", "siglip"]
EXACT = 1e-10
MATERIAL = 1e-3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both processes: [rank0, rank1], each {loss name: {variant: step results}}."""
    out = tmp_path_factory.mktemp("contrastive")
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKERS / "contrastive_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=120, cwd=out
    )
    # The workers' tracebacks come before torchrun's summary: show those lines first.
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join(worker_lines)[-3000:] or result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def largest_difference(got, want) -> float:
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max(largest_difference(got[name], want[name]) for name in got)
    return (got - want).abs().max().item()


def assert_same(quantity: str, got, want):
    difference = largest_difference(got, want)
    assert difference <= EXACT, f"{quantity} differs from one process by {difference:.3e}"


def assert_differs(quantity: str, got, want):
    difference = largest_difference(got, want)
    assert difference > MATERIAL, f"{quantity} should differ but only by {difference:.3e}"


def mean_loss(ranks, name, variant):
    return (ranks[0][name][variant]["loss"] + ranks[1][name][variant]["loss"]) / 2


def test_single_process_gather_is_the_identity():
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x


@pytest.mark.distributed
def test_gather_orders_by_rank_and_rejects_uneven_batches(ranks):
    for rank, results in enumerate(ranks):
        facts = results["facts"]
        assert facts["world_info"] == (rank, 2)
        assert facts["gathered"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
        error = facts["uneven_error"]
        assert "same shape on every process" in error and "(2, 3), (3, 3)" in error, error


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOSSES)
def test_global_negatives_match_one_process(ranks, name):
    reference = ranks[0][name]["reference"]
    assert_same(f"{name}: reference on rank 1", ranks[1][name]["reference"], reference)
    assert_same(
        f"{name}: mean of process losses", mean_loss(ranks, name, "global"), reference["loss"]
    )
    for rank in (0, 1):
        step = ranks[rank][name]["global"]
        assert_same(f"{name}: DDP gradients on rank {rank}", step["grads"], reference["grads"])
        assert_same(
            f"{name}: parameters after SGD on rank {rank}", step["params"], reference["params"]
        )
    # The two halves really differ, so agreement above is not a trivial coincidence.
    assert_differs(
        f"{name}: rank 0 vs rank 1 loss",
        ranks[0][name]["global"]["loss"],
        ranks[1][name]["global"]["loss"],
    )


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOSSES)
def test_local_negatives_are_a_different_objective(ranks, name):
    reference = ranks[0][name]["reference"]
    assert_differs(
        f"{name}: local-negatives loss",
        mean_loss(ranks, name, "local_negatives"),
        reference["loss"],
    )
    assert_differs(
        f"{name}: local-negatives gradients",
        ranks[0][name]["local_negatives"]["grads"],
        reference["grads"],
    )


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOSSES)
def test_plain_all_gather_gets_the_loss_right_and_the_gradients_wrong(ranks, name):
    reference = ranks[0][name]["reference"]
    assert_same(
        f"{name}: plain all_gather loss",
        mean_loss(ranks, name, "plain_all_gather"),
        reference["loss"],
    )
    assert_differs(
        f"{name}: plain all_gather gradients",
        ranks[0][name]["plain_all_gather"]["grads"],
        reference["grads"],
    )
