"""Run by torchrun (2 processes) for tests/test_global_batchnorm.py: two SGD steps of SimCLR in
float64 with BatchNorm in the encoder (dcgan_encoder: BatchNorm2d) and in the projection head
(BatchNorm1d), on a fixed global batch of 8 images, in three ways:

    reference    one process on the whole global batch (every rank computes it alone: local
                 negatives over the whole batch are the global batch's; plain BatchNorm)
    global       each process on its half, DDP, BatchNorm layers made global as the engine makes
                 them with more than one process (use_global_batchnorm)
    per_process  each process on its half, DDP, plain BatchNorm (train.sync_batchnorm=false)

Every rank saves {variant: {"losses", "grads", "params", "buffers"}} to OUT/rank{r}.pt: the
losses of both steps (mean over processes), the first step's gradients, the parameters and
BatchNorm buffers (running statistics) after both.

usage: batchnorm_worker.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import load_config
from pretrain.models.global_batchnorm import use_global_batchnorm
from pretrain.objectives import build_objective

GLOBAL_BATCH, STEPS, LR = 8, 2, 0.1


def build(negatives: str):
    config = load_config(
        None,
        [
            "objective.name=simclr",
            "data.image_size=16",
            "model.name=dcgan_encoder",
            "model.kwargs={width: 8, depth: 2}",
            "simclr.projection_layers=2",
            "simclr.projection_hidden_dim=16",
            "simclr.projection_dim=8",
            f"simclr.negatives={negatives}",
        ],
    )
    torch.manual_seed(0)
    return build_objective(config)[0]


def train(objective, model, batches) -> dict:
    optimizer = torch.optim.SGD(objective.parameters(), lr=LR)
    losses, first_grads = [], None
    for batch in batches:
        loss = model(batch)["loss"]
        loss.backward()  # DDP averages the gradients over processes
        mean = loss.detach().clone()
        if dist.get_world_size() > 1 and model is not objective:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in objective.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return {
        "losses": torch.stack(losses),
        "grads": first_grads,
        "params": {n: p.detach().clone() for n, p in objective.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in objective.named_buffers()},
    }


def main(out: Path) -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    batches = [
        {
            "image": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator),
            "image2": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator),
        }
        for _ in range(STEPS)
    ]
    share = GLOBAL_BATCH // world
    halves = [{k: v[rank * share : (rank + 1) * share] for k, v in b.items()} for b in batches]

    reference = build("local")
    results = {"reference": train(reference, reference, batches)}
    converted, replaced = use_global_batchnorm(build("global"), torch.device("cpu"))
    results["global"] = train(converted, DistributedDataParallel(converted), halves)
    results["replaced_layers"] = replaced
    plain = build("global")
    results["per_process"] = train(plain, DistributedDataParallel(plain), halves)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
