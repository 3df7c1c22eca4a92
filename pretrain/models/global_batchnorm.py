"""BatchNorm over the global batch: in training, every process normalises with the mean and
variance of ALL processes' samples, and the running statistics (the same on every rank) follow
those global statistics. SimCLR trains this way: with per-process BatchNorm and small
per-process batches the model can tell a positive pair apart by the batch statistics it shares.

On GPUs the layers become torch's nn.SyncBatchNorm (fused kernels). torch's layer refuses CPU
tensors, so elsewhere (gloo) they become GlobalBatchNorm below: the same statistics from one
autograd-aware all-gather of each process's (mean, sum of squared deviations, count) per channel,
combined with the parallel variance formula (no E[x^2] - E[x]^2 cancellation). Both keep the
parameters, buffers and state-dict keys of the BatchNorm they replace, so checkpoints and the
timm export are unchanged. With one process, or in eval mode, both are plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.distributed import stack_with_grad, world_info


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics span every process's batch, on any backend."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_info()[1] == 1:
            return super().forward(input)  # plain BatchNorm (running-stat update included)
        self._check_input_dim(input)
        mean, var, count = self._global_statistics(input)  # (C,), (C,) biased, () samples
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), var.detach(), count)
        shape = (1, -1) + (1,) * (input.dim() - 2)  # broadcast over N and spatial dims
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out = (input - mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)

    def _global_statistics(self, input: torch.Tensor):
        """input [N, C, *] on this process -> the global batch's mean and biased variance (C,)
        and its sample count per channel (0-dim), differentiable through every process's input."""
        dims = [0, *range(2, input.dim())]
        values = input.to(torch.promote_types(input.dtype, torch.float32))  # stats in >= fp32
        local_count = values.numel() // values.shape[1]
        local_mean = values.mean(dims)  # (C,)
        local_m2 = (values - local_mean.view(1, -1, *[1] * (input.dim() - 2))).square().sum(dims)
        count = torch.full((1,), float(local_count), dtype=values.dtype, device=values.device)
        stats = stack_with_grad(torch.cat([local_mean, local_m2, count]))  # (W, 2C + 1)
        channels = local_mean.shape[0]
        means, m2s, counts = stats.split([channels, channels, 1], dim=1)  # (W, C), (W, C), (W, 1)
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        # Chan et al.'s parallel formula: within-process deviations + between-process spread.
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        return mean, m2 / total, total

    @torch.no_grad()
    def _update_running_statistics(self, mean, var, count) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def use_global_batchnorm(module: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Every BatchNorm1d/2d/3d in `module` replaced by a global one (nn.SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere) sharing its parameters and buffers. Returns the module (a new one
    only when `module` itself is a BatchNorm) and the number of layers replaced."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (nn.SyncBatchNorm, GlobalBatchNorm)
    ):
        kind = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
        replacement = kind(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(replacement, name, getattr(module, name))
        replacement.train(module.training)
        return replacement, 1
    replaced = 0
    for name, child in module.named_children():
        new_child, count = use_global_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
        replaced += count
    return module, replaced
