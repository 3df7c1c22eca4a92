"""Checkpoints that survive a crash mid-save, the timm-loadable encoder export, and the text
encoder export (open_clip-loadable).

A checkpoint is a folder `checkpoints/step_0000100/` holding `model.safetensors`,
`optimizer.pt` (tensors and plain values only, loaded with weights_only=True) and `state.json`
(step, counts, batch layout, fp16 loss scale: pretrain.resume). The layout is that of an
unsharded model whatever the run: FSDP runs gather their full state first (pretrain.sharding).
It is written under a temporary name and renamed into place last, so a crash at any point leaves
either the complete new folder or none, and the previous checkpoint stays loadable. Old
checkpoints are renamed out of the listing before they are deleted, so a crash while pruning
never leaves a half-deleted folder that looks complete.

Weights with NaN or Inf are never written: saving them raises NonFiniteWeightsError, and the last
good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
EXPORT = "export"
TEXT_CARD = "text_encoder.json"  # a text encoder's export (mlm): this card + TEXT_WEIGHTS
TEXT_WEIGHTS = "text_encoder.safetensors"
_PREFIX = "step_"
_PARTIAL = ".partial-"  # being written
_DISCARDED = ".discarded-"  # being deleted


class NonFiniteWeightsError(RuntimeError):
    """Refused to save weights holding NaN or Inf; the message names the first such tensor."""


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, optimizer_state: dict, state: dict, keep: int
) -> Path:
    """Write checkpoints/step_<step>/ atomically, then keep only the newest `keep` (0: all)."""
    _check_finite(model_state)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)  # of a save or prune that crashed
    final = root / f"{_PREFIX}{step:07d}"
    partial = root / f"{_PARTIAL}{final.name}"
    partial.mkdir()
    save_file(_contiguous(model_state), str(partial / "model.safetensors"))
    torch.save(optimizer_state, partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(partial)
    if final.exists():  # the same step saved again: move the old copy aside, then swap
        _discard(final)
    os.replace(partial, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _discard(old)
    _remove_leftovers(root)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial or discarded folders are never listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, state.json). Nothing in a checkpoint can run code: the
    model is safetensors and the optimizer file is read with weights_only=True."""
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return model_state, optimizer_state, state


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json alone (step, counts, batch layout), without the weights."""
    return json.loads((Path(path) / "state.json").read_text())


def export_encoder(
    run_dir: Path, encoder_state: dict, spec_name: str, spec_kwargs: dict, meta: dict
):
    """`export/encoder.safetensors` + `export/encoder.json` ({"timm_name", "timm_kwargs", ...}).

    timm.create_model(timm_name, **timm_kwargs).load_state_dict(weights, strict=True) rebuilds it.
    """
    _check_finite(encoder_state)
    root = Path(run_dir) / EXPORT
    root.mkdir(parents=True, exist_ok=True)
    weights, card = root / "encoder.safetensors", root / "encoder.json"
    save_file(_contiguous(encoder_state), str(root / ".encoder.safetensors.tmp"))
    os.replace(root / ".encoder.safetensors.tmp", weights)
    description = {"timm_name": spec_name, "timm_kwargs": spec_kwargs, **meta}
    (root / ".encoder.json.tmp").write_text(json.dumps(description, indent=1))
    os.replace(root / ".encoder.json.tmp", card)
    return weights, card


def export_text_encoder(run_dir: Path, encoder_state: dict, card: dict) -> tuple[Path, Path]:
    """`export/text_encoder.safetensors` + `export/text_encoder.json` (the card: open_clip class
    and arguments, tokenizer settings, objective, steps), next to the image encoders' export."""
    _check_finite(encoder_state)
    root = Path(run_dir) / EXPORT
    root.mkdir(parents=True, exist_ok=True)
    weights, card_path = root / TEXT_WEIGHTS, root / TEXT_CARD
    save_file(_contiguous(encoder_state), str(root / f".{TEXT_WEIGHTS}.tmp"))
    os.replace(root / f".{TEXT_WEIGHTS}.tmp", weights)
    (root / f".{TEXT_CARD}.tmp").write_text(json.dumps(card, indent=1))
    os.replace(root / f".{TEXT_CARD}.tmp", card_path)
    return weights, card_path


def _check_finite(state: dict) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"refusing to save non-finite weights: {name} has NaN/Inf")


def _contiguous(state: dict) -> dict:
    # safetensors refuses views that share storage; a detached contiguous copy per tensor is safe.
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()
    }


def _discard(folder: Path) -> None:
    """Take a checkpoint out of the listing in one rename, then delete it."""
    doomed = folder.with_name(f"{_DISCARDED}{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith((_PARTIAL, _DISCARDED)):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
