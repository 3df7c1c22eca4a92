"""What the benchmarks measure: one objective's training step at one config, on synthetic data.

A workload is built from a project config exactly as the engine builds a run (objective from the
registry, optimizer groups and lr rule from pretrain.optim), and its step is the engine's own
(pretrain.step.optimizer_step) on one process: forward, backward, grad norm, the per-step finite
check that makes the host wait (optional, to measure its cost), optimizer step, zero_grad. The
batch comes from the objective's own train transform applied to random images, so it has
exactly the keys, shapes and dtypes of real training. Data loading is measured separately
(benchmarks/loader.py).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from PIL import Image

from benchmarks.harness import ROOT
from benchmarks.measure import count_flops
from pretrain.config import Config, load_config
from pretrain.data import collate
from pretrain.objectives import PhasedObjective, get_objective
from pretrain.optim import build_optimizer, no_weight_decay_names, optimizer_phases, scaled_lr
from pretrain.step import optimizer_step

CONFIG_DIR = ROOT / "configs" / "pretrain"
# The paper recipes in configs/pretrain for the objectives that have one.
CIFAR_CONFIGS = {  # CPU-sized recipes on 32 px CIFAR-10 shards
    "mae": "cifar_mae_vit_small.yaml",
    "simclr": "cifar_simclr_resnet18.yaml",
    "clip": "cifar_clip_vit.yaml",
}
PAPER_CONFIGS = {
    "mae": "mae_vit_base_imagenet.yaml",
    "simclr": "simclr_resnet50_imagenet.yaml",
    "clip": "clip_vit_b32.yaml",
}
CAPTION_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse")


def config_path(objective: str, kind: str) -> Path:
    """kind "demo": configs/pretrain/demo_<objective>.yaml; "cifar": the CIFAR-10 recipe;
    "paper": the paper recipe."""
    if kind == "demo":
        return CONFIG_DIR / f"demo_{objective}.yaml"
    if kind == "cifar" and objective in CIFAR_CONFIGS:
        return CONFIG_DIR / CIFAR_CONFIGS[objective]
    if kind == "paper" and objective in PAPER_CONFIGS:
        return CONFIG_DIR / PAPER_CONFIGS[objective]
    raise KeyError(f"no {kind} config for objective '{objective}'")


def load(objective: str, kind: str, overrides: list[str] = (), tiny: bool = False) -> Config:
    config = load_config(config_path(objective, kind), list(overrides))
    config.objective.name = objective  # demo_mae.yaml relies on the default objective
    if tiny:
        shrink(config)
    return config


def shrink(config: Config) -> None:
    """Test size: batch 4 and every width and depth cut down, same architecture family."""
    config.data.batch_size = 4
    kwargs = config.model.kwargs
    if "embed_dim" in kwargs:  # a ViT shrunk by the config: shrink it further
        kwargs.update(embed_dim=32, num_heads=2, depth=1)
    if "width" in kwargs:
        kwargs["width"] = 8
    sizes = {
        "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "simclr": {"projection_hidden_dim": 32, "projection_dim": 16},
        "clip": {"embed_dim": 32, "text_width": 32, "text_layers": 1, "text_heads": 2},
        "autoencoder": {"decoder_width": 8},
        "vae": {"decoder_width": 8},
        "gan": {"generator_width": 8},
    }
    for section, values in sizes.items():
        settings = getattr(config, section, None)
        for key, value in values.items():
            if settings is not None and hasattr(settings, key):
                setattr(settings, key, value)


# --- the synthetic batch -------------------------------------------------------------------------


def synthetic_batch(config: Config, batch_size: int, device, seed: int = 0) -> dict:
    """A batch as the objective's train transform makes it from random RGB images with labels
    and captions: {"image": (B, 3, H, W), "image2"?, "text"?, "label"} on `device`.

    At most 64 distinct samples are drawn; larger batches repeat them (same shapes and cost).
    """
    transform = get_objective(config.objective.name).train_transform(config)
    size = config.data.image_size
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the transform's random crops
    samples = []
    for index in range(min(batch_size, 64)):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        label = index % len(CAPTION_CLASSES)
        raw = {
            "image": Image.fromarray(pixels),
            "key": f"synthetic-{index:06d}",
            "label": label,
            "caption": f"a photo of a {CAPTION_CLASSES[label]}.",
        }
        samples.append(transform(raw))
    batch = collate([samples[index % len(samples)] for index in range(batch_size)])
    if hasattr(transform, "finish_batch"):  # as the reader does: e.g. normalize uint8 crops
        batch = transform.finish_batch(batch)
    # tensors to the device, the rest (keys, SimCLR's colour-op group sizes) as they are: as the
    # engine moves a batch
    return {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
    }


# --- the step ------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One objective at one config on one device, ready to step."""

    config: Config
    objective: nn.Module
    batch: dict
    device: torch.device
    mixed_precision: str = "no"  # "bf16" on GPU: autocast around the forward, as the engine
    host_sync: bool = True  # the engine's per-step finite check waits for the device
    optimizer: str = "project"  # project: pretrain.optim's choice; or foreach, fused, forloop
    phases: dict = field(init=False)
    optimizers: list = field(init=False)

    def __post_init__(self):
        self.objective.to(self.device).train()
        self.phases = optimizer_phases(self.objective)  # {phase: [(name, parameter)]}
        self.phased = isinstance(self.objective, PhasedObjective)
        self.lr = scaled_lr(self.config.optimizer.blr, self.config.optimizer.lr, self.images)
        lr = self.lr
        skip = no_weight_decay_names(self.objective)
        self.optimizers = [
            self._optimizer(build_optimizer(named, skip, self.config.optimizer, lr))
            for named in self.phases.values()
        ]

    @property
    def images(self) -> int:
        """Images per step (SimCLR's two views of an image count once)."""
        return int(self.batch["image"].shape[0])

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.objective.parameters() if p.requires_grad)

    def _optimizer(self, built: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.optimizer == "project" or not isinstance(built, torch.optim.AdamW):
            return built
        groups = [
            {"params": group["params"], "weight_decay": group["weight_decay"]}
            for group in built.param_groups
        ]
        implementation = {
            "foreach": {"foreach": True},
            "fused": {"fused": True},
            "forloop": {"foreach": False},
        }[self.optimizer]
        lr, betas, eps = (built.defaults[key] for key in ("lr", "betas", "eps"))
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **implementation)

    def autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _outputs(self, batch: dict, phase: str) -> dict:
        arguments = {"phase": phase} if self.phased else {}
        with self.autocast():
            return self.objective(batch, **arguments)

    def step(self) -> None:
        """One optimizer step of the engine (pretrain.step), on this workload's batch."""
        optimizer_step(
            _accelerator(self.device.type),
            self.objective,
            self.phases,
            self.optimizers,
            [self.batch],
            self._outputs,
            self.lr,
            check_finite=self.host_sync,
        )

    def forward_backward(self) -> None:
        """The counted part of a step (FLOPs): every phase's forward and backward."""
        for phase in self.phases:
            self._outputs(self.batch, phase)["loss"].backward()
            self.objective.zero_grad(set_to_none=True)


