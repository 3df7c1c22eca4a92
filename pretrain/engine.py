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

Fault tolerance: SIGTERM or SIGUSR1 (preemption; Slurm's warning before the time limit) only
raise a flag; at the next step boundary all ranks agree through one tiny all-reduce, write a
checkpoint and stop (the CLI exits with EXIT_PREEMPTED). A run directory (train.run_name) that
already holds checkpoints is continued from the latest one, so rerunning the same command
resumes. A step whose loss or gradients are NaN/Inf on any rank is skipped on every rank and
counted; train.max_nonfinite_steps of them in a row stop the run, and non-finite weights are
never saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType
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
    A run stopped by SIGTERM/SIGUSR1 returns early, checkpointed, with "stopped_by" set.
    """
    with StopSignals() as stop_signals:
        return _train(config, resume_dir, on_end, stop_signals)


def _train(config: Config, resume_dir, on_end, stop_signals: StopSignals) -> dict:
    started = time.perf_counter()
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
    phases = optimizer_phases(objective)  # {phase: [(name, parameter)]}, in stepping order
    phased = hasattr(objective, "optimizer_phases")
    accelerator = make_accelerator(
        config.train.mixed_precision,
        "wandb" if config.logging.wandb else None,
        find_unused_parameters=phased,  # a phase's backward reaches only part of the model
    )
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    if accelerator.distributed_type == DistributedType.FSDP:
        # Checkpoints, pictures and the export read the whole model on the main process; with
        # sharded parameters that needs a full-state gather on every rank first (not built yet).
        raise ConfigError(
            "FSDP launches are not supported by the engine yet (checkpoints need a full-state "
            "gather); launch with DDP, e.g. launch/accelerate_1node_8gpu.yaml"
        )
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
    checkpoint = latest_checkpoint(run_dir)  # None for a new run
    model, *optimizers = accelerator.prepare(objective, *optimizers)
    start_step, skipped_before, nonfinite_steps = 0, 0, 0
    if checkpoint is not None:
        model_state, optimizer_states, state = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        for phase, optimizer in zip(phases, optimizers):
            optimizer.load_state_dict(optimizer_states[phase])
        start_step = state["step"]
        skipped_before = _own_count(state, rank, accelerator.num_processes)
        nonfinite_steps = state.get("nonfinite_steps", 0)

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
    nonfinite_in_a_row, stopped_by = 0, None
    model.train()
    time_limit_s = (config.train.time_limit_minutes or 0) * 60
    for step in range(start_step, config.train.steps):
        torch.manual_seed(_step_seed(config.train.seed, step, rank))
        lr = learning_rate(
            step, base_lr, config.schedule.warmup_steps, config.train.steps, config.schedule.min_lr
        )
        micro_batches = [_to_device(next(batches), accelerator.device) for _ in range(accum)]
        grad_norms = {}
        step_is_finite = True
        for (phase, named), optimizer in zip(phases.items(), optimizers):
            for group in optimizer.param_groups:
                group["lr"] = lr
            phase_loss = torch.zeros((), device=accelerator.device)
            for micro_step, batch in enumerate(micro_batches):
                # Gradients are all-reduced on the last micro-batch only.
                last = micro_step == accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    outputs = model(batch, phase=phase) if phased else model(batch)
                    accelerator.backward(outputs["loss"] / accum)
                phase_loss += outputs["loss"].detach().float()
                window.add(_phase_outputs(outputs, phase) if phased else outputs, accum)
            grad_norm = accelerator.clip_grad_norm_(
                [parameter for _, parameter in named], config.train.clip_grad or float("inf")
            )
            grad_norms[f"grad_norm_{phase}" if phased else "grad_norm"] = grad_norm
            # A NaN/Inf loss or gradient on any rank skips this update on every rank. fp16's
            # GradScaler skips such steps itself and must see step() to lower its scale.
            finite = _finite_on_every_rank(accelerator, phase_loss, grad_norm)
            step_is_finite = step_is_finite and finite
            if finite or accelerator.scaler is not None:
                optimizer.step()
            # All gradients, not only this phase's: its backward may have reached other phases'
            # parameters (a generator loss flows through the discriminator).
            model.zero_grad(set_to_none=True)
        done = step + 1
        window.steps += 1
        progress.update(1)
        nonfinite_in_a_row = 0 if step_is_finite else nonfinite_in_a_row + 1
        if not step_is_finite:
            nonfinite_steps += 1
            if is_main:
                print(f"step {done}: NaN/Inf loss or gradients, update skipped", file=sys.stderr)
        if config.train.max_nonfinite_steps and (
            nonfinite_in_a_row >= config.train.max_nonfinite_steps
        ):
            raise NonFiniteLossError(
                f"{nonfinite_in_a_row} steps in a row had NaN/Inf losses or gradients (steps "
                f"{done - nonfinite_in_a_row + 1}-{done}, none applied): lower the learning rate, "
                "set train.clip_grad, or check the data"
            )
        if done < total_steps:
            out_of_time = bool(time_limit_s) and time.perf_counter() - started > time_limit_s
            stopped_by, out_of_time = _stop_on_any_rank(accelerator, stop_signals, out_of_time)
            if out_of_time:  # end here like a finished run: log, checkpoint, export
                total_steps = done

        if done % config.logging.log_every == 0 or done == total_steps:
            skipped = sum(_per_rank(accelerator, stream.skipped + skipped_before))
            last_metrics = {
                **window.means(accelerator),
                "lr": lr,
                **{name: float(norm) for name, norm in grad_norms.items()},
                "img_per_s": window.steps * global_batch / window.elapsed(),
                "skipped_samples": skipped,
                "nonfinite_steps": nonfinite_steps,
                "epoch": stream.epoch,
            }
            tracker.log(last_metrics, step=done)
            progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", lr=f"{lr:.2e}")
            window.reset()

        image_every = config.logging.image_every
        if is_main and image_every and (done % image_every == 0 or done == total_steps):
            _log_pictures(accelerator.unwrap_model(model), batch, tracker, done)

        if done % config.train.checkpoint_every == 0 or done == total_steps or stopped_by:
            skipped_per_rank = _per_rank(accelerator, stream.skipped + skipped_before)
            if is_main:
                save_checkpoint(
                    run_dir,
                    done,
                    accelerator.unwrap_model(model).state_dict(),
                    {phase: opt.state_dict() for phase, opt in zip(phases, optimizers)},
                    {
                        "skipped_samples": sum(skipped_per_rank),
                        "skipped_samples_per_rank": skipped_per_rank,
                        "nonfinite_steps": nonfinite_steps,
                    },
                    keep=config.train.keep_checkpoints,
                )
            accelerator.wait_for_everyone()
        if stopped_by or done == total_steps:
            break
    progress.close()
    if stopped_by:
        tracker.finish()
        if is_main:
            print(
                f"stopped by {stopped_by} after step {done} (checkpoint written); run the same "
                "command again to continue",
                file=sys.stderr,
                flush=True,
            )
        accelerator.wait_for_everyone()
        return {"objective": config.objective.name, "steps": done, "stopped_by": stopped_by}
    skipped_per_rank = _per_rank(accelerator, stream.skipped + skipped_before)
    if on_end is not None:
        on_end(accelerator.unwrap_model(model), accelerator)

    summary = {
        "objective": config.objective.name,
        "steps": total_steps,
        "final_loss": last_metrics.get("loss"),
        "skipped_samples": sum(skipped_per_rank),
        "skipped_samples_per_rank": skipped_per_rank,
        "nonfinite_steps": nonfinite_steps,
        "time_limit_reached": total_steps < config.train.steps,
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
            batches = iter(self._loader)
            with stop_signals_blocked():  # the loader's worker processes start here
                first = next(batches, None)
            if first is None:
                raise RuntimeError("the training shards yielded no readable samples")
            yield first
            yield from batches
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


# --- stopping early: signals, non-finite steps ---------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps steps in a row had NaN/Inf losses or gradients (one line)."""


class StopSignals:
    """SIGTERM and SIGUSR1 only note that a stop was asked for; the loop stops at the next step
    boundary. Installed from the main thread only, the previous handlers restored on exit.
    The loader's worker processes ignore both (see stop_signals_blocked)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        self.received = signal.Signals(number).name


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGTERM and SIGUSR1 wait while this block runs (and are handled after it); processes
    forked meanwhile (DataLoader workers) keep them blocked for life. Launchers and Slurm signal
    every process of a job, and torch's loader workers die of SIGTERM, which would crash the
    training process instead of letting it checkpoint and stop. SIGKILL still ends a worker."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_on_any_rank(
    accelerator, stop_signals: StopSignals, out_of_time: bool
) -> tuple[str | None, bool]:
    """The same answer on every rank, from one tiny all-reduce: (the stop signal if any rank
    got one, else None; whether the main process's clock says the time limit is reached)."""
    flags = torch.tensor(
        [int(stop_signals.received is not None), int(out_of_time and accelerator.is_main_process)],
        device=accelerator.device,
    )
    signalled, timed_out = sum_across_processes(accelerator, flags).tolist()
    if signalled:
        return stop_signals.received or "a signal to another rank", False
    return None, timed_out > 0


def _finite_on_every_rank(accelerator, *values) -> bool:
    """Whether every rank's values are all finite: one tiny all-reduce, and the host waits."""
    checks = [torch.isfinite(torch.as_tensor(v, device=accelerator.device)).all() for v in values]
    nonfinite = (~torch.stack(checks).all()).to(torch.int64).reshape(1)
    return sum_across_processes(accelerator, nonfinite).item() == 0


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
    if latest_checkpoint(run_dir) is not None:  # the same command again: continue that run
        changed = _changed_settings(config, run_dir)
        if changed:
            raise ConfigError(
                f"run directory {run_dir} holds checkpoints of a run with other settings "
                f"({', '.join(changed)}): rerun the same command to continue it, or pick "
                "another train.run_name"
            )
        accelerator.wait_for_everyone()  # every rank has read the old config.yaml
        if accelerator.is_main_process:
            save_config(config, run_dir / "config.yaml")  # e.g. a longer train.steps
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        return run_dir, run_id
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


# What a continued run may change: how long it runs, how often it saves, what it logs.
_CHANGEABLE_ON_RESUME = (
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.time_limit_minutes",
    "train.compile",
    "logging.",
)


def _changed_settings(config: Config, run_dir: Path) -> list[str]:
    """Keys whose values differ from the run directory's config.yaml, apart from the changeable
    ones; keys that the saved config lacks (added to the code since) are not compared."""
    saved_file = run_dir / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else {}
    changed = []
    for section, values in to_dict(config).items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            before = (saved or {}).get(section) or {}
            if dotted.startswith(_CHANGEABLE_ON_RESUME) or key not in before:
                continue
            if before[key] != value:
                changed.append(dotted)
    return changed


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
