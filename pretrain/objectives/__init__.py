"""Objectives: a plain dict registry, name -> ObjectiveEntry.

An objective is an nn.Module with `forward(batch) -> {"loss": scalar, ...more scalars}` and an
`encoder` attribute (a headless timm model). It may define `visualize(batch)` returning
{name: images [rows, columns, 3, H, W]} for picture logging, and `no_weight_decay()`.
Adding one: a file here, an entry below, a config in configs/pretrain/, a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.config import Config, ConfigError
from pretrain.data.transforms import mae_train_transform
from pretrain.objectives.autoencoder import build_autoencoder, generative_train_transform
from pretrain.objectives.clip import build_clip, clip_train_transform
from pretrain.objectives.gan import build_gan
from pretrain.objectives.mae import build_mae
from pretrain.objectives.simclr import build_simclr, simclr_train_transform
from pretrain.objectives.vae import build_vae


@dataclass(frozen=True)
class ObjectiveEntry:
    build: Callable  # Config -> (objective module, EncoderSpec)
    train_transform: Callable  # Config -> (sample dict -> dict of tensors)


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "mae": ObjectiveEntry(
        build=build_mae,
        train_transform=lambda config: mae_train_transform(config.data.image_size),
    ),
    "simclr": ObjectiveEntry(build=build_simclr, train_transform=simclr_train_transform),
    "clip": ObjectiveEntry(build=build_clip, train_transform=clip_train_transform),
    "autoencoder": ObjectiveEntry(
        build=build_autoencoder, train_transform=generative_train_transform
    ),
    "vae": ObjectiveEntry(build=build_vae, train_transform=generative_train_transform),
    "gan": ObjectiveEntry(build=build_gan, train_transform=generative_train_transform),
}


def get_objective(name: str) -> ObjectiveEntry:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}' (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]


def build_objective(config: Config):
    return get_objective(config.objective.name).build(config)
