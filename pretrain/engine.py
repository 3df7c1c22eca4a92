"""One Accelerate training loop for every objective.

The engine knows nothing objective-specific: it asks the registry for a module whose
`forward(batch)` returns {"loss", ...scalars}, steps the optimizer on a warmup + cosine schedule
counted in optimizer steps, logs, checkpoints, and exports the objective's `encoder` at the end.

Objectives that need several optimizer steps per batch (a GAN: discriminator, then generator)
define `optimizer_phases() -> {phase: [parameters]}`; each phase gets its own optimizer and, every
step, its own `forward(batch, phase=name)` + backward + step, in order. Nothing else changes.

Determinism: every optimizer step reseeds torch from (seed, step, rank) and the data stream
position is a function of (seed, epoch, step), so a resumed run continues exactly like an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pretrain.checkpoint import export_encoder, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import Config, ConfigError, save_config, to_dict
from pretrain.data import ensure_demo_data, expand_shards, train_loader
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.distributed import (
    broadcast_from_main,
    make_accelerator,
    mean_across_processes,
    sum_across_processes,
)
from pretrain.objectives import get_objective
from pretrain.optim import build_optimizer, no_weight_decay_names
from pretrain.tracking import Tracker


def train(config: Config, resume_dir: str | Path | None = None, on_end=None) -> dict:
    """Run (or resume) a pretraining run; returns the summary printed by the CLI.

    on_end(objective, accelerator), if given, is called on every process after the last step
    with the unwrapped objective (for custom evaluation, or tests that compare replicas).
    """
    started = time.perf_counter()
    # Everything that can be wrong with the inputs fails here, before a run directory exists.
    entry = get_objective(config.objective.name)
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    objective, spec = entry.build(config)
    sample_transform = entry.train_transform(config)
    phases = optimizer_phases(objective)  # {phase: [(name, parameter)]}, in stepping order
    phased = hasattr(objective, "optimizer_phases")
    accelerator = make_accelerator(
        config.train.mixed_precision,
        "wandb" if config.logging.wandb else None,
        find_unused_parameters=phased,  # a phase's backward reaches only part of the model
    )
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    _use_demo_data_if_unset(config, accelerator)
    shards = expand_shards(config.data.train_shards, allow_pipe=config.data.allow_pipe)

    accum = config.train.grad_accum
    global_batch = config.data.batch_size * accelerator.num_processes * accum
    base_lr = config.optimizer.lr or config.optimizer.blr * global_batch / 256
    skip_decay = no_weight_decay_names(objective)
    optimizers = [
        build_optimizer(named, skip_decay, config.optimizer, base_lr) for named in phases.values()
    ]

    run_dir, run_id = _open_run_dir(config, accelerator, resume_dir)
    checkpoint = latest_checkpoint(run_dir) if resume_dir is not None else None
    model, *optimizers = accelerator.prepare(objective, *optimizers)
    start_step, skipped_before = 0, 0
    if checkpoint is not None:
        model_state, optimizer_states, state = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        for phase, optimizer in zip(phases, optimizers):
            optimizer.load_state_dict(optimizer_states[phase])
        start_step = state["step"]
        skipped_before = state.get("skipped_samples", 0) if is_main else 0

    tracker = Tracker(accelerator, run_dir, config.logging, run_id, to_dict(config))
    if is_main:
        print(
            f"run {run_dir} | {config.objective.name} | {spec.name} | "
            f"{accelerator.num_processes} process(es) on {accelerator.device} | "
            f"global batch {global_batch} | lr {base_lr:.3g} | "
            + (f"resumed at step {start_step}" if checkpoint else "new run"),
            flush=True,
        )

    stream = TrainingStream(config, shards, sample_transform, rank, accelerator.num_processes)
    batches = stream.batches(start_micro_step=start_step * accum)
    total_steps = config.train.steps
    progress = tqdm(
        total=total_steps, initial=start_step, disable=not is_main, desc="pretrain", unit="step"
    )
    window = _Window(accelerator.device)
    last_metrics: dict = {}
    model.train()
    for step in range(start_step, total_steps):
        torch.manual_seed(_step_seed(config.train.seed, step, rank))
        lr = learning_rate(
            step, base_lr, config.schedule.warmup_steps, total_steps, config.schedule.min_lr
        )
        micro_batches = [_to_device(next(batches), accelerator.device) for _ in range(accum)]
        grad_norms = {}
        for (phase, named), optimizer in zip(phases.items(), optimizers):
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step, batch in enumerate(micro_batches):
                # Gradients are all-reduced on the last micro-batch only.
                last = micro_step == accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    outputs = model(batch, phase=phase) if phased else model(batch)
                    accelerator.backward(outputs["loss"] / accum)
                window.add(_phase_outputs(outputs, phase) if phased else outputs, accum)
            grad_norms[f"grad_norm_{phase}" if phased else "grad_norm"] = (
                accelerator.clip_grad_norm_(
                    [parameter for _, parameter in named], config.train.clip_grad or float("inf")
                )
            )
            optimizer.step()
            # All gradients, not only this phase's: its backward may have reached other phases'
            # parameters (a generator loss flows through the discriminator).
            model.zero_grad(set_to_none=True)
        done = step + 1
        window.steps += 1
        progress.update(1)

        if done % config.logging.log_every == 0 or done == total_steps:
            skipped = int(
                sum_across_processes(
                    accelerator,
                    torch.tensor([stream.skipped + skipped_before], device=accelerator.device),
                ).item()
            )
            last_metrics = {
                **window.means(accelerator),
                "lr": lr,
                **{name: float(norm) for name, norm in grad_norms.items()},
                "img_per_s": window.steps * global_batch / window.elapsed(),
                "skipped_samples": skipped,
                "epoch": stream.epoch,
            }
            tracker.log(last_metrics, step=done)
            progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", lr=f"{lr:.2e}")
            window.reset()

        image_every = config.logging.image_every
        if is_main and image_every and (done % image_every == 0 or done == total_steps):
            _log_pictures(accelerator.unwrap_model(model), batch, tracker, done)

        if done % config.train.checkpoint_every == 0 or done == total_steps:
            if is_main:
                save_checkpoint(
                    run_dir,
                    done,
                    accelerator.unwrap_model(model).state_dict(),
                    {phase: opt.state_dict() for phase, opt in zip(phases, optimizers)},
                    {"skipped_samples": last_metrics.get("skipped_samples", skipped_before)},
                    keep=config.train.keep_checkpoints,
                )
            accelerator.wait_for_everyone()
    progress.close()
    if on_end is not None:
        on_end(accelerator.unwrap_model(model), accelerator)

    summary = {
        "objective": config.objective.name,
        "steps": total_steps,
        "final_loss": last_metrics.get("loss"),
        "skipped_samples": last_metrics.get("skipped_samples", skipped_before),
        "run_dir": str(run_dir),
    }
    if is_main:
        encoder_state = accelerator.unwrap_model(model).encoder.state_dict()
        meta = {
            "objective": config.objective.name,
            "steps": total_steps,
            "image_size": config.data.image_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "run_dir": str(run_dir),
        }
        weights, _ = export_encoder(run_dir, encoder_state, spec.name, spec.kwargs, meta)
        summary["export"] = str(weights)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    tracker.finish()
    accelerator.wait_for_everyone()
    return summary


# --- optimizer and schedule ---------------------------------------------------------------------


def optimizer_phases(objective: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """{phase: [(name, parameter)]}: the objective's own phases, or one phase "main" with all
    trainable parameters. A parameter may belong to one phase only."""
    if not hasattr(objective, "optimizer_phases"):
        return {"main": [(n, p) for n, p in objective.named_parameters() if p.requires_grad]}
    names = {id(parameter): name for name, parameter in objective.named_parameters()}
    phases, seen = {}, set()
    for phase, parameters in objective.optimizer_phases().items():
        phases[phase] = []
        for parameter in parameters:
            if id(parameter) in seen:
                raise ValueError(f"parameter {names[id(parameter)]} is in two optimizer phases")
            seen.add(id(parameter))
            phases[phase].append((names[id(parameter)], parameter))
    return phases


def _phase_outputs(outputs: dict, phase: str) -> dict:
    """A phase's `loss` is logged as loss_<phase>; `loss` becomes the sum over phases."""
    return {**outputs, f"loss_{phase}": outputs["loss"]}


