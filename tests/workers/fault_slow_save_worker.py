"""Launched by test_fault_tolerance: the real CLI, but the checkpoint of step BLOCK_STEP stops
after its files are written and before it is renamed into place, and touches OUT/saving, so
that the test can kill the process in the middle of a save.

    fault_slow_save_worker.py OUT BLOCK_STEP [section.key=value ...]
"""

import sys
import time
from pathlib import Path

from pretrain import checkpoint
from pretrain.__main__ import main

out, block_step = Path(sys.argv[1]), int(sys.argv[2])
fsync_tree = checkpoint._fsync_tree


def fsync_tree_then_hang(folder: Path) -> None:
    fsync_tree(folder)
    if folder.name.endswith(f"step_{block_step:07d}"):
        (out / "saving").touch()
        time.sleep(600)  # the test kills the process here


checkpoint._fsync_tree = fsync_tree_then_hang
sys.exit(main(sys.argv[3:]))
