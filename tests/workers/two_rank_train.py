"""Launched by tests under `accelerate launch`/torchrun: train, then dump this rank's weights."""

import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.engine import train


def dump(objective, accelerator):
    out = Path(sys.argv[1])
    state = {name: tensor.detach().cpu() for name, tensor in objective.state_dict().items()}
    torch.save(state, out / f"params_rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    train(load_config(None, sys.argv[2:]), on_end=dump)
