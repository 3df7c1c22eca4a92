"""Launched by test_fault_tolerance: MAE whose loss is NaN on chosen steps of one rank.

    fault_nonfinite_worker.py OUT NAN_STEPS NAN_RANK [section.key=value ...]

NAN_STEPS: comma-separated 0-based optimizer steps (grad_accum 1, a fresh run); NAN_RANK: the
rank whose loss turns NaN. Runs the real CLI; each rank dumps its parameters to
OUT/params_rank{R}.pt when training ends normally.
"""

import os
import sys
from pathlib import Path

import torch

from pretrain import engine
from pretrain.__main__ import main
from pretrain.objectives import OBJECTIVES, register_objective
from pretrain.objectives.mae import build_mae

out, nan_steps, nan_rank = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
bad_steps = {int(step) for step in nan_steps.split(",") if step}
rank = int(os.environ.get("RANK", "0"))


@register_objective("mae_with_nan", train_transform=OBJECTIVES["mae"].train_transform)
def build_mae_with_nan(config):
    objective, spec = build_mae(config)
    forward, calls = objective.forward, iter(range(10**9))

    def forward_with_nan(batch):
        outputs = forward(batch)
        if next(calls) in bad_steps and rank == nan_rank:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs

    objective.forward = forward_with_nan  # DDP calls module(batch) -> this instance attribute
    return objective, spec


def dump(objective, accelerator):
    state = {name: tensor.detach().cpu() for name, tensor in objective.state_dict().items()}
    torch.save(state, out / f"params_rank{accelerator.process_index}.pt")


train = engine.train
engine.train = lambda config, resume_dir=None: train(config, resume_dir, on_end=dump)
sys.exit(main(["objective.name=mae_with_nan", *sys.argv[4:]]))
