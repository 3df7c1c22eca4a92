"""One Accelerate training loop for every objective.

The engine knows nothing objective-specific: it asks the registry for a module whose
`forward(batch)` returns {"loss", ...scalars}, steps its optimizers (pretrain.step) on a warmup +
cosine schedule counted in optimizer steps (pretrain.optim), logs, checkpoints, and exports the
objective's `encoder` at the end (an Exporting objective, mlm, writes its own export). Objectives
with several optimizer phases (a GAN) are PhasedObjectives: each phase steps in turn, nothing
else changes.

Determinism: every optimizer step reseeds torch from (seed, step, rank) and the data stream
position is a function of (seed, epoch, step), so a resumed run continues exactly like an
uninterrupted one.

Scale (pretrain.sharding, pretrain.grad_cache, pretrain.models.global_batchnorm,
pretrain.resume): FSDP2 sharding with checkpoints in the unsharded layout; BatchNorm over the
global batch when there is more than one process; contrastive objectives accumulate gradients
over the whole step's batch (GradCache); a checkpoint continues on another number of processes
with the same global batch and lr.

Fault tolerance (pretrain.faults, pretrain.rundir): SIGTERM or SIGUSR1 stop the run at the next
step boundary with a checkpoint (the CLI exits with EXIT_PREEMPTED); rerunning the same command
continues a run directory from its latest checkpoint; NaN/Inf steps are skipped on every rank,
and train.max_nonfinite_steps of them in a row stop the run; non-finite weights are never saved.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pretrain import sharding
from pretrain.checkpoint import checkpoint_state, latest_checkpoint
from pretrain.config import Config, to_dict
from pretrain.data import TrainingStream, expand_shards, require_fields, use_demo_data_if_unset
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.distributed import make_accelerator, per_rank
from pretrain.export import encoder_state, export_run
from pretrain.faults import (
    NonFiniteGuard,
    NonFiniteLossError,
    StopSignals,
    stop_on_any_rank,
    stop_signals_blocked,
)
from pretrain.grad_cache import GradCache
from pretrain.models.encoder import EncoderSpec
from pretrain.models.global_batchnorm import use_global_batchnorm
from pretrain.monitor import OnlineKnn
from pretrain.objectives import EmbeddingObjective, PhasedObjective, get_objective
from pretrain.optim import (
    build_optimizer,
    learning_rate,
    no_weight_decay_names,
    optimizer_phases,
    scaled_lr,
)
from pretrain.resume import (
    BatchLayout,
    batch_layout,
    checkpoint_extras,
    own_skip_count,
    restore,
    save_run_checkpoint,
)
from pretrain.rundir import open_run_dir
from pretrain.step import StepResult, optimizer_step, seed_step
from pretrain.tracking import MetricWindow, Tracker

__all__ = ["NonFiniteLossError", "train"]


def train(config: Config, resume_dir: str | Path | None = None, on_end=None, on_start=None) -> dict:
    """Run (or resume) a pretraining run; returns the summary printed by the CLI.

    on_end(objective, accelerator), if given, is called on every process after the last step
    with the unwrapped objective (for custom evaluation, or tests that compare replicas).
    on_start(run), if given, is called on every process with the started run (built, prepared,
    restored from its checkpoint) before the first step (tests that check a restore).
    A run stopped by SIGTERM/SIGUSR1 returns early, checkpointed, with "stopped_by" set.
    """
    started = time.perf_counter()
    with StopSignals() as stop_signals:
        run = _start(config, resume_dir)
        if on_start is not None:
            on_start(run)
        done, total_steps, stopped_by, last_metrics = _loop(run, stop_signals, started)
        if stopped_by:
            return _stop(run, done, stopped_by)
        return _finish(run, total_steps, last_metrics, on_end, started)


@dataclass
class _Run:
    """A started run: everything the loop and the end of the run need."""

    config: Config
    accelerator: Accelerator
    objective: torch.nn.Module  # unwrapped (sharded in place under FSDP)
    model: torch.nn.Module  # prepared (DDP-wrapped on several processes, or sharded)
    spec: EncoderSpec  # what rebuilds the exported part (an Exporting objective's own spec)
    phases: dict  # {phase: [(name, parameter)]}, in stepping order
    optimizers: list
    run_dir: Path
    tracker: Tracker
    stream: TrainingStream
    layout: BatchLayout  # processes x per-process batch x micro-batches per step
    base_lr: float
    start_step: int
    skipped_before: int  # this rank's skipped samples before a resume
    guard: NonFiniteGuard
    accumulate: GradCache | None  # how micro-batches make a step (None: each on its own)
    monitor: OnlineKnn | None = None  # the online kNN evaluation (monitor.every > 0)

    @property
    def phased(self) -> bool:
        return isinstance(self.objective, PhasedObjective)

    @property
    def sharded(self) -> bool:
        return sharding.is_sharded(self.objective)


def _start(config: Config, resume_dir) -> _Run:
    """Build, prepare and (when resuming) restore everything; nothing is trained yet."""
    objective, spec, sample_transform, accelerator = _build(config)
    use_demo_data_if_unset(config.data, accelerator)
    shards = expand_shards(config.data.train_shards, allow_pipe=config.data.allow_pipe)
    require_fields(
        shards, get_objective(config.objective.name).needs, f"objective {config.objective.name}"
    )
    monitor = OnlineKnn.start(config, accelerator, shards, objective.encoder)
    run_dir, run_id = open_run_dir(config, accelerator, resume_dir)
    checkpoint = latest_checkpoint(run_dir)  # None for a new run
    layout, layout_change = batch_layout(
        config, accelerator.num_processes, checkpoint and checkpoint_state(checkpoint)
    )
    base_lr = scaled_lr(config.optimizer.blr, config.optimizer.lr, layout.global_batch)
    phases = optimizer_phases(objective)
    skip_decay = no_weight_decay_names(objective)
    optimizers = [
        build_optimizer(named, skip_decay, config.optimizer, base_lr) for named in phases.values()
    ]
    model, optimizers, phases = sharding.prepare(
        accelerator, objective, optimizers, phases, config.train.fsdp
    )
    start_step, skipped_before, nonfinite_steps = 0, 0, 0
    if checkpoint is not None:
        state = restore(checkpoint, accelerator, objective, optimizers, phases)
        start_step = state["step"]
        skipped_before = own_skip_count(state, accelerator.process_index, accelerator.num_processes)
        nonfinite_steps = state.get("nonfinite_steps", 0)

    tracker = Tracker(accelerator, run_dir, config.logging, run_id, to_dict(config))
    cached = config.train.grad_cache and isinstance(objective, EmbeddingObjective)
    accumulate = GradCache(objective) if cached and layout.grad_accum > 1 else None
    if accelerator.is_main_process:
        facts = [
            f"run {run_dir}", config.objective.name, spec.name,
            f"{accelerator.num_processes} process(es) on {accelerator.device}",
            *(["FSDP"] if sharding.is_sharded(objective) else []),
            f"global batch {layout.global_batch}",
            *([f"GradCache over {layout.grad_accum} micro-batches"] if accumulate else []),
            f"lr {base_lr:.3g}",
            f"resumed at step {start_step}" if checkpoint else "new run",
            *([layout_change] if layout_change else []),
        ]  # fmt: skip
        print(" | ".join(facts), flush=True)
    data = config.data
    stream = TrainingStream(
        shards,
        sample_transform,
        batch_size=layout.batch_size,
        steps_per_epoch=data.steps_per_epoch,
        seed=config.train.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        allow_pipe=data.allow_pipe,
        starting_workers=stop_signals_blocked,
    )
    guard = NonFiniteGuard(config.train.max_nonfinite_steps, nonfinite_steps)
    return _Run(
        config, accelerator, objective, model, spec, phases, optimizers, run_dir, tracker,
        stream, layout, base_lr, start_step, skipped_before, guard, accumulate, monitor,
    )  # fmt: skip


def _build(config: Config):
    """The objective (on every rank with the same initial weights), its sample transform, and
    the Accelerator. Everything that can be wrong with the inputs fails here, before a run
    directory exists. With several processes, BatchNorm layers become global ones
    (train.sync_batchnorm)."""
    entry = get_objective(config.objective.name)
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    objective, spec = entry.build(config)
    if config.model.grad_checkpointing:
        objective.encoder.set_grad_checkpointing(True)
    if config.train.compile:
        # nn.Module.compile: calls run the compiled forward, the module (and its state_dict
        # keys) stay as they are, so checkpoints and exports do not depend on this setting
        objective.compile()
    sample_transform = entry.train_transform(config)
    accelerator = make_accelerator(
        config.train.mixed_precision,
        "wandb" if config.logging.wandb else None,
        # a phase's backward reaches only part of the model
        find_unused_parameters=isinstance(objective, PhasedObjective),
        fsdp_plugin=sharding.accelerate_plugin(config.train.fsdp),
    )
    if config.train.sync_batchnorm and accelerator.num_processes > 1:
        objective, _ = use_global_batchnorm(objective, accelerator.device)
    return objective, spec, sample_transform, accelerator


def _loop(run: _Run, stop_signals: StopSignals, started: float):
    """Train from run.start_step; returns (last step done, total steps, stop signal, metrics)."""
    config, accelerator = run.config, run.accelerator
    accum, rank = run.layout.grad_accum, accelerator.process_index
    is_main = accelerator.is_main_process
    batches = run.stream.batches(start_micro_step=run.start_step * accum)
    window = MetricWindow(accelerator.device)
    forward, on_outputs = _forward_and_logging(run, window)
    total_steps, done, stopped_by, last_metrics = config.train.steps, run.start_step, None, {}
    time_limit_s = (config.train.time_limit_minutes or 0) * 60
    progress = tqdm(
        total=total_steps, initial=done, disable=not is_main, desc="pretrain", unit="step"
    )
    postfix = {}  # the progress bar's: loss, lr and (monitored) knn
    if run.monitor is not None and run.start_step == 0:
        _monitor(run, 0, window, progress, postfix)
    run.model.train()
    for step in range(run.start_step, config.train.steps):
        seed_step(config.train.seed, step, rank)
        schedule = config.schedule  # spans train.steps, even when a time limit ends the run early
        lr = learning_rate(
            step, run.base_lr, schedule.warmup_steps, config.train.steps, schedule.min_lr
        )
        micro_batches = [_to_device(next(batches), accelerator.device) for _ in range(accum)]
        result = optimizer_step(
            accelerator, run.model, run.phases, run.optimizers, micro_batches, forward, lr,
            config.train.clip_grad, on_outputs, accumulate=run.accumulate,
        )  # fmt: skip
        done = step + 1
        window.steps += 1
        progress.update(1)
        if not result.finite and is_main:
            print(f"step {done}: NaN/Inf loss or gradients, update skipped", file=sys.stderr)
        run.guard.record(result.finite, done)
        if done < total_steps:
            out_of_time = bool(time_limit_s) and time.perf_counter() - started > time_limit_s
            stopped_by, out_of_time = stop_on_any_rank(accelerator, stop_signals, out_of_time)
            if out_of_time:  # end here like a finished run: log, checkpoint, export
                total_steps = done

        if done % config.logging.log_every == 0 or done == total_steps:
            last_metrics = _log_metrics(run, window, lr, result, done)
            postfix.update(loss=f"{last_metrics['loss']:.4f}", lr=f"{lr:.2e}")
            progress.set_postfix(postfix)
        if run.monitor is not None and run.monitor.due(done, total_steps):
            _monitor(run, done, window, progress, postfix)
        image_every = config.logging.image_every
        if image_every and (done % image_every == 0 or done == total_steps):
            _log_pictures(run, micro_batches[-1], done)
        if done % config.train.checkpoint_every == 0 or done == total_steps or stopped_by:
            _save_checkpoint(run, done)
        if stopped_by or done == total_steps:
            break
    progress.close()
    return done, total_steps, stopped_by, last_metrics


def _forward_and_logging(run: _Run, window: MetricWindow):
    """The step's forward(batch, phase) and its outputs' way into the metric window. A phase's
    `loss` is logged as loss_<phase>, and `loss` becomes the sum over phases."""
    accum = run.layout.grad_accum
    if not run.phased:
        return (
            lambda batch, phase: run.model(batch),
            lambda outputs, phase: window.add(outputs, accum),
        )
    return (
        lambda batch, phase: run.model(batch, phase=phase),
        lambda outputs, phase: window.add({**outputs, f"loss_{phase}": outputs["loss"]}, accum),
    )


def _monitor(run: _Run, step: int, window: MetricWindow, progress, postfix: dict) -> None:
    """The online kNN evaluation after `step` steps, onto the progress bar; its time is kept
    out of the training speed (img_per_s)."""
    if run.sharded:  # every rank evaluates; a sharded model gathers its parameters first
        with sharding.whole_parameters(run.model), run.accelerator.autocast():
            metrics = run.monitor.report(run.objective.encoder, run.tracker, step)
    else:
        metrics = run.monitor.report(run.objective.encoder, run.tracker, step)
    window.started += metrics["knn_s"]
    postfix["knn"] = f"{metrics['knn_top1']:.3f}"
    progress.set_postfix(postfix)


def _log_metrics(run: _Run, window: MetricWindow, lr: float, result: StepResult, done: int):
    accelerator = run.accelerator
    skipped = sum(per_rank(accelerator, run.stream.skipped + run.skipped_before))
    grad_norms = {
        (f"grad_norm_{phase}" if run.phased else "grad_norm"): float(norm)
        for phase, norm in result.grad_norms.items()
    }
    metrics = {
        **window.means(accelerator),
        "lr": lr,
        **grad_norms,
        "img_per_s": window.steps * run.layout.global_batch / window.elapsed(),
        "skipped_samples": skipped,
        "nonfinite_steps": run.guard.total,
        "epoch": run.stream.epoch,
    }
    run.tracker.log(metrics, step=done)
    window.reset()
    return metrics


def _log_pictures(run: _Run, batch: dict, done: int) -> None:
    """The objective's pictures, written by the main process. A sharded model computes them on
    every rank (its forward gathers parameters from all of them)."""
    if run.sharded:  # autocast: FSDP's bf16 parameters meet fp32 pictures outside forward
        with sharding.whole_parameters(run.model), run.accelerator.autocast():
            run.tracker.log_pictures(run.objective, batch, done, every_rank=True)
    elif run.accelerator.is_main_process:
        run.tracker.log_pictures(run.objective, batch, done)


def _save_checkpoint(run: _Run, done: int) -> None:
    """Every rank takes part (skip counts and a sharded model's state are gathered)."""
    accelerator = run.accelerator
    skipped_per_rank = per_rank(accelerator, run.stream.skipped + run.skipped_before)
    counts = {
        "skipped_samples": sum(skipped_per_rank),
        "skipped_samples_per_rank": skipped_per_rank,
        "nonfinite_steps": run.guard.total,
        **checkpoint_extras(run.layout, accelerator),
    }
    save_run_checkpoint(
        accelerator, run.run_dir, done, run.objective, dict(zip(run.phases, run.optimizers)),
        counts, keep=run.config.train.keep_checkpoints,
    )  # fmt: skip


def _stop(run: _Run, done: int, stopped_by: str) -> dict:
    run.tracker.finish()
    if run.accelerator.is_main_process:
        print(
            f"stopped by {stopped_by} after step {done} (checkpoint written); run the same "
            "command again to continue",
            file=sys.stderr,
            flush=True,
        )
    run.accelerator.wait_for_everyone()
    return {"objective": run.config.objective.name, "steps": done, "stopped_by": stopped_by}


def _finish(run: _Run, total_steps: int, last_metrics: dict, on_end, started: float) -> dict:
    """Summary on every process; the main process exports the encoder and writes summary.json."""
    config, accelerator = run.config, run.accelerator
    skipped_per_rank = per_rank(accelerator, run.stream.skipped + run.skipped_before)
    if on_end is not None:
        on_end(run.objective, accelerator)
    summary = {
        "objective": config.objective.name,
        "steps": total_steps,
        "final_loss": last_metrics.get("loss"),
        "skipped_samples": sum(skipped_per_rank),
        "skipped_samples_per_rank": skipped_per_rank,
        "nonfinite_steps": run.guard.total,
        "time_limit_reached": total_steps < config.train.steps,
        "run_dir": str(run.run_dir),
    }
    if run.monitor is not None:
        summary["knn_top1"] = run.monitor.last
    state = encoder_state(run.objective)  # every rank (a sharded encoder is gathered)
    if accelerator.is_main_process:
        meta = {
            "objective": config.objective.name,
            "steps": total_steps,
            "image_size": config.data.image_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "run_dir": str(run.run_dir),
        }
        weights = export_run(run.run_dir, run.objective, run.spec, state, meta)
        summary["export"] = str(weights)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    run.tracker.finish()
    accelerator.wait_for_everyone()
    return summary


# --- helpers -------------------------------------------------------------------------------------


def _to_device(batch: dict, device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }
