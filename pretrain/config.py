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
class OptimizerConfig:
    name: str = "adamw"
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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `a.b=value` overrides (YAML-parsed values)."""
    config = Config()
    if path is not None:
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
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        _merge(config, _nest(key.strip().split("."), _parse_scalar(raw_value)), prefix="")
    return config


def to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and W&B."""
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
