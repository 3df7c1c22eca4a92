"""Every shipped pretraining config loads and builds its objective (on the meta device: shapes
only, so the paper-sized ones cost no memory)."""

import pytest
import torch
from helpers import ROOT

from pretrain.config import load_config
from pretrain.objectives import build_objective

CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))


def test_the_config_folder_is_found():
    assert len(CONFIGS) >= 14


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_pretrain_config_builds_its_objective(path):
    config = load_config(path, [])
    with torch.device("meta"):
        objective, spec = build_objective(config)
    assert sum(parameter.numel() for parameter in objective.parameters()) > 0
    assert objective.encoder is not None and spec is not None
