"""Process-group facts and the few collectives the engine needs; nothing else calls collectives."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list


class LaunchError(RuntimeError):
    """The launcher and the process group disagree; one line for the user."""


def make_accelerator(mixed_precision: str, log_with: str | None) -> Accelerator:
    """An Accelerator that really spans the launcher's processes, on GPU or CPU.

    Without CUDA a plain Accelerator() under a multi-process launcher quietly starts N separate
    single-process runs; cpu=True makes it build a gloo group instead. The world-size check
    catches any other way of ending up there.
    """
    has_cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(cpu=not has_cuda, mixed_precision=mixed_precision, log_with=log_with)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"launcher asked for {expected} processes but the process group has "
            f"{accelerator.num_processes}; check the accelerate/torchrun arguments"
        )
    return accelerator


def broadcast_from_main(accelerator: Accelerator, value):
    """The main process's `value` on every process (e.g. a run name made from the clock)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def mean_across_processes(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="mean")


def sum_across_processes(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum")
