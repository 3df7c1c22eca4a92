"""Continuing a run from its latest checkpoint, on the same number of processes or another.

A checkpoint holds, besides weights and optimizer state (pretrain.checkpoint), the step, the skip
and non-finite counts, the batch layout it was trained with (processes, per-process batch,
micro-batches per step) and, with fp16, the GradScaler's loss scale and growth tracker.

Same number of processes: the checkpoint's layout, the data stream at its exact position, the
same RNG draws: the continued run is bit-identical to an uninterrupted one.

Another number of processes W' (`data.batch_size` is per process, so the global batch would
change with it, and the lr with the global batch): the global batch of the checkpoint is kept,
so the lr and its schedule are those of the run. Each process keeps its micro-batch size and
takes W/W' times the micro-batches when that is a whole number; otherwise it takes the largest
micro-batch up to the old one that divides its share of the global batch. A global batch that W'
processes cannot share evenly is refused in one line. Weights, optimizer state and step continue
exactly; the data stream restarts deterministically at that step as an uninterrupted W'-process
run would see it (each rank's stream is seeded by (seed, epoch, rank)), and the per-rank random
draws (masks, noise) are those of W' ranks. The start-up line says what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pretrain import sharding
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.errors import ConfigError
from pretrain.sharding import load_state


@dataclass(frozen=True)
class BatchLayout:
    processes: int
    batch_size: int  # samples per process and micro-batch
    grad_accum: int  # micro-batches per optimizer step

    @property
    def global_batch(self) -> int:
        return self.processes * self.batch_size * self.grad_accum

    def as_state(self) -> dict:
        return {"world_size": self.processes, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum}  # fmt: skip


def batch_layout(config, processes: int, saved: dict | None) -> tuple[BatchLayout, str]:
    """This start's layout and, when it differs from the checkpoint's, a line saying how.

    saved: the checkpoint's state.json (None for a new run). Checkpoints written before layouts
    were recorded continue with the config's layout, as they always did.
    """
    configured = BatchLayout(processes, config.data.batch_size, config.train.grad_accum)
    if saved is None or "world_size" not in saved:
        return configured, ""
    before = BatchLayout(saved["world_size"], saved["batch_size"], saved["grad_accum"])
    if before.processes == processes:  # exactly as it was (also after an earlier move)
        if before == configured:
            return before, ""
        return before, (
            f"per process {before.batch_size} x {before.grad_accum} micro-batch(es) as in the "
            f"checkpoint (the config says {configured.batch_size} x {configured.grad_accum})"
        )
    share, remainder = divmod(before.global_batch, processes)
    if remainder:
        raise ConfigError(
            f"the checkpoint's global batch of {before.global_batch} cannot be shared by "
            f"{processes} processes; continue it on a number of processes that divides it"
        )
    batch = max(b for b in range(1, min(before.batch_size, share) + 1) if share % b == 0)
    after = BatchLayout(processes, batch, share // batch)
    return after, (
        f"checkpoint from {before.processes} process(es): per process {before.batch_size} x "
        f"{before.grad_accum} micro-batch(es) -> {after.batch_size} x {after.grad_accum}; "
        f"global batch {after.global_batch} and lr schedule unchanged; data stream restarted "
        f"for {processes} process(es)"
    )


def checkpoint_extras(layout: BatchLayout, accelerator) -> dict:
    """What state.json holds besides the counts: the layout, and fp16's loss scale."""
    extras = layout.as_state()
    if accelerator.scaler is not None:  # plain numbers: scale, growth tracker, factors
        extras["grad_scaler"] = accelerator.scaler.state_dict()
    return extras


def save_run_checkpoint(
    accelerator, run_dir: Path, step: int, objective, optimizers: dict, counts: dict, keep: int
) -> None:
    """The run's checkpoint after `step`: every rank calls (a sharded model's and its
    optimizers' full state is gathered), the main process writes; optimizers: {phase: optimizer}.
    counts: the skip and non-finite counts and the batch layout (checkpoint_extras)."""
    model_state = sharding.model_state(objective)
    optimizer_states = {
        phase: sharding.optimizer_state(objective, optimizer)
        for phase, optimizer in optimizers.items()
    }
    if accelerator.is_main_process:
        save_checkpoint(run_dir, step, model_state, optimizer_states, counts, keep=keep)
    accelerator.wait_for_everyone()


def restore(checkpoint: Path, accelerator, objective, optimizers, phases: dict) -> dict:
    """Load weights, optimizer state and fp16's loss scale into a prepared run (every rank, the
    objective sharded or not); returns the checkpoint's state.json."""
    model_state, optimizer_states, state = load_checkpoint(checkpoint)
    load_state(objective, optimizers, phases, model_state, optimizer_states)
    restore_grad_scaler(accelerator.scaler, state)
    return state


def restore_grad_scaler(scaler, state: dict) -> None:
    """fp16's GradScaler as it was at the checkpoint (without it a resumed fp16 run starts
    again at scale 65536 and skips steps finding its way down)."""
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])


def own_skip_count(state: dict, rank: int, world: int) -> int:
    """This rank's skipped-sample count from a checkpoint; all on rank 0 if the world changed."""
    per_rank = state.get("skipped_samples_per_rank")
    if per_rank is not None and len(per_rank) == world:
        return per_rank[rank]
    return state.get("skipped_samples", 0) if rank == 0 else 0
