"""Checkpoints that survive a crash mid-save, and the timm-loadable encoder export.

A checkpoint is a folder `checkpoints/step_0000100/` holding `model.safetensors`,
`optimizer.pt` (tensors and plain values only, loaded with weights_only=True) and `state.json`.
It is written under a temporary name and renamed into place last, so a crash at any point leaves
either the complete new folder or none, and the previous checkpoint stays loadable.
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
_PREFIX = "step_"
_PARTIAL = ".partial-"


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, optimizer_state: dict, state: dict, keep: int
) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:07d}"
    partial = root / f"{_PARTIAL}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash
    partial.mkdir()
    save_file(_contiguous(model_state), str(partial / "model.safetensors"))
    torch.save(optimizer_state, partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(partial)
    if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial folders are never listed."""
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
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return model_state, optimizer_state, state


def export_encoder(
    run_dir: Path, encoder_state: dict, spec_name: str, spec_kwargs: dict, meta: dict
):
    """`export/encoder.safetensors` + `export/encoder.json` ({"timm_name", "timm_kwargs", ...}).

    timm.create_model(timm_name, **timm_kwargs).load_state_dict(weights, strict=True) rebuilds it.
    """
    root = Path(run_dir) / EXPORT
    root.mkdir(parents=True, exist_ok=True)
    weights, card = root / "encoder.safetensors", root / "encoder.json"
    save_file(_contiguous(encoder_state), str(root / ".encoder.safetensors.tmp"))
    os.replace(root / ".encoder.safetensors.tmp", weights)
    description = {"timm_name": spec_name, "timm_kwargs": spec_kwargs, **meta}
    (root / ".encoder.json.tmp").write_text(json.dumps(description, indent=1))
    os.replace(root / ".encoder.json.tmp", card)
    return weights, card


def _contiguous(state: dict) -> dict:
    # safetensors refuses views that share storage; a detached contiguous copy per tensor is safe.
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()
    }


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
