"""Finetune-stage settings: dataclass defaults, a YAML file of differences, flags, overrides.

Precedence, lowest first: the defaults below, `--config FILE`, the command's flags (`--train`,
`--epochs`, ...), then `section.key=value` arguments. Unknown keys and wrong types stop the
command with one line, through the same checker as the pretraining config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pretrain.errors import ConfigError
from pretrain.settings import apply_file, apply_overrides, apply_value, to_dict

MODES = ("linear", "knn", "full", "zeroshot", "mlm")


@dataclass
class DataConfig:
    # Shard specs (see pretrain.data.expand_shards). Empty: the pretraining run's own
    # data.train_shards / data.val_shards, else the embedded demo data.
    train_shards: str = ""
    val_shards: str = ""
    image_size: int = 0  # 0: the size the encoder was pretrained at (encoder.json)
    crop_fraction: float = 1.0  # eval resize/crop; ImageNet-style evaluation uses 0.875
    batch_size: int = 256  # per process, for feature extraction and evaluation
    num_workers: int = 2
    # Use this many training samples (0: all): the first shards that hold enough, and for frozen
    # features a seeded subset of exactly N of them (the same on any process count).
    train_samples: int = 0
    classes: list = field(default_factory=list)  # class names; empty: the shard index's
    pool: Literal["avg", "cls"] = "avg"  # features: mean of patch tokens, or the class token
    # Input normalization (3 values each); empty: the encoder's own (its export's card, or
    # timm's pretrained config for a timm encoder).
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)
    cache_dir: str = ""  # feature cache; empty: <output>/features
    cache: bool = True
    allow_pipe: bool = False


@dataclass
class LinearConfig:
    """MAE recipe: BatchNorm1d(affine=False) + Linear on frozen features, SGD, cosine."""

    epochs: int = 100
    batch_size: int = 256
    learning_rates: list = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class KnnConfig:
    """Weighted kNN on L2-normalised features (Wu et al. 2018, as used by DINO)."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class FullConfig:
    """End-to-end finetuning (MAE/BEiT recipe); lr = blr * global batch / 256.

    blr and drop_path default to what the sweeps measured best for the shipped small ViTs on
    32 px images (benchmarks/README.md); the ViT-B paper values (blr 5e-4, drop path 0.1) are in
    configs/finetune/imagenet_vit_base.yaml.
    """

    epochs: int = 10
    batch_size: int = 64  # per process
    blr: float = 8e-3
    lr: float | None = None  # absolute lr (overrides blr)
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    layer_decay: float = 0.75  # block i of depth d gets lr * layer_decay ** (d - i)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0  # timm Mixup alpha; 0: off (MAE uses 0.8)
    cutmix: float = 0.0  # timm CutMix alpha; 0: off (MAE uses 1.0)
    crop_scale_min: float = 0.08  # RandomResizedCrop scale (crop_scale_min, 1)
    auto_augment: str | None = None  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1
    clip_grad: float | None = None
    grad_accum: int = 1  # micro-batches per optimizer step (global batch x this)
    # A step whose loss or gradients are NaN/Inf on any process is skipped; this many in a row
    # stop the run (0: never stop).
    max_nonfinite_steps: int = 20
    steps_per_epoch: int = 0  # 0: train samples / global batch (needs the shard index counts)
    shuffle_buffer: int = 1000
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU
    keep_checkpoints: int = 1
    seed: int = 0


@dataclass
class ZeroShotConfig:
    # "{}" is replaced by the class name; the class embedding is the mean over templates.
    templates: list = field(
        default_factory=lambda: ["a photo of a {}.", "a {}.", "an image of a {}."]
    )
    text_batch_size: int = 256


@dataclass
class MLMEvalConfig:
    """Masked-token accuracy of an `mlm` run on held-out captions (finetune/mlm.py)."""

    # Masking draws are seeded by (seed, sample key): the same positions for every model.
    seed: int = 0
    # mask: every chosen token becomes the mask token (predicted from context alone);
    # bert: the training rule (80% mask token, 10% random token, 10% kept)
    corruption: Literal["mask", "bert"] = "mask"


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = ""  # empty: the pretraining run's project (else ssl-pretrain)
    wandb_entity: str | None = None
    # auto: online with an API key, offline without
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    full: FullConfig = field(default_factory=FullConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    mlm: MLMEvalConfig = field(default_factory=MLMEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_finetune_config(
    path: str | Path | None = None, flags: dict | None = None, overrides: list[str] | tuple = ()
) -> FinetuneConfig:
    """Defaults <- YAML file <- flags ({"data.train_shards": ..., None values ignored}) <-
    `section.key=value` overrides."""
    config = FinetuneConfig()
    if path is not None:
        apply_file(config, path)
    for dotted, value in (flags or {}).items():
        if value is not None:
            apply_value(config, dotted, value)
    apply_overrides(config, overrides)
    _check(config)
    return config


def _check(config: FinetuneConfig) -> None:
    rates = config.linear.learning_rates
    if not rates or not all(isinstance(rate, (int, float)) and rate > 0 for rate in rates):
        raise ConfigError(f"linear.learning_rates must be positive numbers, got {rates!r}")
    if config.knn.k < 1 or config.knn.temperature <= 0:
        raise ConfigError("knn.k must be at least 1 and knn.temperature positive")
    templates = config.zeroshot.templates
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ConfigError("zeroshot.templates must be strings that each hold '{}'")
    if not all(isinstance(name, str) for name in config.data.classes):
        raise ConfigError("data.classes must be a list of class names")
    data = config.data
    for values in (data.mean, data.std):
        if values and (len(values) != 3 or not all(isinstance(v, (int, float)) for v in values)):
            raise ConfigError("data.mean and data.std must be 3 numbers each")
    if bool(data.mean) != bool(data.std):
        raise ConfigError("give data.mean and data.std together")
    full = config.full
    if full.epochs < 1 or full.batch_size < 1 or full.grad_accum < 1:
        raise ConfigError("full.epochs, full.batch_size and full.grad_accum must be at least 1")
    if (full.mixup > 0 or full.cutmix > 0) and full.batch_size % 2:
        raise ConfigError("full.mixup/cutmix need an even full.batch_size")
    if not 0 < full.layer_decay <= 1:
        raise ConfigError(f"full.layer_decay must be in (0, 1], got {full.layer_decay}")


def section_dict(config: FinetuneConfig, mode: str) -> dict:
    """What a mode's result depends on, for the JSON and W&B: data, the mode's section."""
    plain = to_dict(config)
    return {"data": plain["data"], mode: plain[mode]}
