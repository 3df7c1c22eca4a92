"""Launched by tests under torchrun (any number of processes): train (or continue) a run, and
save what the run held right after its start: the full model and optimizer state (gathered when
sharded), the step it starts from and its batch layout, to OUT/start.pt (main process).

usage: restore_worker.py OUT section.key=value ...
"""

import sys
from pathlib import Path

import torch

from pretrain import sharding
from pretrain.config import load_config
from pretrain.engine import train


def dump_start(run) -> None:
    model = sharding.model_state(run.objective)
    optimizers = {
        phase: sharding.optimizer_state(run.objective, optimizer)
        for phase, optimizer in zip(run.phases, run.optimizers)
    }
    if run.accelerator.is_main_process:
        started = {
            "model": model,
            "optimizers": optimizers,
            "start_step": run.start_step,
            "layout": run.layout.as_state(),
            "sharded": run.sharded,
        }
        torch.save(started, Path(sys.argv[1]) / "start.pt")


if __name__ == "__main__":
    train(load_config(None, sys.argv[2:]), on_start=dump_start)
