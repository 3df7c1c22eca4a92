"""Run by torchrun for tests/test_fsdp.py: MAE optimizer steps in float64 through the engine's
pieces (pretrain.sharding.prepare, pretrain.step.optimizer_step with 2 micro-batches and
clipping, AdamW from pretrain.optim), on a fixed global batch per step.

With 1 process: unsharded, the whole global batch. With 2: sharded with torch's fully_shard
(train.fsdp), each process on its half of every micro-batch. MAE's random masks would differ
between the two (each rank draws its own); here they are part of the data: torch.rand inside
the forward returns the batch's rows of a fixed noise tensor, so both see the same masks.

The main process saves to OUT: "losses" per step (mean over processes), "grad_norms" per step
(before clipping), "params" and "optimizer" (the full states after the steps), and "bytes"
(each process's parameter and optimizer bytes).

With --checkpointing, the run is launched as the FSDP recipe launches it (accelerate's FSDP
variables: every Block recomputed in the backward through a checkpoint wrapper) and the encoder
also checkpoints its blocks the timm way (model.grad_checkpointing): activation checkpointing
composes with sharding, and changes no number.

usage: fsdp_step_worker.py OUT [STEPS] [--checkpointing]
"""

import contextlib
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

from pretrain import sharding
from pretrain.config import load_config
from pretrain.distributed import gather_objects, make_accelerator
from pretrain.objectives import build_objective
from pretrain.optim import build_optimizer, no_weight_decay_names, optimizer_phases
from pretrain.step import optimizer_step

GLOBAL_BATCH, MICRO_BATCHES, LR, CLIP = 8, 2, 1e-3, 0.5
SETTINGS = [
    "data.image_size=16",
    "model.patch_size=4",
    "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "mae.decoder_dim=16",
    "mae.decoder_depth=2",
    "mae.decoder_heads=2",
]


@contextlib.contextmanager
def masks_from(noise: torch.Tensor):
    """torch.rand(N, L) inside MAE's random_masking returns `noise` (N, L) instead."""

    def fixed(*shape, **kwargs):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone()

    with mock.patch.object(torch, "rand", fixed):
        yield


def global_batches(steps: int, patches: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator),
            "noise": torch.rand(GLOBAL_BATCH, patches, generator=generator),
        }
        for _ in range(steps)
    ]


# What `accelerate launch --config_file launch/accelerate_fsdp_vit_large.yaml` sets, in short.
RECIPE_ENVIRONMENT = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_ACTIVATION_CHECKPOINTING": "true",
}


def main(out: str, steps: int, checkpointing: bool) -> None:
    torch.set_default_dtype(torch.float64)
    if checkpointing and int(os.environ["WORLD_SIZE"]) > 1:
        os.environ.update(RECIPE_ENVIRONMENT)
    accelerator = make_accelerator("no", None)
    rank, world = accelerator.process_index, accelerator.num_processes
    config = load_config(None, SETTINGS)
    torch.manual_seed(0)
    objective, _ = build_objective(config)
    objective.encoder.set_grad_checkpointing(checkpointing)
    phases = optimizer_phases(objective)
    skip_decay = no_weight_decay_names(objective)
    optimizers = [build_optimizer(phases["main"], skip_decay, config.optimizer, LR)]
    model, optimizers, phases = sharding.prepare(
        accelerator, objective, optimizers, phases, fsdp=True
    )
    assert sharding.is_sharded(objective) == (world > 1)
    wrapped = sum("CheckpointWrapper" in type(m).__name__ for m in objective.modules())
    assert wrapped == (4 if checkpointing and world > 1 else 0), wrapped  # 2 + 2 Blocks

    def forward(batch, phase):
        with masks_from(batch["noise"]):
            return model({"image": batch["image"]})

    losses, norms = [], []
    patches = objective.grid_size[0] * objective.grid_size[1]
    for batch in global_batches(steps, patches):
        share = GLOBAL_BATCH // world // MICRO_BATCHES
        mine = {k: v[rank::world] for k, v in batch.items()}  # every process its rows
        micro = [{k: v[m * share : (m + 1) * share] for k, v in mine.items()} for m in range(2)]
        step_losses: list[torch.Tensor] = []
        result = optimizer_step(
            accelerator, model, phases, optimizers, micro, forward, LR, CLIP,
            lambda outputs, phase, into=step_losses: into.append(outputs["loss"].detach()),
        )  # fmt: skip
        loss = torch.stack(step_losses).mean()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)
        norms.append(result.grad_norms["main"])
    state = sharding.model_state(objective)
    optimizer = sharding.optimizer_state(objective, optimizers[0])
    held = sharding.local_bytes(objective, optimizers)
    bytes_per_rank = gather_objects(accelerator, held)
    if rank == 0:
        results = {"losses": torch.stack(losses), "grad_norms": torch.stack(norms)}
        results.update(params=state, optimizer=optimizer)
        torch.save({**results, "bytes": bytes_per_rank}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--checkpointing"]
    main(
        arguments[0], int(arguments[1]) if len(arguments) > 1 else 3, "--checkpointing" in sys.argv
    )
