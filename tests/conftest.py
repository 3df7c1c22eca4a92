import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to W&B servers and never compete with each other for the 2 cores.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


def train_on_two_ranks(tmp_path: Path, overrides: list[str], timeout: int = 300):
    """A real `accelerate launch` of 2 gloo CPU processes running tests/two_rank_train.py.

    Returns (rank 0's state dict, rank 1's state dict, the launcher's stdout + stderr); fails
    the test with the tail of stderr when the launch fails.
    """
    import subprocess

    import torch

    command = [
        PYTHON, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no",
        str(ROOT / "tests" / "two_rank_train.py"), str(tmp_path), *overrides,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    return states[0], states[1], result.stdout + result.stderr
