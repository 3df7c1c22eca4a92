"""Fixtures and test-session settings; helpers the tests import live in tests/helpers.py."""

import os
from pathlib import Path

import pytest

# Tests never talk to W&B servers and never compete with each other for the 2 cores.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small embedded demo dataset, written once per test session."""
    from pretrain.data import ensure_demo_data

    folder = tmp_path_factory.mktemp("demo")
    ensure_demo_data(folder, 256, 64, 32, seed=0)
    return folder


@pytest.fixture
def tiny_run(demo_dir, tmp_path):
    """Overrides for a few-second MAE run on the demo data."""
    return [
        f"data.demo_dir={demo_dir}",
        "data.demo_train_samples=256",
        "data.demo_val_samples=64",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "data.steps_per_epoch=4",
        "model.kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
        "mae.decoder_dim=32",
        "mae.decoder_depth=1",
        "train.steps=6",
        "train.checkpoint_every=3",
        "schedule.warmup_steps=2",
        "logging.log_every=2",
        "logging.image_every=3",
        "logging.wandb=false",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