def learning_rate(step: int, base_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup over `warmup` optimizer steps, then half-cosine down to `min_lr`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- data ----------------------------------------------------------------------------------------


class TrainingStream:
    """Endless training batches for one rank: resampled chunks ("epochs") of steps_per_epoch
    micro-batches each, so every rank takes the same number of steps and the position after
    micro-step s is (epoch, offset) = divmod(s, steps_per_epoch)."""

    def __init__(self, config: Config, shards: list[str], sample_transform, rank: int, world: int):
        self.config, self.shards, self.sample_transform = config, shards, sample_transform
        self.rank, self.world = rank, world
        self.epoch = 0
        self._skipped_in_past_epochs = 0
        self._loader = None

    @property
    def skipped(self) -> int:
        current = self._loader.skipped if self._loader is not None else 0
        return self._skipped_in_past_epochs + current

    def batches(self, start_micro_step: int):
        data = self.config.data
        self.epoch, offset = divmod(start_micro_step, data.steps_per_epoch)
        while True:
            self._loader = train_loader(
                self.shards,
                self.sample_transform,
                batch_size=data.batch_size,
                steps_per_epoch=data.steps_per_epoch,
                epoch=self.epoch,
                seed=self.config.train.seed,
                rank=self.rank,
                world_size=self.world,
                num_workers=data.num_workers,
                shuffle_buffer=data.shuffle_buffer,
                start_step=offset,
                allow_pipe=data.allow_pipe,
            )
            produced = 0
            for batch in self._loader:
                produced += 1
                yield batch
            if produced == 0:
                raise RuntimeError("the training shards yielded no readable samples")
            self._skipped_in_past_epochs += self._loader.skipped
            self.epoch, offset = self.epoch + 1, 0


def _use_demo_data_if_unset(config: Config, accelerator) -> None:
    """Empty data.train_shards means the embedded demo set: generate it once, point at it."""
    data = config.data
    if data.train_shards:
        return
    arguments = (data.demo_dir, data.demo_train_samples, data.demo_val_samples, data.image_size)
    if accelerator.is_main_process:
        ensure_demo_data(*arguments, seed=0)
    accelerator.wait_for_everyone()
    demo = ensure_demo_data(*arguments, seed=0)  # already written: only reads the indexes
    data.train_shards = demo["train"]
    data.val_shards = data.val_shards or demo["val"]


def _to_device(batch: dict, device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# --- run directory, logging ----------------------------------------------------------------------


def _open_run_dir(config: Config, accelerator, resume_dir) -> tuple[Path, str]:
    """Create (or reopen, on resume) the run directory; returns it and the W&B run id."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        return run_dir, run_id
    name = config.train.run_name or broadcast_from_main(
        accelerator, f"{config.objective.name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    run_dir = Path(config.train.output_dir) / name
    if latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints: resume it with "
            f"--resume {run_dir} or pick another train.run_name"
        )
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} exists and is not a run directory; pick another run name")
    run_id = broadcast_from_main(accelerator, uuid.uuid4().hex[:12])
    if accelerator.is_main_process:
        if run_dir.exists():  # an earlier start of this run that died before its first checkpoint
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({"run_id": run_id}))
    accelerator.wait_for_everyone()
    return run_dir, run_id


class _Window:
    """Running sums of the objective's scalar outputs between two log lines, kept on device so
    the loop never waits for the host."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, outputs: dict, accum: int) -> None:
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                previous = self.sums.get(key, torch.zeros((), device=self.device))
                self.sums[key] = previous + value.detach().float() / accum

    def means(self, accelerator) -> dict:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[key] for key in keys]) / max(1, self.steps)
        averaged = mean_across_processes(accelerator, stacked).tolist()
        return dict(zip(keys, averaged))

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)


@torch.no_grad()
def _log_pictures(model, batch: dict, tracker: Tracker, step: int) -> None:
    if not hasattr(model, "visualize"):
        return
    was_training = model.training
    model.eval()
    for name, rows in model.visualize(batch).items():  # rows: [R, C, 3, H, W]
        tracker.log_images(
            name,
            rows.flatten(0, 1),
            step,
            columns=rows.shape[1],
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    model.train(was_training)
