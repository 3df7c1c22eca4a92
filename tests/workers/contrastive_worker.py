"""Run by 2 gloo processes (torchrun) for tests/test_contrastive_distributed.py.

Every process computes, in float64, the single-process reference on the whole global batch and
three distributed versions of one training step on its own half of it: negatives gathered with
gradient (gather_with_grad), negatives gathered by a plain dist.all_gather (no gradient), and
local negatives only. It saves losses, DDP-averaged gradients and parameters after one SGD step
to OUT/rank{r}.pt; the test compares them.

Usage: torchrun --nproc_per_node 2 tests/contrastive_worker.py OUT
"""

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.distributed import gather_with_grad, world_info
from pretrain.losses import clip_loss, nt_xent, siglip_loss

LOCAL_BATCH = 4
INPUT_WIDTH, TEXT_WIDTH, HIDDEN, FEATURES = 6, 5, 8, 4
TEMPERATURE = 0.2
LEARNING_RATE = 0.5  # SGD, not AdamW: its first step is ~lr * sign(grad), blind to scale errors


class SimCLRToy(nn.Module):
    """Encoder + projection head; both views go through one forward (one DDP call per step)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(INPUT_WIDTH, HIDDEN)
        self.projector = nn.Linear(HIDDEN, FEATURES)

    def forward(self, view1, view2):  # (B, INPUT_WIDTH) each -> z1, z2: (B, FEATURES) each
        z = self.projector(torch.tanh(self.encoder(torch.cat([view1, view2]))))
        return z.chunk(2)


class TwoTowerToy(nn.Module):
    """Image and text towers with CLIP's learnable logit scale (and SigLIP's bias)."""

    def __init__(self, scale_init: float, bias_init: float | None):
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Linear(INPUT_WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, FEATURES)
        )
        self.text_tower = nn.Linear(TEXT_WIDTH, FEATURES)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale_init)))
        self.logit_bias = None if bias_init is None else nn.Parameter(torch.tensor(bias_init))

    def forward(self, images, texts):
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # 0-dim
        return self.image_tower(images), self.text_tower(texts), scale, self.logit_bias


@dataclass
class Case:
    make_model: Callable[[], nn.Module]
    loss: Callable  # (model outputs, (a_all, b_all) or (None, None), offset) -> 0-dim loss
    inputs: str  # which global inputs the model takes: "views" or "pairs"


CASES = {
    "nt_xent": Case(
        make_model=SimCLRToy,
        loss=lambda out, everyone, offset: nt_xent(out[0], out[1], TEMPERATURE, *everyone, offset),
        inputs="views",
    ),
    "clip": Case(
        make_model=lambda: TwoTowerToy(scale_init=1 / 0.07, bias_init=None),
        loss=lambda out, everyone, offset: clip_loss(out[0], out[1], out[2], *everyone, offset),
        inputs="pairs",
    ),
    "siglip": Case(
        make_model=lambda: TwoTowerToy(scale_init=10.0, bias_init=-2.0),
        loss=lambda out, everyone, offset: siglip_loss(
            out[0], out[1], out[2], out[3], *everyone, offset
        ),
        inputs="pairs",
    ),
}


def global_batch(world_size):
    """The same fixed global batch on every process: N = world_size * LOCAL_BATCH rows."""
    generator = torch.Generator().manual_seed(0)
    total = world_size * LOCAL_BATCH
    images = torch.randn(total, INPUT_WIDTH, generator=generator)
    second_view = images + 0.3 * torch.randn(total, INPUT_WIDTH, generator=generator)
    texts = torch.randn(total, TEXT_WIDTH, generator=generator)
    return {"views": (images, second_view), "pairs": (images, texts)}


def gather_without_grad(x):
    """The tempting mistake: dist.all_gather returns the right values but no gradient path."""
    pieces = [torch.empty_like(x) for _ in range(world_info()[1])]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces)


def one_step(case, module, inputs, rows, gather, offset):
    """Forward, loss, backward, one SGD step; returns the loss, gradients and new parameters."""
    named = (
        module.module if isinstance(module, DistributedDataParallel) else module
    ).named_parameters
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    out = module(*(tensor[rows] for tensor in inputs))
    everyone = (None, None) if gather is None else (gather(out[0]), gather(out[1]))
    loss = case.loss(out, everyone, offset)
    loss.backward()  # DDP averages the gradients across processes here
    # No gradient at all (SigLIP's text tower behind a plain all_gather) counts as zero.
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in named()
    }
    optimizer.step()
    params = {name: p.detach().clone() for name, p in named()}
    return {"loss": loss.detach(), "grads": grads, "params": params}


def run_case(case, rank, world_size):
    inputs = global_batch(world_size)[case.inputs]
    torch.manual_seed(1)
    initial = case.make_model().state_dict()

    def fresh_model():
        model = case.make_model()
        model.load_state_dict(initial)
        return model

    everything = slice(None)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {"reference": one_step(case, fresh_model(), inputs, everything, None, 0)}
    for variant, gather in [
        ("global", gather_with_grad),
        ("plain_all_gather", gather_without_grad),
        ("local_negatives", None),
    ]:
        model = DistributedDataParallel(fresh_model())
        offset = rank * LOCAL_BATCH if gather is not None else 0
        results[variant] = one_step(case, model, inputs, mine, gather, offset)
    return results


def gather_facts(rank):
    """World info, gather order, and the error for unequal local batches."""
    gathered = gather_with_grad(torch.full((2, 1), float(rank)))
    try:
        gather_with_grad(torch.zeros(2 + rank, 3))
        uneven_error = ""
    except ValueError as error:
        uneven_error = str(error)
    return {"world_info": world_info(), "gathered": gathered, "uneven_error": uneven_error}


def main(out: Path):
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    rank, world_size = world_info()
    results = {name: run_case(case, rank, world_size) for name, case in CASES.items()}
    results["facts"] = gather_facts(rank)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
