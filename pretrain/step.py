"""One optimizer step, the same for pretraining, finetuning and the benchmarks.

For each optimizer phase in order (one phase, "main", unless the objective has several; a GAN
has two): set the phase's lr, run forward + backward over the micro-batches (gradient
accumulation; DDP all-reduces, FSDP reduce-scatters, on the last micro-batch only), clip (the norm
is computed and logged even without a limit), check that every rank's loss and gradient norm are
finite, step (or skip on every rank), and zero all gradients.

How the micro-batches make one step's gradients is the `accumulate` argument: by default each
micro-batch's loss on its own (`separate_micro_batches`); objectives whose loss couples the
samples of a batch use pretrain.grad_cache.GradCache, which keeps the whole step's batch in one
loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.faults import finite_on_every_rank
from pretrain.optim import set_learning_rate
from pretrain.sharding import clip_grad_norm, no_gradient_sync

# (batch, phase) -> outputs {"loss": scalar, ...}; the caller closes over the model
Forward = Callable[[dict, str], dict]
# (accelerator, model, micro_batches, forward, phase, on_outputs) -> the phase's loss (detached)
Accumulate = Callable[..., torch.Tensor]


@dataclass
class StepResult:
    finite: bool  # every phase's loss and gradients were finite on every rank (else skipped)
    grad_norms: dict[str, torch.Tensor]  # phase -> global gradient norm before clipping


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch and numpy from (seed, step, rank): random draws inside a step (masks, noise,
    drop path, mixup) depend on nothing else, so a resumed run repeats them exactly."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed & 0xFFFF_FFFF)


def optimizer_step(
    accelerator,
    model: torch.nn.Module,
    phases: dict[str, list[tuple[str, torch.nn.Parameter]]],
    optimizers: list[torch.optim.Optimizer],
    micro_batches: list[dict],
    forward: Forward,
    lr: float,
    clip_grad: float | None = None,
    on_outputs: Callable[[dict, str], None] | None = None,
    check_finite: bool = True,
    accumulate: Accumulate | None = None,
) -> StepResult:
    """One step of every phase over `micro_batches` (the step's batch, split for accumulation).

    model: the prepared (possibly DDP-wrapped or sharded) model, for no_sync and zero_grad.
    phases and optimizers: one optimizer per phase, in stepping order. on_outputs(outputs, phase)
    is called once per micro-batch (for logging; under GradCache each call gets the whole step's
    outputs, so a mean over the calls is the step's value). check_finite=False skips the finite
    check and the host wait that comes with it (benchmarks only). accumulate: see the module
    docstring (default: separate_micro_batches).
    """
    accumulate = accumulate or separate_micro_batches
    grad_norms, step_is_finite = {}, True
    for (phase, named), optimizer in zip(phases.items(), optimizers):
        set_learning_rate(optimizer, lr)
        phase_loss = accumulate(accelerator, model, micro_batches, forward, phase, on_outputs)
        parameters = [parameter for _, parameter in named]
        grad_norm = clip_grad_norm(accelerator, optimizer, parameters, clip_grad or float("inf"))
        grad_norms[phase] = grad_norm
        # A NaN/Inf loss or gradient on any rank skips this update on every rank. fp16's
        # GradScaler skips such steps itself and must see step() to lower its scale.
        finite = finite_on_every_rank(accelerator, phase_loss, grad_norm) if check_finite else True
        step_is_finite = step_is_finite and finite
        if finite or accelerator.scaler is not None:
            optimizer.step()
        # All gradients, not only this phase's: its backward may have reached other phases'
        # parameters (a generator loss flows through the discriminator).
        model.zero_grad(set_to_none=True)
    return StepResult(step_is_finite, grad_norms)


def separate_micro_batches(
    accelerator, model, micro_batches: list[dict], forward: Forward, phase: str, on_outputs
) -> torch.Tensor:
    """Forward + backward of each micro-batch's own loss / K; returns the sum of the losses.
    The gradients are reduced across processes on the last micro-batch only."""
    accum = len(micro_batches)
    phase_loss = torch.zeros((), device=accelerator.device)
    for micro_step, batch in enumerate(micro_batches):
        last = micro_step == accum - 1
        with contextlib.nullcontext() if last else no_gradient_sync(accelerator, model):
            outputs = forward(batch, phase)
            accelerator.backward(outputs["loss"] / accum)
        phase_loss += outputs["loss"].detach().float()
        if on_outputs is not None:
            on_outputs(outputs, phase)
    return phase_loss
