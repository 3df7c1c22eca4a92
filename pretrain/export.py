"""What a finished run leaves for others: the encoder, in timm's form (export/encoder.* and the
Hugging Face Hub layout beside it), or an Exporting objective's own export (mlm's text encoder)."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain import sharding
from pretrain.checkpoint import export_encoder
from pretrain.hub import write_hub_layout
from pretrain.models.encoder import EncoderSpec
from pretrain.objectives import Exporting


def encoder_state(objective: torch.nn.Module) -> dict | None:
    """The encoder's state dict; a sharded objective's is gathered, which every rank must join
    (the main process gets it, the others None)."""
    if not sharding.is_sharded(objective):
        return objective.encoder.state_dict()
    gathered = sharding.model_state(objective)  # every rank
    return sharding.submodule_state(gathered, "encoder") if gathered else None


def export_run(
    run_dir: Path, objective: torch.nn.Module, spec: EncoderSpec, state: dict, meta: dict
) -> Path:
    """Main process: write the export of `objective` (its encoder's `state`); returns the
    weights file. meta: objective, steps, image_size, mean, std, run_dir."""
    if isinstance(objective, Exporting):  # not a timm image encoder (mlm: text)
        return objective.export(run_dir, meta, state)
    weights, _ = export_encoder(run_dir, state, spec.name, spec.kwargs, meta)
    write_hub_layout(weights.parent, spec.name, spec.kwargs, meta)
    return weights
