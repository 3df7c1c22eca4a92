"""Full negatives under gradient accumulation (pretrain.grad_cache): K = 4 micro-batches per step,
on 1 and on 2 real gloo processes (DDP, and sharded with FSDP), in float64, give the loss,
gradients and parameters after an SGD step of ONE batch of all 16 samples; accumulating each
micro-batch with its own negatives (the plain way) does not. With BatchNorm in the head and drop
path in the encoder, GradCache equals keeping every micro-batch's graph for one loss (its
documented meaning of "one batch").

tests/workers/grad_cache_worker.py runs the step through pretrain.step.optimizer_step.
"""

import subprocess

import pytest
import torch
from helpers import PYTHON, WORKERS, free_port, python_env

CASES = ["simclr", "clip", "siglip"]
EXACT = 1e-10  # relative to the largest magnitude compared (CLIP's logit-scale gradient ~50)
MATERIAL = 1e-3


def run_worker(out, processes: int) -> dict:
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKERS / "grad_cache_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=300, cwd=out.parent
    )
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join(worker_lines)[-3000:] or result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grad_cache")
    return {w: run_worker(folder / f"world{w}.pt", w) for w in (1, 2)}


def relative_difference(got, want) -> float:
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max(relative_difference(got[name], want[name]) for name in got)
    scale = max(1.0, want.abs().max().item())
    return (got - want).abs().max().item() / scale


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_four_micro_batches_equal_one_batch_of_four_times_the_size(results, case, processes):
    variants = results[processes][case]
    for quantity in ("loss", "grads", "params"):
        difference = relative_difference(
            variants["grad_cache"][quantity], variants["reference"][quantity]
        )
        assert difference <= EXACT, (
            f"{case}, {processes} process(es): {quantity} off by {difference:.2e}"
        )


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_it_composes_with_fsdp(results, case):
    variants = results[2][case]
    for quantity in ("loss", "grads", "params"):
        got, want = variants["grad_cache_fsdp"][quantity], variants["reference"][quantity]
        difference = relative_difference(got, want)
        assert difference <= EXACT, f"{case}, FSDP: {quantity} off by {difference:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_accumulating_each_micro_batch_with_its_own_negatives_does_not(results, case, processes):
    variants = results[processes][case]
    for quantity in ("loss", "grads"):
        difference = relative_difference(
            variants["separate"][quantity], variants["reference"][quantity]
        )
        assert difference > MATERIAL, f"{case}: separate {quantity} only {difference:.2e} away"


@pytest.mark.distributed
def test_with_batchnorm_and_drop_path_it_equals_keeping_every_graph(results):
    """BatchNorm statistics per micro-batch, running statistics updated once per micro-batch,
    and drop path replayed with the same draws in the recomputation."""
    variants = results[1]["simclr_batchnorm"]
    for quantity in ("loss", "grads", "params", "buffers"):
        got, want = variants["grad_cache"][quantity], variants["kept_graphs"][quantity]
        difference = relative_difference(got, want)
        assert difference <= EXACT, f"{quantity} off by {difference:.2e}"
    buffers = variants["grad_cache"]["buffers"]
    tracked = [v for name, v in buffers.items() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 4 for v in tracked), "running statistics: once per micro-batch"
