"""Helpers the tests import (`from helpers import ...`): paths, ports, the environment of the
subprocesses tests start, and the real 2-process accelerate launch several tests share. The
scripts those subprocesses run live in tests/workers/."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def train_on_two_ranks(tmp_path: Path, overrides: list[str], timeout: int = 300):
    """A real `accelerate launch` of 2 gloo CPU processes running tests/workers/two_rank_train.py.

    Returns (rank 0's state dict, rank 1's state dict, the launcher's stdout + stderr); fails
    the test with the tail of stderr when the launch fails.
    """
    import torch

    command = [
        PYTHON, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no",
        str(WORKERS / "two_rank_train.py"), str(tmp_path), *overrides,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    return states[0], states[1], result.stdout + result.stderr


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torch's launcher starts each training process
    in a session of its own, so killing the launcher's process group would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, index = [pid], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_after_checkpoint(process: subprocess.Popen, run_dir: Path, step: int) -> int:
    """SIGKILL a training launch (launcher, ranks, loader workers) once its checkpoint of `step`
    exists; returns the step of the latest checkpoint it left behind."""
    from pretrain.checkpoint import latest_checkpoint, list_checkpoints

    name = f"step_{step:07d}"
    wait_for(lambda: any(p.name == name for p in list_checkpoints(run_dir)), f"step {step}")
    kill_tree(process.pid)
    process.wait(timeout=60)
    return int(latest_checkpoint(run_dir).name[len("step_") :])
