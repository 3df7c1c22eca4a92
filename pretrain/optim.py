"""Optimizers, their phases and the learning-rate schedule, for pretraining and finetuning.

Optimizers: AdamW (MAE, CLIP) and LARS (SimCLR at large batch). Weight decay applies to weight
matrices only: biases and norm parameters (1-D) and whatever a module lists in
`no_weight_decay()` (timm's convention: position embeddings, cls/register tokens) get none, and
LARS also leaves them out of its trust ratio, as in the SimCLR recipe.

Learning rate: `scaled_lr` (lr = blr x global batch / 256 unless an absolute lr is given), then
`learning_rate` per optimizer step (linear warmup, half-cosine), applied with
`set_learning_rate` (times each group's `lr_scale`, which layer-wise decay sets).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pretrain.objectives import PhasedObjective

if TYPE_CHECKING:
    from pretrain.config import OptimizerConfig


def scaled_lr(blr: float, lr: float | None, global_batch: int) -> float:
    """`lr` when given, else the linear scaling rule blr x global batch / 256 (Goyal et al.;
    the MAE recipes state their lr this way)."""
    return lr or blr * global_batch / 256


def learning_rate(step: int, base_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup over `warmup` optimizer steps, then half-cosine down to `min_lr`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = lr x its `lr_scale` (1 unless layer-wise decay set one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_phases(objective: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """{phase: [(name, parameter)]}: a PhasedObjective's own phases, or one phase "main" with
    all trainable parameters. A parameter may belong to one phase only."""
    if not isinstance(objective, PhasedObjective):
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


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Full parameter names that modules exempt from weight decay through `no_weight_decay()`."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    return names


def build_optimizer(
    named_parameters: list[tuple[str, torch.nn.Parameter]],
    skip_decay: set[str],
    settings: OptimizerConfig,
    lr: float,
) -> torch.optim.Optimizer:
    """One optimizer over `named_parameters`: a decayed group and an excluded group."""
    decay, excluded = [], []
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            (excluded if parameter.ndim <= 1 or name in skip_decay else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    groups = [group for group in groups if group["params"]]
    if settings.name == "lars":
        return LARS(groups, lr=lr, momentum=settings.momentum, eta=settings.trust_coefficient)
    for group in groups:
        del group["lars_exclude"]
    # Fused kernels on CUDA and CPU: measurably faster than foreach (benchmarks/speedups.py).
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = (bool(devices) and devices <= {"cuda", "cpu"}) or None
    return torch.optim.AdamW(groups, lr=lr, betas=settings.betas, eps=settings.eps, fused=fused)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017).

    For each parameter tensor w with gradient g (decay folded in: g <- g + wd * w) the step is
    scaled by eta * ||w|| / ||g||, so every layer moves by about the same relative amount whatever
    its gradient scale. Groups with `lars_exclude=True` (biases, norms) take a plain momentum step.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm = torch.linalg.vector_norm(parameter)
                    update_norm = torch.linalg.vector_norm(update)
                    # ratio 1 where either norm is zero (fresh zero-initialised layers)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0),
                        group["eta"] * weight_norm / update_norm,
                        torch.ones_like(weight_norm),
                    )
                    update = update * trust
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
