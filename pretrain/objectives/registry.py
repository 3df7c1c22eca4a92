"""The objective contract and registry: `@register_objective` as timm's `@register_model`.

An objective file defines its nn.Module, its config section (a dataclass; the YAML section named
like the objective), its sample transform factory, and a build function decorated with
`register_objective`. Nothing else lists objectives: the package imports every module in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.models.encoder import EncoderSpec
    from pretrain.models.text import TextEncoderSpec


@runtime_checkable
class Objective(Protocol):
    """What the engine trains: an nn.Module whose forward returns {"loss": scalar, ...}; any
    other scalar it returns is averaged and logged."""

    # The exported part: a headless timm model (encoder(x) -> pooled features), or for an
    # Exporting objective its own encoder (mlm: the text transformer)
    encoder: nn.Module

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class PhasedObjective(Objective, Protocol):
    """An objective that needs several optimizer steps per batch (a GAN: discriminator, then
    generator). Each phase gets its own optimizer over its parameters and, every step, its own
    forward(batch, phase=name) + backward + step, in the order given."""

    def optimizer_phases(self) -> dict[str, list[nn.Parameter]]: ...

    def forward(self, batch: dict[str, Any], phase: str) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class EmbeddingObjective(Objective, Protocol):
    """An objective whose samples meet only in the loss, through per-sample embeddings (a
    contrastive loss: every sample is every other's negative), so that

        forward(batch) == embedding_loss(forward(batch, embed_only=True))

    Gradient accumulation then keeps the whole step's batch in one loss (pretrain.grad_cache).
    The embeddings are a dict of tensors: per-sample ones of B rows, and 0-dim values computed
    from parameters that the loss needs (CLIP's logit scale). embed_only goes through forward so
    that DDP and FSDP see the call; embedding_loss must not read parameters itself (FSDP keeps
    them sharded outside forward)."""

    def forward(self, batch: dict[str, Any], embed_only: bool = False) -> dict[str, Any]: ...

    def embedding_loss(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Visualizing(Protocol):
    """Optional: pictures for the run directory and W&B, in normalized image space."""

    def visualize(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{name: images [rows, columns, 3, H, W]}."""
        ...


@runtime_checkable
class Exporting(Protocol):
    """Optional: an objective whose exported part is not a timm image encoder (mlm's text
    encoder) writes its own export into run_dir/export/ at the end of the run."""

    def export(self, run_dir: Path, meta: dict[str, Any], encoder_state: dict) -> Path:
        """meta: objective, steps, run_dir and the run's image settings (image_size, mean, std);
        encoder_state: the `encoder`'s state dict (gathered whole under FSDP); returns the
        weights file."""
        ...


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    build: Callable[[Config], tuple[Objective, EncoderSpec | TextEncoderSpec]]
    train_transform: Callable[[Config], Callable[[dict], dict]]  # Config -> sample transform
    section: type | None = None  # the objective's config dataclass (YAML section `name`)
    # Shard fields every sample needs besides its image, e.g. ("txt",): checked on the first
    # sample before a run starts, so unsuitable shards stop in one line instead of being
    # skipped sample by sample.
    needs: tuple[str, ...] = ()


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(
    name: str,
    train_transform: Callable[[Config], Callable],
    section: type | None = None,
    needs: tuple[str, ...] = (),
) -> Callable:
    """Decorates the objective's build function, `Config -> (module, spec)`: the spec rebuilds
    the exported part (EncoderSpec for a timm image encoder) and names it in the log line."""

    def register(build: Callable) -> Callable:
        if name in OBJECTIVES:
            raise ValueError(f"objective '{name}' is registered twice")
        OBJECTIVES[name] = ObjectiveEntry(name, build, train_transform, section, tuple(needs))
        return build

    return register


def get_objective(name: str) -> ObjectiveEntry:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}' (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]


def build_objective(config: Config) -> tuple[Objective, EncoderSpec | TextEncoderSpec]:
    return get_objective(config.objective.name).build(config)
