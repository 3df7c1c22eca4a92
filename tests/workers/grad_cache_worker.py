"""Run by torchrun (1 or 2 processes) for tests/test_grad_cache.py: one optimizer step of a
contrastive objective in float64 over a fixed global batch of 16 samples, split into K = 4
micro-batches per process, through pretrain.step.optimizer_step, in three ways:

    reference   one process, one batch of all 16 samples, no accumulation (every rank computes
                it alone: local negatives over the whole batch are the global batch's)
    grad_cache  this process's 16 / W samples as 4 micro-batches, GradCache (the engine's way)
    grad_cache_fsdp  (2 processes) the same, the objective sharded (FSDP2) instead of DDP
    separate    the same micro-batches, each with its own loss and negatives (no GradCache)

and, with one process only, SimCLR with BatchNorm in its projection head and drop path in its
encoder against "kept graphs": the 4 micro-batches' embeddings computed with their graphs in
order (the same RNG stream), one loss over all of them, one backward.

Rank 0 saves {case: {variant: {"loss", "grads", "params", "buffers"}}} to OUT.

usage: grad_cache_worker.py OUT
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pretrain import sharding
from pretrain.config import load_config
from pretrain.distributed import make_accelerator
from pretrain.grad_cache import GradCache
from pretrain.objectives import build_objective
from pretrain.optim import optimizer_phases
from pretrain.step import optimizer_step

GLOBAL_BATCH, MICRO_BATCHES, LR = 16, 4, 0.5
TINY = [
    "data.image_size=16",
    "model.patch_size=8",
    "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
    "simclr.projection_dim=8",
    "simclr.projection_hidden_dim=16",
    "clip.embed_dim=8",
    "clip.context_length=8",
    "clip.text_width=16",
    "clip.text_layers=1",
    "clip.text_heads=2",
]
CASES = {  # BatchNorm-free: W processes x K micro-batches must equal one batch exactly
    "simclr": ["objective.name=simclr", "simclr.projection_layers=1"],
    "clip": ["objective.name=clip"],
    "siglip": ["objective.name=clip", "clip.loss=siglip", "clip.siglip_init_bias=-2.0"],
}
# BatchNorm in the head, drop path in the encoder: equal to the kept-graphs reference
BATCHNORM_CASE = [
    "objective.name=simclr",
    "simclr.projection_layers=2",
    "model.kwargs={depth: 2, drop_path_rate: 0.3, proj_drop_rate: 0.1}",
]


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it stepped with."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def fixed_global_batch(objective) -> dict:
    generator = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, 3, 16, 16)
    batch = {"image": torch.randn(shape, generator=generator, dtype=torch.float64)}
    if hasattr(objective, "tokenize"):
        words = ["red", "green", "blue", "circle", "square", "small", "large", "left"]
        batch["text"] = objective.tokenize(
            [f"a {words[i % 8]} {words[(3 * i + 1) % 8]} {i}" for i in range(GLOBAL_BATCH)]
        )
    else:
        batch["image2"] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return batch


def build(overrides: list[str], negatives: str):
    config = load_config(None, [*TINY, *overrides, f"simclr.negatives={negatives}",
                                f"clip.negatives={negatives}"])  # fmt: skip
    torch.manual_seed(0)  # the same initial weights for every variant
    return build_objective(config)[0]


def step(accelerator, objective, model, micro_batches, accumulate):
    """One optimizer step; returns the mean loss over processes, gradients, parameters."""
    phases = optimizer_phases(objective)
    optimizer = RecordingSGD([p for _, p in phases["main"]], lr=LR)
    losses = []
    torch.manual_seed(7)  # the engine seeds every step
    optimizer_step(
        accelerator, model, phases, [optimizer], micro_batches,
        lambda batch, phase: model(batch), LR,
        on_outputs=lambda outputs, phase: losses.append(outputs["loss"].detach()),
        accumulate=accumulate,
    )  # fmt: skip
    loss = torch.stack(losses).mean()  # over micro-batches
    if dist.get_world_size() > 1:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    names = [name for name, _ in phases["main"]]
    whole = sharding.replicated  # sharded tensors as the whole tensor
    return {
        "loss": loss,
        "grads": {name: whole(grad) for name, grad in zip(names, optimizer.grads)},
        "params": {name: whole(p.detach()).clone() for name, p in phases["main"]},
        "buffers": {name: b.detach().clone() for name, b in objective.named_buffers()},
    }


def micro_batches_of(batch: dict, rank: int, world: int) -> list[dict]:
    """This process's share of the global batch, as MICRO_BATCHES micro-batches."""
    share = GLOBAL_BATCH // world
    mine = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    size = share // MICRO_BATCHES
    return [
        {key: value[k * size : (k + 1) * size] for key, value in mine.items()}
        for k in range(MICRO_BATCHES)
    ]


def run_case(accelerator, overrides, rank, world) -> dict:
    reference = build(overrides, "local")
    batch = fixed_global_batch(reference)
    results = {"reference": step(accelerator, reference, reference, [batch], None)}
    for variant in ("grad_cache", "separate", "grad_cache_fsdp")[: 3 if world > 1 else 2]:
        objective = build(overrides, "global")
        model = DistributedDataParallel(objective) if world > 1 else objective
        if variant == "grad_cache_fsdp":
            settings = sharding.FSDPSettings()
            sharding.shard_with_torch(objective, torch.device("cpu"), world, settings)
            model = objective
        accumulate = None if variant == "separate" else GradCache(objective)
        micro_batches = micro_batches_of(batch, rank, world)
        results[variant] = step(accelerator, objective, model, micro_batches, accumulate)
    return results


def kept_graphs(accelerator, overrides) -> dict:
    """One process: each micro-batch's embeddings with their graphs (in the RNG order of the
    engine's step), one loss over all of them, one backward, one SGD step."""
    objective = build(overrides, "global")
    micro_batches = micro_batches_of(fixed_global_batch(objective), 0, 1)
    phases = optimizer_phases(objective)
    optimizer = RecordingSGD([p for _, p in phases["main"]], lr=LR)
    torch.manual_seed(7)
    parts = [objective(batch, embed_only=True) for batch in micro_batches]
    joined = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    loss = objective.embedding_loss(joined)["loss"]
    loss.backward()
    optimizer.step()
    names = [name for name, _ in phases["main"]]
    return {
        "loss": loss.detach(),
        "grads": dict(zip(names, optimizer.grads)),
        "params": {name: p.detach().clone() for name, p in phases["main"]},
        "buffers": {name: b.detach().clone() for name, b in objective.named_buffers()},
    }


def main(out: str) -> None:
    torch.set_default_dtype(torch.float64)
    accelerator = make_accelerator("no", None)
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {
        name: run_case(accelerator, overrides, rank, world) for name, overrides in CASES.items()
    }
    if world == 1:
        objective = build(BATCHNORM_CASE, "global")
        micro_batches = micro_batches_of(fixed_global_batch(objective), 0, 1)
        results["simclr_batchnorm"] = {
            "kept_graphs": kept_graphs(accelerator, BATCHNORM_CASE),
            "grad_cache": step(
                accelerator, objective, objective, micro_batches, GradCache(objective)
            ),  # fmt: skip
        }
    if rank == 0:
        torch.save(results, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