@functools.cache
def _accelerator(device_type: str) -> Accelerator:
    """The single-process Accelerator that optimizer_step works through (fp32: a workload
    applies its own autocast)."""
    return Accelerator(cpu=device_type != "cuda", mixed_precision="no")


def build(
    config: Config,
    device="cpu",
    batch_size: int | None = None,
    seed: int = 0,
    **options,
) -> Workload:
    """The workload of `config` (batch size from the config unless given)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    objective, _ = get_objective(config.objective.name).build(config)
    batch = synthetic_batch(config, batch_size or config.data.batch_size, device, seed)
    return Workload(config, objective, batch, device, **options)


def step_flops(config: Config, batch_size: int | None = None) -> int:
    """Model FLOPs of one training step (forward + backward of every phase), counted on the meta
    device: nothing is allocated or computed, so paper-sized configs cost a second. An objective
    whose forward reads a value back to the host (.item()) cannot run there; it is counted on a
    real CPU step instead."""
    batch_size = batch_size or config.data.batch_size
    sample = synthetic_batch(config, 1, "cpu")
    # Without its view_* keys SimCLR skips the on-device colour augmentation, which selects rows
    # by data (impossible on meta) and has no matmuls to count.
    batch = {
        name: torch.empty((batch_size, *value.shape[1:]), dtype=value.dtype, device="meta")
        for name, value in sample.items()
        if isinstance(value, torch.Tensor) and not name.startswith("view_")
    }
    with torch.device("meta"):
        objective, _ = get_objective(config.objective.name).build(config)
    workload = Workload(config, objective, batch, torch.device("meta"), host_sync=False)
    try:
        return count_flops(workload.forward_backward)
    except RuntimeError as error:
        if "meta" not in str(error):
            raise
    return count_flops(build(config, "cpu", batch_size=batch_size).forward_backward)
