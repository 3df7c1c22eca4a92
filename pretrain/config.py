"""Typed run configuration: dataclass defaults, a YAML file of differences, `a.b=value` overrides.

Every key is checked against the dataclasses: an unknown key or a value of the wrong type raises
`ConfigError` with one line that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


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
    batch_size: int = 128  # per process; global batch = batch_size * processes * grad_accum
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
    # set_grad_checkpointing): ViT-L MAE activations -52% for +30% step time.
    grad_checkpointing: bool = False


@dataclass
class ObjectiveConfig:
    name: str = "mae"


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    # Projection MLP: (layers - 1) x [Linear, BatchNorm, ReLU], then Linear without bias or ReLU.
    projection_layers: int = 2
    projection_hidden_dim: int = 512
    projection_dim: int = 128
    negatives: str = "global"  # global: the whole global batch (gathered); local: this process's
    # Augmentation (SimCLR appendix A): crop, flip, colour jitter, grayscale, blur.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # b, c, s, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # None: 0.5 for images above 32 px, 0 at 32 px and below (the paper's CIFAR recipe)
    blur_p: float | None = None
    blur_kernel_fraction: float = 0.1  # Gaussian kernel side ~10% of the image, sigma 0.1-2


@dataclass
class CLIPConfig:
    embed_dim: int = 256  # shared image-text embedding width
    loss: str = "clip"  # clip: symmetric InfoNCE; siglip: pairwise sigmoid
    negatives: str = "global"  # global or local (this process's batch only)
    init_temperature: float = 0.07  # logit scale starts at ln(1/T); SigLIP starts at ln(10)
    max_logit_scale: float = 100.0  # the scale is clamped to ln(100) as in CLIP
    siglip_init_bias: float = -10.0
    # Text tower: open_clip's TextTransformer with the CLIP BPE tokenizer (bundled, offline).
    context_length: int = 32
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    crop_scale: tuple[float, float] = (0.9, 1.0)  # light crops: the caption describes the image


@dataclass
class AutoencoderConfig:
    latent_dim: int = 128  # bottleneck width: a linear map from the flattened encoder feature map
    decoder_width: int = 64  # DCGAN decoder: channels before the RGB layer, x2 per stage toward 4x4


@dataclass
class VAEConfig:
    latent_dim: int = 128
    decoder_width: int = 64
    beta: float = 1.0  # loss = per-image sum of squared errors + beta * KL(q(z|x) || N(0, I))
    kl_warmup_steps: int = 1000  # optimizer steps over which beta rises linearly from 0
    sample_grid: int = 8  # prior samples drawn as a sample_grid x sample_grid picture
    traversal_dims: int = 8  # latent dimensions in the traversal picture (the most used ones)
    traversal_range: float = 3.0  # each is swept over [-range, range]


@dataclass
class GANConfig:
    noise_dim: int = 100
    generator_width: int = 64  # channels before the RGB layer, x2 per stage toward 4x4
    generator_loss: str = "non_saturating"  # or "minimax" (the original log(1 - D(G(z))))
    sample_grid: int = 8  # fixed-noise samples drawn as a sample_grid x sample_grid picture


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw or lars
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
    mixed_precision: str = "auto"  # auto: bf16 on GPU, fp32 ("no") on CPU; or no, bf16, fp16
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
    # minutes of compilation at the start; then 7-8.5% more img/s for the MAE configs on a CPU
    # (benchmarks: speedups --groups compile). Worth it for long runs, not for short ones.
    compile: bool = False


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "ssl-pretrain"
    wandb_entity: str | None = None
    wandb_mode: str = "auto"  # auto: online with an API key, offline without; or online/offline
    log_every: int = 10  # optimizer steps between metric lines (the only host syncs in the loop)
    image_every: int = 200  # optimizer steps between reconstruction grids; 0 disables


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `a.b=value` overrides (YAML-parsed values)."""
    config = Config()
    if path is not None:
        apply_file(config, path)
    apply_overrides(config, overrides)
    return config


# The three layers below work on any nested dataclass config (finetune's as well as this one).


def apply_file(config: Any, path: str | Path) -> None:
    """Merge a YAML file of sections into the dataclass `config`, checking every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    _merge(config, loaded, prefix="")


def apply_value(config: Any, dotted_key: str, value: Any) -> None:
    """Set one `section.key` (already a Python value), with the same checks as a file."""
    _merge(config, _nest(dotted_key.strip().split("."), value), prefix="")


def apply_overrides(config: Any, overrides: list[str] | tuple) -> None:
    """`section.key=value` strings; values are parsed as YAML (`100`, `[0.9, 0.95]`, `{a: 1}`)."""
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        apply_value(config, key, _parse_scalar(raw_value))


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists) of a dataclass config, for YAML, JSON and W&B."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(target: Any, updates: dict, prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config key '{dotted}' (known in this section: {', '.join(known)})"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it a mapping")
            _merge(current, value, prefix=f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # Free-form kwargs: nested keys merge into the mapping.
            setattr(target, key, {**current, **value})
        else:
            setattr(target, key, _coerce(value, hints[key], dotted))


def _coerce(value: Any, annotation: Any, dotted: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner[0], dotted)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{dotted}' needs a list of {len(args)} values")
        return tuple(_coerce(item, arg, dotted) for item, arg in zip(value, args))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' needs a mapping, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; Python's float() reads it as meant.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{dotted}' needs {annotation.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value
