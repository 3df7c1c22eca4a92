"""One Accelerate training loop for every objective.

The engine knows nothing objective-specific: it asks the registry for a module whose
`forward(batch)` returns {"loss", ...scalars}, steps its optimizers (pretrain.step) on a warmup +
cosine schedule counted in optimizer steps (pretrain.optim), logs, checkpoints, and exports the
objective's `encoder` at the end. Objectives with several optimizer phases (a GAN) are
PhasedObjectives: each phase steps in turn, nothing else changes.

Determinism: every optimizer step reseeds torch from (seed, step, rank) and the data stream
position is a function of (seed, epoch, step), so a resumed run continues exactly like an
uninterrupted one.

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
from accelerate.utils import DistributedType
from tqdm import tqdm

from pretrain.checkpoint import export_encoder, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import Config, to_dict
from pretrain.data import TrainingStream, demo_shards, expand_shards, require_fields
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.distributed import make_accelerator, sum_across_processes
from pretrain.errors import ConfigError
from pretrain.faults import (
    NonFiniteGuard,
    NonFiniteLossError,
    StopSignals,
    stop_on_any_rank,
    stop_signals_blocked,
)
from pretrain.hub import write_hub_layout
from pretrain.models.encoder import EncoderSpec
from pretrain.monitor import OnlineKnn
from pretrain.objectives import PhasedObjective, get_objective
from pretrain.optim import (
    build_optimizer,
    learning_rate,
    no_weight_decay_names,
    optimizer_phases,
    scaled_lr,
)
from pretrain.rundir import open_run_dir
from pretrain.step import StepResult, optimizer_step, seed_step
from pretrain.tracking import MetricWindow, Tracker

__all__ = ["NonFiniteLossError", "train"]


def train(config: Config, resume_dir: str | Path | None = None, on_end=None) -> dict:
    """Run (or resume) a pretraining run; returns the summary printed by the CLI.

    on_end(objective, accelerator), if given, is called on every process after the last step
    with the unwrapped objective (for custom evaluation, or tests that compare replicas).
    A run stopped by SIGTERM/SIGUSR1 returns early, checkpointed, with "stopped_by" set.
    """
    started = time.perf_counter()
    with StopSignals() as stop_signals:
        run = _start(config, resume_dir)
        done, total_steps, stopped_by, last_metrics = _loop(run, stop_signals, started)
        if stopped_by:
            return _stop(run, done, stopped_by)
        return _finish(run, total_steps, last_metrics, on_end, started)


@dataclass
class _Run:
    """A started run: everything the loop and the end of the run need."""

    config: Config
    accelerator: Accelerator
    objective: torch.nn.Module  # unwrapped
    model: torch.nn.Module  # prepared (DDP-wrapped on several processes)
    spec: EncoderSpec
    phases: dict  # {phase: [(name, parameter)]}, in stepping order
    optimizers: list
    run_dir: Path
    tracker: Tracker
    stream: TrainingStream
    global_batch: int
    base_lr: float
    start_step: int
    skipped_before: int  # this rank's skipped samples before a resume
    guard: NonFiniteGuard
    monitor: OnlineKnn | None = None  # the online kNN evaluation (monitor.every > 0)

    @property
    def phased(self) -> bool:
        return isinstance(self.objective, PhasedObjective)


def _start(config: Config, resume_dir) -> _Run:
    """Build, prepare and (when resuming) restore everything; nothing is trained yet."""
    # Everything that can be wrong with the inputs fails here, before a run directory exists.
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
    phases = optimizer_phases(objective)
    accelerator = make_accelerator(
        config.train.mixed_precision,
        "wandb" if config.logging.wandb else None,
        # a phase's backward reaches only part of the model
        find_unused_parameters=isinstance(objective, PhasedObjective),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        # Checkpoints, pictures and the export read the whole model on the main process; with
        # sharded parameters that needs a full-state gather on every rank first (not built yet).
        raise ConfigError(
            "FSDP launches are not supported by the engine yet (checkpoints need a full-state "
            "gather); launch with DDP, e.g. launch/accelerate_1node_8gpu.yaml"
        )
    _use_demo_data_if_unset(config, accelerator)
    shards = expand_shards(config.data.train_shards, allow_pipe=config.data.allow_pipe)
    require_fields(shards, entry.needs, f"objective {config.objective.name}")
    monitor = OnlineKnn.start(config, accelerator, shards, objective.encoder)

    global_batch = config.data.batch_size * accelerator.num_processes * config.train.grad_accum
    base_lr = scaled_lr(config.optimizer.blr, config.optimizer.lr, global_batch)
    skip_decay = no_weight_decay_names(objective)
    optimizers = [
        build_optimizer(named, skip_decay, config.optimizer, base_lr) for named in phases.values()
    ]
    run_dir, run_id = open_run_dir(config, accelerator, resume_dir)
    checkpoint = latest_checkpoint(run_dir)  # None for a new run
    model, *optimizers = accelerator.prepare(objective, *optimizers)
    start_step, skipped_before, nonfinite_steps = 0, 0, 0
    if checkpoint is not None:
        model_state, optimizer_states, state = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        for phase, optimizer in zip(phases, optimizers):
            optimizer.load_state_dict(optimizer_states[phase])
        start_step = state["step"]
        skipped_before = _own_count(state, accelerator.process_index, accelerator.num_processes)
        nonfinite_steps = state.get("nonfinite_steps", 0)

    tracker = Tracker(accelerator, run_dir, config.logging, run_id, to_dict(config))
    if accelerator.is_main_process:
        print(
            f"run {run_dir} | {config.objective.name} | {spec.name} | "
            f"{accelerator.num_processes} process(es) on {accelerator.device} | "
            f"global batch {global_batch} | lr {base_lr:.3g} | "
            + (f"resumed at step {start_step}" if checkpoint else "new run"),
            flush=True,
        )
    data = config.data
    stream = TrainingStream(
        shards,
        sample_transform,
        batch_size=data.batch_size,
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
        stream, global_batch, base_lr, start_step, skipped_before, guard, monitor,
    )  # fmt: skip


def _loop(run: _Run, stop_signals: StopSignals, started: float):
    """Train from run.start_step; returns (last step done, total steps, stop signal, metrics)."""
    config, accelerator = run.config, run.accelerator
    accum, rank = config.train.grad_accum, accelerator.process_index
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
            config.train.clip_grad, on_outputs,
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
        if is_main and image_every and (done % image_every == 0 or done == total_steps):
            run.tracker.log_pictures(run.objective, micro_batches[-1], done)
        if done % config.train.checkpoint_every == 0 or done == total_steps or stopped_by:
            _save_checkpoint(run, done)
        if stopped_by or done == total_steps:
            break
    progress.close()
    return done, total_steps, stopped_by, last_metrics


def _forward_and_logging(run: _Run, window: MetricWindow):
    """The step's forward(batch, phase) and its outputs' way into the metric window. A phase's
    `loss` is logged as loss_<phase>, and `loss` becomes the sum over phases."""
    accum = run.config.train.grad_accum
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
    metrics = run.monitor.report(run.objective.encoder, run.tracker, step)
    window.started += metrics["knn_s"]
    postfix["knn"] = f"{metrics['knn_top1']:.3f}"
    progress.set_postfix(postfix)


def _log_metrics(run: _Run, window: MetricWindow, lr: float, result: StepResult, done: int):
    accelerator = run.accelerator
    skipped = sum(_per_rank(accelerator, run.stream.skipped + run.skipped_before))
    grad_norms = {
        (f"grad_norm_{phase}" if run.phased else "grad_norm"): float(norm)
        for phase, norm in result.grad_norms.items()
    }
    metrics = {
        **window.means(accelerator),
        "lr": lr,
        **grad_norms,
        "img_per_s": window.steps * run.global_batch / window.elapsed(),
        "skipped_samples": skipped,
        "nonfinite_steps": run.guard.total,
        "epoch": run.stream.epoch,
    }
    run.tracker.log(metrics, step=done)
    window.reset()
    return metrics


def _save_checkpoint(run: _Run, done: int) -> None:
    """Every rank takes part (the skip counts are gathered); the main process writes."""
    accelerator = run.accelerator
    skipped_per_rank = _per_rank(accelerator, run.stream.skipped + run.skipped_before)
    if accelerator.is_main_process:
        save_checkpoint(
            run.run_dir,
            done,
            run.objective.state_dict(),
            {phase: opt.state_dict() for phase, opt in zip(run.phases, run.optimizers)},
            {
                "skipped_samples": sum(skipped_per_rank),
                "skipped_samples_per_rank": skipped_per_rank,
                "nonfinite_steps": run.guard.total,
            },
            keep=run.config.train.keep_checkpoints,
        )
    accelerator.wait_for_everyone()


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
    skipped_per_rank = _per_rank(accelerator, run.stream.skipped + run.skipped_before)
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
    if accelerator.is_main_process:
        meta = {
            "objective": config.objective.name,
            "steps": total_steps,
            "image_size": config.data.image_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "run_dir": str(run.run_dir),
        }
        encoder_state = run.objective.encoder.state_dict()
        weights, _ = export_encoder(
            run.run_dir, encoder_state, run.spec.name, run.spec.kwargs, meta
        )
        write_hub_layout(weights.parent, run.spec.name, run.spec.kwargs, meta)
        summary["export"] = str(weights)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    run.tracker.finish()
    accelerator.wait_for_everyone()
    return summary


# --- helpers -------------------------------------------------------------------------------------


def _use_demo_data_if_unset(config: Config, accelerator) -> None:
    """Empty data.train_shards means the embedded demo set: generate it once, point at it."""
    data = config.data
    if data.train_shards:
        return
    demo = demo_shards(
        accelerator, data.demo_dir, data.demo_train_samples, data.demo_val_samples, data.image_size
    )
    data.train_shards = demo["train"]
    data.val_shards = data.val_shards or demo["val"]


def _to_device(batch: dict, device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _per_rank(accelerator, count: int) -> list[int]:
    """Every rank's `count` (e.g. skipped samples), on every rank: a summed one-hot vector."""
    counts = torch.zeros(accelerator.num_processes, dtype=torch.int64, device=accelerator.device)
    counts[accelerator.process_index] = count
    return sum_across_processes(accelerator, counts).tolist()


def _own_count(state: dict, rank: int, world: int) -> int:
    """This rank's skipped-sample count from a checkpoint; all on rank 0 if the world changed."""
    per_rank = state.get("skipped_samples_per_rank")
    if per_rank is not None and len(per_rank) == world:
        return per_rank[rank]
    return state.get("skipped_samples", 0) if rank == 0 else 0
