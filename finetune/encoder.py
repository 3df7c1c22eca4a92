"""Load an exported encoder (or build a random-init twin of it) from a run or export directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.checkpoint import EXPORT
from pretrain.models.encoder import EncoderSpec


class EncoderNotFound(ValueError):
    """--encoder names nothing loadable; one line for the user."""


def find_export(path: str | Path) -> Path:
    """A run directory, its export/ folder, or encoder.json itself -> the encoder.json path."""
    path = Path(path)
    for candidate in (path, path / "encoder.json", path / EXPORT / "encoder.json"):
        if candidate.is_file() and candidate.name == "encoder.json":
            return candidate
    raise EncoderNotFound(
        f"no encoder export at {path} (expected {path / EXPORT / 'encoder.json'})"
    )


def load_encoder(path: str | Path, random_init: bool = False, seed: int = 0):
    """Returns (encoder in eval mode, description dict from encoder.json).

    random_init: the same architecture, freshly initialised (seeded), weights not loaded: the
    baseline that shows what pretraining bought.
    """
    card_path = find_export(path)
    card = json.loads(card_path.read_text())
    torch.manual_seed(seed)
    encoder = EncoderSpec(card["timm_name"], card["timm_kwargs"]).create()
    if not random_init:
        weights = load_file(str(card_path.with_name("encoder.safetensors")))
        encoder.load_state_dict(weights, strict=True)
    return encoder.eval(), card
