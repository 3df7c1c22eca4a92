"""Run tracking: W&B through Accelerate's tracker (main process only), metrics.jsonl, PNG grids,
and the window of metrics between two log lines.

W&B goes offline when no API key is configured, so a run never waits on the network; set
`logging.wandb=false` to skip it entirely. `metrics.jsonl` in the run directory is always written.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torchvision.utils import make_grid, save_image

from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.distributed import mean_across_processes
from pretrain.objectives import Visualizing


def wandb_mode(requested: str) -> str:
    """'online' only when a key is configured (env or ~/.netrc); an explicit WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"
    return "online" if any("wandb" in host for host in hosts) else "offline"


class Tracker:
    def __init__(
        self, accelerator: Accelerator, run_dir: Path, settings, run_id: str, config: dict
    ):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.use_wandb = settings.wandb
        self.is_main = accelerator.is_main_process
        if not self.is_main:
            return
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if self.use_wandb:
            import wandb

            accelerator.init_trackers(
                settings.wandb_project,
                config=config,
                init_kwargs={
                    "wandb": {
                        "mode": wandb_mode(settings.wandb_mode),
                        "entity": settings.wandb_entity,
                        "dir": str(self.run_dir),
                        "name": self.run_dir.name,
                        "id": run_id,
                        "resume": "allow",  # a resumed run continues the same W&B run
                        "settings": wandb.Settings(console="off", silent=True),
                    }
                },
            )

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.use_wandb:
            self.accelerator.log(metrics, step=step)

    def log_images(self, name: str, images: torch.Tensor, step: int, columns: int, mean, std):
        """images: [K, 3, H, W] in normalized space -> one PNG grid (and a W&B image)."""
        if not self.is_main:
            return
        mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0, 1).cpu()
        grid = make_grid(pixels, nrow=columns, padding=1)
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}_step{step:07d}.png"
        save_image(grid, path)
        if self.use_wandb:
            # HWC uint8 array: what wandb.Image takes without guessing the layout.
            array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            self.accelerator.get_tracker("wandb").log_images({name: [array]}, step=step)
        return path

    @torch.no_grad()
    def log_pictures(
        self, objective: torch.nn.Module, batch: dict, step: int, every_rank: bool = False
    ) -> None:
        """The objective's pictures of `batch` (a Visualizing objective's), in eval mode.
        every_rank: every process computes them (a sharded model's forward needs all of them),
        the main process writes them."""
        if not (self.is_main or every_rank) or not isinstance(objective, Visualizing):
            return
        was_training = objective.training
        objective.eval()
        for name, rows in objective.visualize(batch).items():  # rows: [R, C, 3, H, W]
            columns = rows.shape[1]
            self.log_images(name, rows.flatten(0, 1), step, columns, IMAGENET_MEAN, IMAGENET_STD)
        objective.train(was_training)

    def finish(self) -> None:
        if not self.is_main:
            return
        self.metrics_file.close()
        if self.use_wandb:
            # Not accelerator.end_training(): that also tears down the process group.
            self.accelerator.get_tracker("wandb").finish()


class MetricWindow:
    """Running sums of the objective's scalar outputs between two log lines, kept on device so
    the loop never waits for the host."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, outputs: dict, accum: int) -> None:
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                previous = self.sums.get(key, torch.zeros((), device=self.device))
                self.sums[key] = previous + value.detach().float() / accum

    def means(self, accelerator) -> dict:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[key] for key in keys]) / max(1, self.steps)
        averaged = mean_across_processes(accelerator, stacked).tolist()
        return dict(zip(keys, averaged))

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)
