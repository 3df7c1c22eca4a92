"""The pretraining run's configuration: dataclass defaults, a YAML file of differences, then
`section.key=value` overrides (checked by pretrain.settings: unknown keys and wrong types stop
with one line).

The sections below are the engine's. Each objective brings its own section (MAEConfig in
objectives/mae.py, ...), registered with the objective and named like it, so `Config` is put
together from both: adding an objective never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Literal

import yaml

from pretrain.errors import ConfigError
from pretrain.monitor import MonitorConfig
from pretrain.objectives import OBJECTIVES
from pretrain.settings import apply_file, apply_overrides, to_dict

__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_dict"]


@dataclass
class DataConfig:
    # Shard spec (path, brace pattern, folder with *-index.json, comma list). Empty: the embedded
    # demo data, generated once into `demo_dir`.
    train_shards: str = ""
    val_shards: str = ""
    demo_dir: str = "data_cache/demo"
    demo_train_samples: int = 20000
    demo_val_samples: int = 2000
    image_size: int = 32
    # per process; global batch = batch_size * processes * grad_accum (a resume on another
    # number of processes keeps the checkpoint's global batch: pretrain/resume.py)
    batch_size: int = 128
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # The training stream is resampled and cut into chunks of this many micro-batches per rank;
    # each chunk ("epoch") reseeds shard and sample order with (seed, epoch).
    steps_per_epoch: int = 500
    allow_pipe: bool = False  # `pipe:` shard specs run a shell command: opt in explicitly


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    patch_size: int = 4
    # Extra keyword arguments for timm.create_model, e.g. {depth: 6, embed_dim: 192}.
    kwargs: dict = field(default_factory=dict)
    # Recompute the encoder's block activations in the backward pass (timm's
    # set_grad_checkpointing): less activation memory for more step time (benchmarks/).
    grad_checkpointing: bool = False


@dataclass
class ObjectiveConfig:
    name: str = "mae"  # a registered objective (pretrain/objectives/); its settings: section <name>


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "lars"] = "adamw"
    # lr = blr * global_batch / 256 unless `lr` is set explicitly.
    blr: float = 1.5e-4
    lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    eps: float = 1e-8  # adamw
    momentum: float = 0.9  # lars
    trust_coefficient: float = 0.001  # lars: eta in the trust ratio eta * |w| / |g|


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100  # optimizer steps of linear warmup, then cosine to min_lr
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    clip_grad: float | None = None  # max global grad norm; None: no clipping (norm still logged)
    # auto: bf16 on GPU, fp32 ("no") on CPU
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""  # empty: "<objective>-<timestamp>"
    checkpoint_every: int = 500  # optimizer steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    # A step whose loss or gradients are NaN/Inf on any rank is skipped; this many in a row stop
    # the run (0: never stop).
    max_nonfinite_steps: int = 20
    # Wall-clock budget of one invocation, in minutes (null: none). When it runs out the run ends
    # as if train.steps were reached: final checkpoint, export, summary. Fixed-budget
    # comparisons and cluster time limits; the lr schedule still spans train.steps.
    time_limit_minutes: float | None = None
    # torch.compile the objective's forward (in place, so checkpoints keep their keys). Costs
    # minutes of compilation at the start, then a faster step: for long runs (benchmarks/).
    compile: bool = False
    # Shard parameters, gradients and optimizer state over the processes (FSDP2; every timm
    # Block its own unit). GPUs: through accelerate's FSDP plugin; CPU: torch's fully_shard. An
    # accelerate launch with an FSDP config turns it on too. Checkpoints keep the unsharded layout.
    fsdp: bool = False
    # With more than one process, BatchNorm layers normalise over the global batch (SimCLR's
    # projection head, ResNet encoders); false: over each process's batch.
    sync_batchnorm: bool = True
    # With grad_accum > 1, contrastive objectives (SimCLR, CLIP/SigLIP) take one loss over the
    # whole step's batch (GradCache: exact, one extra forward per micro-batch); false: each
    # micro-batch against its own negatives.
    grad_cache: bool = True


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "ssl-pretrain"
    wandb_entity: str | None = None
    # auto: online with an API key, offline without
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    log_every: int = 10  # optimizer steps between metric lines (the only host syncs in the loop)
    image_every: int = 200  # optimizer steps between reconstruction grids; 0 disables


def _section(name: str, section: type) -> tuple[str, type, object]:
    return name, section, field(default_factory=section)


# The engine's sections, and after `objective` one section per registered objective.
Config = make_dataclass(
    "Config",
    [
        _section("data", DataConfig),
        _section("model", ModelConfig),
        _section("objective", ObjectiveConfig),
        *[_section(name, e.section) for name, e in OBJECTIVES.items() if e.section is not None],
        _section("optimizer", OptimizerConfig),
        _section("schedule", ScheduleConfig),
        _section("train", TrainConfig),
        _section("logging", LoggingConfig),
        _section("monitor", MonitorConfig),
    ],
)
Config.__module__ = __name__
Config.__doc__ = "A whole pretraining run's settings: one attribute per YAML section."


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `a.b=value` overrides (YAML-parsed values)."""
    config = Config()
    if path is not None:
        apply_file(config, path)
    apply_overrides(config, overrides)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
